"""Compression of a pretrained model, and the ``ecospa compress`` command.

    load -> calibrate (coupled Fisher on TRAIN batches) -> prune to the target -> recover with a
    short AdamW fine-tune (optionally distilling the dense model) -> held-out perplexity on the
    VAL split (never used for calibration or recovery) -> save a native checkpoint (+ HF export)

``--rounds N`` repeats calibrate/prune/recover N times on a linear ramp to the final target.

    ecospa compress --model smollm2-135m --budget 0.5 --steps 80 --out runs/smol50
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Union

import torch
import torch.nn.functional as F

from ecospa.evaluate import perplexity
from ecospa.importance import ESTIMATORS, fisher
from ecospa.prune import slice_units
from ecospa.select import select

Sparsity = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class Job:
    """Everything ``compress`` needs; validated when built (a bad value never touches files)."""

    model: str
    out: Optional[str] = None
    data: str = "pydoc"
    budget: Optional[float] = None
    sparsity: Optional[Sparsity] = None
    estimator: str = "fisher"
    rounds: int = 1
    distill: bool = False
    distill_weight: float = 0.5
    steps: int = 80
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    calib_batches: int = 4
    eval_seq_len: int = 512
    eval_windows: Optional[int] = 40
    eval_batch_size: int = 4
    seed: int = 0
    export_hf: Optional[str] = None
    progress: bool = True
    ppl_dense: Optional[float] = None  # skip the dense evaluation when already known

    def __post_init__(self):
        if (self.budget is None) == (self.sparsity is None):
            raise ValueError("give exactly one target: --budget F (fraction of the coupled groups' "
                             "parameters removed) or --sparsity (e.g. 'qk=0.25,vo=0.25,mlp=0.5')")
        if self.budget is not None and not (isinstance(self.budget, (int, float))
                                            and 0.0 < self.budget < 1.0):
            raise ValueError(f"--budget must be a fraction in (0, 1), e.g. 0.5; got {self.budget!r}")
        fracs = self.sparsity.values() if isinstance(self.sparsity, Mapping) else \
            ([self.sparsity] if self.sparsity is not None else [])
        if any(not (isinstance(v, (int, float)) and 0.0 <= v < 1.0) for v in fracs):
            raise ValueError(f"--sparsity fractions must lie in [0, 1); got {self.sparsity!r}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"--estimator {self.estimator!r} is unknown; use one of {sorted(ESTIMATORS)}")
        for name in ("rounds", "batch_size", "seq_len", "calib_batches", "eval_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps < 0 or self.lr < 0 or not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError("--steps and --lr must be >= 0 and --distill-weight in [0, 1]")
        for path in (self.out, self.export_hf):
            if path and os.path.abspath(path) == os.path.abspath(self.model):
                raise ValueError(f"output {path!r} is the input model; choose another directory")


def parse_sparsity(text: str) -> Sparsity:
    """'0.5' -> 0.5; 'qk=0.25,vo=0.25,mlp=0.5' -> {"qk": 0.25, ...}; ValueError otherwise."""
    try:
        if "=" not in text:
            return float(text)
        out = {}
        for item in text.split(","):
            kind, value = item.split("=")
            out[kind.strip()] = float(value)
    except ValueError as err:
        raise ValueError(f"--sparsity {text!r}: write a fraction (0.5) or kind=fraction pairs "
                         "('qk=0.25,vo=0.25,mlp=0.5')") from err
    unknown = set(out) - {"qk", "vo", "mlp"}
    if unknown:
        raise ValueError(f"--sparsity names unknown group kinds {sorted(unknown)}; use qk, vo, mlp")
    return out


def group_params(params, groups) -> int:
    """Parameters that belong to the coupled groups (the part pruning can remove)."""
    from ecospa._tree import get_path
    return sum(get_path(params, m.path).numel() for g in groups for m in g.members if m.masked)


def n_params(params) -> int:
    import optree
    return sum(x.numel() for x in optree.tree_leaves(params, namespace="") if x.is_floating_point())


def _round_target(job: Job, r: int, params, dense_params, groups) -> dict:
    """select() kwargs reaching round r's cumulative target (linear ramp, relative to dense)."""
    frac = r / job.rounds
    if job.budget is not None:
        keep = group_params(dense_params, groups) * (1.0 - job.budget * frac)
        return {"budget": max(0.0, 1.0 - keep / group_params(params, groups))}
    sizes = {g.name: (g.kind, g.sizes(params)[1], g.sizes(dense_params)[1]) for g in groups}
    rel = {}
    for name, (kind, now, dense) in sizes.items():
        s = job.sparsity.get(kind, 0.0) if isinstance(job.sparsity, Mapping) else job.sparsity
        rel[name] = max(0.0, 1.0 - (1.0 - s * frac) * dense / now)
    return {"sparsity": {name: v for name, v in rel.items()}}


