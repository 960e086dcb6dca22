"""ViT on scikit-learn's handwritten digits: dense vs coupled-Fisher pruned vs small dense.

The data installs offline with scikit-learn (``sklearn.datasets.load_digits``: 1797 grey 8x8
images of the digits 0-9), upscaled bilinearly to ``--size`` pixels, split once into train/test
by ``--split-seed`` (stratified). For every model seed:

1. dense: a small ViT trained from scratch for ``--dense-steps`` steps;
2. pruned: that dense model fine-tuned ``--finetune-steps`` more steps; during the fine-tune the
   coupled empirical Fisher (``ecospa.coupled_fisher``, an EMA of the per-unit v_j^2 from the
   training gradients) ranks the coupled units, and ``--rounds`` rounds (at 10%, 20%, ... of
   the fine-tune) remove units with ``ecospa.select`` + ``ecospa.slice_units`` (the AdamW
   moments sliced alike) until every qk / vo / mlp group keeps ``1 - --sparsity`` of its units;
3. dense + fine-tune: the same fine-tune without pruning (what the pruning costs);
4. small: a dense ViT with exactly the pruned model's shapes (head dims, MLP width), trained from
   scratch for dense-steps + finetune-steps steps (the same number of steps as the pruned one).

Prints and writes the test accuracies (``results/vit_digits.json``; ``--quick``:
``results/vit_digits_quick.json``, a few steps, to check the script runs).

    python benchmarks/vit_digits.py                 # the full run (~5 min on 1 CPU thread)
    python benchmarks/vit_digits.py --quick
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

HERE = os.path.dirname(os.path.abspath(__file__))


def results_path(quick: bool, out: str = None) -> str:
    if out:
        return out
    return os.path.join(HERE, "results", "vit_digits_quick.json" if quick else "vit_digits.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="model seeds (init, batch order)")
    p.add_argument("--split-seed", type=int, default=0, help="the train/test split")
    p.add_argument("--test-fraction", type=float, default=0.25)
    p.add_argument("--size", type=int, default=16, help="images are upscaled to size x size")
    p.add_argument("--patch", type=int, default=4)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3, help="peak lr of the dense / small runs")
    p.add_argument("--finetune-lr", type=float, default=1e-3)
    p.add_argument("--dense-steps", type=int, default=800)
    p.add_argument("--finetune-steps", type=int, default=400)
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of every coupled group's units removed")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ema", type=float, default=0.9, help="EMA factor of the Fisher estimate")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="a few steps, one seed (checks the script)")
    p.add_argument("--out", default=None, help="results file (default: results/vit_digits[_quick].json)")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.dense_steps, args.finetune_steps = args.seeds[:1], 6, 10
        args.layers, args.dim, args.heads, args.ffn, args.batch = 1, 16, 2, 32, 32
    if not 0.0 < args.sparsity < 1.0:
        p.error("--sparsity must be in (0, 1)")
    if args.rounds < 1 or args.rounds * max(1, args.finetune_steps // 10) > args.finetune_steps:
        p.error("--rounds must be >= 1 and the rounds must fit in the fine-tune (at 10%% steps)")
    return args


def load_data(size: int, split_seed: int, test_fraction: float):
    """(x_train, y_train, x_test, y_test): float32 images [N, 1, size, size] standardised with the
    training set's mean and std, int64 labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # [1797, 1, 8, 8]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(range(len(y)), test_size=test_fraction, random_state=split_seed,
                              stratify=digits.target)
    tr, te = torch.tensor(tr), torch.tensor(te)
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return x[tr], y[tr], x[te], y[te]


def make_loss(cfg):
    from ecospa.func import vit

    def loss(params, batch):
        images, labels = batch
        return F.cross_entropy(vit.forward(params, images, cfg), labels)
    return loss