def _select(params, groups, scores, target):
    if "budget" in target:
        return select(params, groups, scores, budget=target["budget"])
    # per-group fractions: select() keys by kind, so run it once per group
    keep = {}
    for g in groups:
        keep.update(select(params, (g,), {g.name: scores[g.name]},
                           sparsity=target["sparsity"][g.name]))
    return keep


def _losses(forward, cfg, teacher, job: Job):
    def ce(params, batch):
        logits = forward(params, batch[:, :-1], cfg)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def distill(params, batch):
        logits = forward(params, batch[:, :-1], cfg)
        with torch.no_grad():
            ref = forward(teacher, batch[:, :-1], cfg)
        kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(ref, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        hard = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        return (1 - job.distill_weight) * hard + job.distill_weight * kl

    return ce, (distill if job.distill else ce)


def recover(train_loss, params, ids, job: Job, steps: int, seed: int):
    """``steps`` AdamW steps on random TRAIN windows; returns (params, last losses)."""
    from tqdm.auto import tqdm

    from ecospa.data import batch_at
    from ecospa.optim import adamw

    opt = adamw(job.lr, weight_decay=0.0)
    state = opt.init(params)
    step_fn = torch.func.grad_and_value(train_loss)
    losses = []
    bar = tqdm(range(steps), desc="recover", unit="step", disable=not job.progress, leave=False)
    for step in bar:
        grads, loss = step_fn(params, batch_at(ids, step, job.batch_size, job.seq_len, seed))
        params, state = opt.update(grads, state, params)
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return params, losses


def latency(forward, params, cfg, seq_len: int, repeats: int = 3) -> float:
    """Median seconds of one no-grad forward on [1, seq_len] tokens (after one warm-up)."""
    tokens = torch.zeros(1, seq_len, dtype=torch.long)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            forward(params, tokens, cfg)
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compress(job: Job, loaded=None) -> dict:
    """Run the compression job; returns the summary dict (also saved with the checkpoint).

    ``loaded`` may pass an already loaded ``(cfg, params, tokenizer)`` to skip loading.
    Example: ``summary = compress(Job("smollm2-135m", out="runs/x", budget=0.5))``
    """
    from ecospa.data import batch_at, corpus
    from ecospa.models import encode, forward_for, groups_for, load_model

    torch.manual_seed(job.seed)
    cfg, dense, tok = loaded if loaded is not None else load_model(job.model)
    forward, groups = forward_for(cfg), groups_for(cfg)
    train_ids, val_ids = encode(tok, corpus(job.data, "train")), encode(tok, corpus(job.data, "val"))
    ev = dict(seq_len=job.eval_seq_len, batch_size=job.eval_batch_size,
              max_windows=job.eval_windows, progress=job.progress)
    ppl_dense = job.ppl_dense or perplexity(forward, dense, cfg, val_ids, **ev)
    out = {"model": job.model, "ppl_dense": ppl_dense, "rounds": []}
    ce, train_loss = _losses(forward, cfg, dense, job)
    params, per_round = dense, max(1, job.steps // job.rounds) if job.steps else 0
    for r in range(1, job.rounds + 1):
        est = ESTIMATORS[job.estimator](groups)
        calib = [batch_at(train_ids, 10_000 * r + i, job.batch_size, job.seq_len, job.seed + 1)
                 for i in range(job.calib_batches)]
        scores = fisher(ce, params, groups, calib, estimator=est)
        params = slice_units(params, groups, _select(params, groups, scores,
                                                     _round_target(job, r, params, dense, groups)))
        pruned = perplexity(forward, params, cfg, val_ids, **ev)
        if job.progress:
            from tqdm.auto import tqdm
            tqdm.write(f"round {r}: {1 - group_params(params, groups) / group_params(dense, groups):.1%}"
                       f" of group params removed, held-out ppl {ppl_dense:.2f} -> {pruned:.2f}")
        t0 = time.perf_counter()
        params, losses = recover(train_loss, params, train_ids, job, per_round, job.seed + r)
        seconds = time.perf_counter() - t0
        out["rounds"].append({"ppl_pruned": pruned, "ppl_recovered":
                              perplexity(forward, params, cfg, val_ids, **ev) if per_round else pruned,
                              "steps": per_round, "recover_seconds": seconds,
                              "final_train_loss": losses[-1] if losses else None})
    out.update(_sizes(dense, params, groups), ppl_pruned=out["rounds"][0]["ppl_pruned"],
               ppl_recovered=out["rounds"][-1]["ppl_recovered"],
               latency_ratio=latency(forward, dense, cfg, job.eval_seq_len)
               / latency(forward, params, cfg, job.eval_seq_len),
               job={k: v for k, v in dataclasses.asdict(job).items()})
    _save(job, params, cfg, out)
    return out


def _sizes(dense, params, groups) -> dict:
    import optree

    def blocks(p):
        return sum(x.numel() for x in optree.tree_leaves(p["layers"], namespace="")
                   if x.is_floating_point())

    return {"dense_params": n_params(dense), "kept_params": n_params(params),
            "group_fraction_removed": 1 - group_params(params, groups) / group_params(dense, groups),
            "block_fraction_removed": 1 - blocks(params) / blocks(dense)}


def _tokenizer_spec(model: str) -> Optional[str]:
    """What ``models.load_tokenizer`` needs later: the source spec, or a checkpoint's own."""
    import json
    manifest = os.path.join(model, "manifest.json")
    if os.path.isfile(manifest):
        with open(manifest) as f:
            return json.load(f).get("extra", {}).get("tokenizer")
    return model if not os.path.exists(model) else os.path.abspath(model)


def _save(job: Job, params, cfg, summary: dict) -> None:
    from ecospa.func import gpt2, llama
    module = llama if isinstance(cfg, llama.Config) else gpt2
    if job.export_hf:
        try:
            module.save_hf(params, cfg, job.export_hf)
            summary["export_hf"] = os.path.abspath(job.export_hf)
        except ValueError as err:
            summary["export_hf"] = f"not exported: {err}"
    if job.out:
        from ecospa import checkpoint
        checkpoint.save(job.out, params, cfg,
                        extra={"tokenizer": _tokenizer_spec(job.model), "summary": summary})


def table(summary: dict) -> str:
    """The final summary as an aligned text table."""
    rows = [("dense params", f"{summary['dense_params'] / 1e6:.2f}M"),
            ("kept params", f"{summary['kept_params'] / 1e6:.2f}M"),
            ("coupled-group params removed", f"{summary['group_fraction_removed']:.1%}"),
            ("block params removed", f"{summary['block_fraction_removed']:.1%}"),
            ("ppl dense", f"{summary['ppl_dense']:.2f}")]
    for i, r in enumerate(summary["rounds"], 1):
        rows += [(f"ppl after prune (round {i})", f"{r['ppl_pruned']:.2f}"),
                 (f"ppl after recovery (round {i}, {r['steps']} steps)", f"{r['ppl_recovered']:.2f}")]
    rows.append(("forward latency dense / pruned", f"{summary['latency_ratio']:.2f}x"))
    if "export_hf" in summary:
        rows.append(("HF export", summary["export_hf"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ecospa compress``."""
    p.add_argument("--model", required=True,
                   help="registry name (smollm2-135m), .gguf file, HF directory or ecospa checkpoint")
    p.add_argument("--out", help="native checkpoint directory to write (written atomically)")
    p.add_argument("--data", default="pydoc", help="text source; train split calibrates/recovers, "
                   "val split is held out for perplexity")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float, help="fraction of the coupled groups' parameters "
                        "to remove, allocated globally by importance per parameter")
    target.add_argument("--sparsity",
                        help="fraction of units removed per group: 0.5 or 'qk=0.25,vo=0.25,mlp=0.5'")
    p.add_argument("--estimator", default="fisher", choices=sorted(ESTIMATORS))
    p.add_argument("--rounds", type=int, default=1, help="iterative prune-and-recover rounds")
    p.add_argument("--distill", action="store_true", help="recover with KL to the dense logits")
    p.add_argument("--distill-weight", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=80, help="recovery steps in total")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--calib-batches", type=int, default=4)
    p.add_argument("--eval-seq-len", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--export-hf", help="also write a transformers directory, when representable")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    """Build the job from the flags (validated before any loading), run it, print the table."""
    fields = {f.name for f in dataclasses.fields(Job)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    if values.get("sparsity") is not None:
        values["sparsity"] = parse_sparsity(values["sparsity"])
    job = Job(**values)
    if args.threads:
        torch.set_num_threads(args.threads)
    summary = compress(job)
    print(table(summary))
    if job.out:
        print(f"saved {os.path.abspath(job.out)}")
    return 0


__all__ = ["Job", "compress", "recover", "latency", "parse_sparsity", "group_params", "table",
           "add_arguments", "run"]