def accuracy(params, cfg, x, y) -> float:
    from ecospa.func import vit
    with torch.no_grad():
        return float((vit.forward(params, x, cfg).argmax(-1) == y).float().mean())


def batches(x, y, batch: int, seed: int):
    """Endless shuffled minibatches (epoch by epoch)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = order[i:i + batch]
            yield x[idx], y[idx]


def train(params, cfg, data, steps: int, lr_peak: float, seed: int, batch: int, opt_state=None,
          prune=None):
    """``steps`` AdamW steps on minibatches of ``data`` (images, labels). ``opt_state``: continue
    from these moments (a new lr schedule). ``prune``: (schedule {step: cumulative sparsity},
    groups, estimator) prunes by the coupled Fisher during training. Returns (params, state)."""
    import ecospa
    from ecospa import optim
    from ecospa.schedule import dense_sizes, round_target, warmup_cosine
    grad_fn = torch.func.grad(make_loss(cfg))
    opt = optim.adamw(warmup_cosine(lr_peak, max(1, steps // 20), steps), b2=0.99, weight_decay=0.05)
    opt_state = opt.init(params) if opt_state is None else optim.AdamWState(0, opt_state.mu, opt_state.nu)
    rounds, est, imp = {}, None, None
    if prune is not None:
        rounds, groups, est = prune
        imp, dense = est.init(params), dense_sizes(params, groups)
    it = batches(data[0], data[1], batch, seed)
    for step in range(steps):
        if step in rounds:  # Fisher of the steps so far ranks the units; moments sliced alike
            counts = round_target(rounds[step], groups, dense, params, by="sparsity")["counts"]
            keep = ecospa.select(params, groups, est.scores(imp), counts=counts)
            params = ecospa.slice_units(params, groups, keep)
            opt_state = optim.slice_state(opt_state, groups, keep)
        grads = grad_fn(params, next(it))
        if est is not None:
            imp = est.update(imp, params, grads)
        params, opt_state = opt.update(grads, opt_state, params)
    return params, opt_state


def block_params(params) -> int:
    return sum(x.numel() for p in params["layers"] for x in p.values())


def run_seed(args, seed: int, data, test) -> dict:
    import ecospa
    from ecospa.func import vit
    from ecospa.train.flops import forward_flops
    cfg = vit.Config(image_size=args.size, patch_size=args.patch, n_channels=1, dim=args.dim,
                     n_layers=args.layers, n_heads=args.heads, ffn_dim=args.ffn, n_classes=10)
    row = {"seed": seed}
    t0 = time.perf_counter()
    dense = vit.init(cfg, seed=seed)
    dense, dense_state = train(dense, cfg, data, args.dense_steps, args.lr, seed, args.batch)
    row["dense"] = accuracy(dense, cfg, *test)
    row["dense_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    tuned, _ = train(dense, cfg, data, args.finetune_steps, args.finetune_lr, seed + 1000, args.batch,
                     dense_state)
    row["dense_finetuned"] = accuracy(tuned, cfg, *test)
    row["dense_finetuned_s"] = round(time.perf_counter() - t0, 1)

    t0 = time.perf_counter()
    groups = vit.coupled_groups(cfg)
    tenth = max(1, args.finetune_steps // 10)
    schedule = {tenth * (r + 1): args.sparsity * (r + 1) / args.rounds for r in range(args.rounds)}
    est = ecospa.coupled_fisher(groups, ema=args.ema)
    pruned, _ = train(dense, cfg, data, args.finetune_steps, args.finetune_lr, seed + 1000, args.batch,
                      dense_state, prune=(schedule, groups, est))
    row["pruned"] = accuracy(pruned, cfg, *test)
    row["pruned_s"] = round(time.perf_counter() - t0, 1)

    p0 = pruned["layers"][0]
    shapes = {(p["wq"].shape[-1], p["wv"].shape[-1], p["w_in"].shape[1]) for p in pruned["layers"]}
    assert len(shapes) == 1, shapes  # uniform per-group sparsity: every layer alike
    (dk, dv, ffn), = shapes
    assert dk == dv, (dk, dv)
    small_cfg = vit.Config(image_size=args.size, patch_size=args.patch, n_channels=1, dim=args.dim,
                           n_layers=args.layers, n_heads=args.heads, ffn_dim=ffn, n_classes=10,
                           head_dim=dk)
    t0 = time.perf_counter()
    small = vit.init(small_cfg, seed=seed)
    assert {k: v.shape for k, v in small["layers"][0].items()} == {k: v.shape for k, v in p0.items()}
    small, _ = train(small, small_cfg, data, args.dense_steps + args.finetune_steps, args.lr, seed,
                     args.batch)
    row["small_from_scratch"] = accuracy(small, small_cfg, *test)
    row["small_s"] = round(time.perf_counter() - t0, 1)

    row["block_params"] = {"dense": block_params(dense), "pruned": block_params(pruned),
                           "small": block_params(small)}
    row["forward_flops_per_image"] = {k: forward_flops(t, "vit", 1, cfg.seq_len)
                                      for k, t in (("dense", dense), ("pruned", pruned))}
    row["pruned_shapes"] = {"qk_dims_per_head": dk, "v_dims_per_head": dv, "mlp_width": ffn,
                            "rounds_at_finetune_step": sorted(schedule)}
    return row


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from _common import conditions, write_results
    x_tr, y_tr, x_te, y_te = load_data(args.size, args.split_seed, args.test_fraction)
    cond = conditions("cpu", torch.float32, **{k: v for k, v in vars(args).items() if k != "out"},
                      n_train=len(y_tr), n_test=len(y_te))
    print("conditions: " + ", ".join(f"{k}={cond[k]}" for k in (
        "device", "dtype", "torch_threads", "n_train", "n_test", "size", "patch", "dim", "layers",
        "heads", "ffn", "batch", "dense_steps", "finetune_steps", "sparsity", "rounds", "seeds")), flush=True)
    t0 = time.perf_counter()
    rows = []
    for seed in args.seeds:
        row = run_seed(args, seed, (x_tr, y_tr), (x_te, y_te))
        rows.append(row)
        print(f"seed {seed}: dense {row['dense']:.4f}  dense+ft {row['dense_finetuned']:.4f}  "
              f"pruned {row['pruned']:.4f}  small {row['small_from_scratch']:.4f}  "
              f"(block params {row['block_params']})", flush=True)
    keys = ("dense", "dense_finetuned", "pruned", "small_from_scratch")
    summary = {k: {"mean": statistics.mean(r[k] for r in rows), "per_seed": [r[k] for r in rows]}
               for k in keys}
    r0 = rows[0]
    steps = {"dense": args.dense_steps, "dense_finetuned": args.dense_steps + args.finetune_steps,
             "pruned": args.dense_steps + args.finetune_steps,
             "small_from_scratch": args.dense_steps + args.finetune_steps}
    params = {"dense": r0["block_params"]["dense"], "dense_finetuned": r0["block_params"]["dense"],
              "pruned": r0["block_params"]["pruned"], "small_from_scratch": r0["block_params"]["small"]}
    print(f"\n| model | block params | steps | test accuracy (mean over seeds {args.seeds}) | per seed |")
    print("|---|---|---|---|---|")
    for k in keys:
        print(f"| {k} | {params[k]} | {steps[k]} | {summary[k]['mean']:.4f} | "
              f"{', '.join(f'{a:.4f}' for a in summary[k]['per_seed'])} |")
    payload = {"conditions": cond, "rows": rows, "summary": summary, "steps": steps,
               "block_params": params, "wall_s": round(time.perf_counter() - t0, 1)}
    print(f"wall time {payload['wall_s']} s")
    write_results(results_path(args.quick, args.out), payload)
    return payload


if __name__ == "__main__":
    main()
