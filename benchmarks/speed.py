"""Speed and memory of pruned models vs dense, measured in one run; ratios against FLOP-ideal.

    python benchmarks/speed.py            # full CPU run (LLaMA-60M and GPT-2-small shapes)
    python benchmarks/speed.py --quick    # minutes-scale smoke run (smaller shapes)
    python benchmarks/speed.py --device cuda --dtype bfloat16 --models llama-350m llama-1b

For each model and kept fraction f in {1.0, 0.75, 0.5, 0.4} every coupled group keeps a fraction f of
its units (uniformly; which units does not matter for speed). Reported per fraction:
prefill latency (batch 1 and 8), training step (forward + backward + AdamW), eager and optionally
torch.compile'd, as medians; speedup = dense time / pruned time; FLOP-ideal speedup = dense linear
FLOPs / pruned linear FLOPs (all projections plus the unpruned LM head); efficiency = speedup / ideal.
Memory: bytes of params + grads + AdamW moments (exact, from the tensors), ratio to dense.
Functional overhead: ecospa's dense forward vs transformers' forward of the same weights.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import optree
import torch
import torch.nn.functional as F

import ecospa
from ecospa import optim
from ecospa.func import gpt2, llama
from ecospa.io.hf import hf_family_of

sys.path.insert(0, os.path.dirname(__file__))
from _common import conditions, median_time, peak_bytes, sync, write_results  # noqa: E402

MODELS = {
    # name: (module, config). Shapes of the published protocols (GaLore LLaMA, GPT-2).
    "llama-60m": (llama, dict(vocab_size=32000, dim=512, n_layers=8, n_heads=8, ffn_dim=1376)),
    "gpt2-small": (gpt2, dict(vocab_size=50257, dim=768, n_layers=12, n_heads=12, ffn_dim=3072)),
    "llama-350m": (llama, dict(vocab_size=32000, dim=1024, n_layers=24, n_heads=16, ffn_dim=2736)),
    "llama-1b": (llama, dict(vocab_size=32000, dim=2048, n_layers=24, n_heads=32, ffn_dim=5461)),
    # quick-mode stand-ins with the same structure
    "llama-tiny": (llama, dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=688)),
    "gpt2-tiny": (gpt2, dict(vocab_size=4096, dim=256, n_layers=4, n_heads=4, ffn_dim=1024)),
    # dry-run stand-ins (benchmarks/gpu.sh --quick): seconds to compile
    "llama-micro": (llama, dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=172)),
    "gpt2-micro": (gpt2, dict(vocab_size=512, dim=64, n_layers=2, n_heads=4, ffn_dim=256)),
}
FRACTIONS = (1.0, 0.75, 0.5, 0.4)


def linear_flops_per_token(params, model) -> int:
    """2 * (weights of every projection + the LM head); embeddings lookups and norms excluded."""
    skip = {"embed", "wpe", "inv_freq"}
    total = 0
    for path, leaf in zip(*optree.tree_flatten_with_path(params)[:2]):
        if leaf.ndim >= 2 and path[-1] not in skip:
            total += leaf.numel()
    if model is llama and "lm_head" not in params:
        total += params["embed"].numel()  # tied head: one leaf used twice
    return 2 * total


def nbytes(tree) -> int:
    return sum(x.numel() * x.element_size() for x in optree.tree_leaves(tree))


def shrink(params, groups, fraction, multiple_of: int = 1):
    if fraction >= 1.0:
        return params
    scores = {g.name: torch.arange(g.sizes(params)[1], dtype=torch.float64).expand(g.sizes(params))
              for g in groups}
    return ecospa.pruner(groups, sparsity=1.0 - fraction, multiple_of=multiple_of)(params, scores)


def _no_grad(fn, *args):
    with torch.no_grad():
        return fn(*args)


BACKEND = {"name": "inductor"}  # --compile-backend (aot_eager: the CPU dry run, no codegen)


def compiled(fn):
    """The compiled path users run: one graph (fullgraph), static shapes (a pruned tree is a new
    set of shapes: one compile each, never a dynamic-shape graph)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=BACKEND["name"])


def _raise_recompile_limit(n: int = 256) -> None:
    """Every variant x batch is its own set of shapes; dynamo's default limit (8 per code object)
    would silently fall back to eager after the 8th."""
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(n, getattr(torch._dynamo.config, name)))


def first_call_s(fn, device) -> float:
    """Seconds of the first call (compile + one run)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved_medians(jobs: dict, device: str, warmup: int, reps: int) -> dict:
    """Median time of every thunk in ``jobs``, timing rep r of all of them before rep r+1."""
    for fn in jobs.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in jobs}
    for _ in range(reps):
        for k, fn in jobs.items():
            times[k].append(median_time(fn, device, 0, 1))
    return {k: statistics.median(v) for k, v in times.items()}


def bench_model(name, args, device, dtype, save=lambda rows, ov: None):
    module, kw = MODELS[name]
    cfg = module.Config(**kw, **({"max_seq_len": max(1024, args.seq)} if module is gpt2 else {}))
    dense = module.init(cfg, seed=0, dtype=dtype)
    dense = optree.tree_map(lambda x: x.to(device), dense)
    groups = module.coupled_groups(cfg)
    gen = torch.Generator().manual_seed(0)
    toks = {b: torch.randint(0, cfg.vocab_size, (b, args.seq + 1), generator=gen).to(device)
            for b in (1, args.train_batch, 8)}
    opt = optim.adamw(1e-4)

    def loss_fn(p, batch):
        logits = module.forward(p, batch[:, :-1], cfg)
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())

    # Build every variant first, then time them INTERLEAVED (rep r of every variant before rep
    # r+1 of any): slow drifts in machine load then hit dense and pruned alike.
    grad_fn = torch.func.grad_and_value(loss_fn)
    variants = []
    for frac in args.fractions:
        p = shrink(dense, groups, frac, args.multiple_of)
        variants.append((frac, p, opt.init(p)))
    modes = ["eager"] + (["compiled"] if args.compile else [])
    rows = [{"model": name, "kept_fraction": frac, "params": sum(x.numel() for x in optree.tree_leaves(p)),
             "linear_flops_per_token": linear_flops_per_token(p, module),
             "train_state_bytes": 4 * nbytes(p)}  # params + grads + mu + nu
            for frac, p, _ in variants]
    base = rows[0]
    for r in rows:
        r["flop_ideal_speedup"] = base["linear_flops_per_token"] / r["linear_flops_per_token"]
        r["memory_ratio"] = r["train_state_bytes"] / base["train_state_bytes"]
        r["params_ratio"] = r["params"] / base["params"]
    ov = None
    for mode in modes:
        fwd = module.forward if mode == "eager" else compiled(module.forward)
        step_grad = grad_fn if mode == "eager" else compiled(grad_fn)
        jobs = {}  # (variant index, metric) -> thunk
        for i, (frac, p, state) in enumerate(variants):
            for b in args.prefill_batches:
                jobs[i, f"prefill_b{b}_{mode}_s"] = (lambda p=p, x=toks[b][:, :-1]: _no_grad(fwd, p, x, cfg))
            jobs[i, f"train_step_{mode}_s"] = (
                lambda p=p, state=state: opt.update(step_grad(p, toks[args.train_batch])[0], state, p))
        if mode == "compiled":
            for (i, key), fn in jobs.items():
                rows[i][key[: -len("_s")] + "_compile_s"] = first_call_s(fn, device)
        for (i, key), t in interleaved_medians(jobs, device, args.warmup, args.reps).items():
            rows[i][key] = t
        if args.memory:  # measured after the timing (compiled: after the compile)
            for i, (frac, p, _) in enumerate(variants):
                def step_from_scratch(p=p):  # params and AdamW state allocated inside the window
                    q = optree.tree_map(torch.clone, p)
                    g, _ = step_grad(q, toks[args.train_batch])
                    return opt.update(g, opt.init(q), q)
                rows[i][f"train_peak_bytes_{mode}"] = peak_bytes(step_from_scratch, device)
        _ratios(rows)
        save(rows, ov)
    for r in rows:
        print(f"  {name} kept={r['kept_fraction']:.2f} " + " ".join(
            f"{k}={v:.4g}" for k, v in r.items() if k.endswith("_s")), flush=True)
    if args.overhead:
        ov = overhead(module, cfg, dense, toks[8][:, :-1], device, args)
        save(rows, ov)
    return rows, ov


def _ratios(rows) -> None:
    """Speedups, efficiencies and measured-memory ratios against the dense row (rows[0])."""
    base = rows[0]
    for r in rows:
        for k in [k for k in r if k.endswith("_s") and not k.endswith("_compile_s")]:
            stem = k[: -len("_s")]
            r[stem + "_speedup"] = base[k] / r[k]
            r[stem + "_efficiency"] = r[stem + "_speedup"] / r["flop_ideal_speedup"]
        for k in [k for k in r if k.startswith("train_peak_bytes_")]:
            r[k.replace("train_peak_bytes_", "train_peak_ratio_")] = r[k] / base[k]


def overhead(module, cfg, params, x, device, args):
    """ecospa's functional forward vs transformers' forward on the same weights, eager and (with
    --compile) both compiled; all four timed interleaved in one run."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers not installed"}
    sd, conf = hf_family_of(cfg).to_hf(params, cfg)
    # the exported config names the class (LLaMA with biases exports as Qwen2)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**conf)).eval()
    hf = hf.to(device=device, dtype=params["layers"][0]["wq"].dtype)
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    jobs = {"hf_eager": lambda: hf(x).logits, "fn_eager": lambda: module.forward(params, x, cfg)}
    out = {"batch": x.shape[0], "seq": x.shape[1]}
    with torch.no_grad():
        if args.compile:
            # transformers' own graph breaks allowed; ecospa's forward at these shapes was compiled
            # for the prefill table already (same code, same shapes: a cache hit, no compile time)
            hf_c = torch.compile(hf, dynamic=False, backend=BACKEND["name"])
            fn_c = compiled(module.forward)
            jobs.update(hf_compiled=lambda: hf_c(x).logits, fn_compiled=lambda: fn_c(params, x, cfg))
            out["hf_compile_s"] = first_call_s(jobs["hf_compiled"], device)
            first_call_s(jobs["fn_compiled"], device)
        t = interleaved_medians(jobs, device, args.warmup, args.overhead_reps)
    out["reps"] = args.overhead_reps
    out.update({f"{k}_s": v for k, v in t.items()})
    out["transformers_s"], out["ecospa_s"] = t["hf_eager"], t["fn_eager"]  # names of earlier results
    out["ecospa_over_transformers"] = t["fn_eager"] / t["hf_eager"]
    if args.compile:
        out["ecospa_compiled_over_transformers_compiled"] = t["fn_compiled"] / t["hf_compiled"]
        out["ecospa_compiled_over_transformers_eager"] = t["fn_compiled"] / t["hf_eager"]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, few repetitions (CI smoke)")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--train-batch", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--compile", action="store_true",
                    help="also time torch.compile(fullgraph=True, dynamic=False) forward and step")
    ap.add_argument("--compile-backend", default="inductor",
                    help="torch.compile backend (aot_eager: traces fullgraph without codegen, for dry runs)")
    ap.add_argument("--fractions", type=float, nargs="*", default=list(FRACTIONS),
                    help="kept fractions; the first is the baseline (default: 1.0 0.75 0.5 0.4)")
    ap.add_argument("--prefill-batches", type=int, nargs="*", default=[1, 8])
    ap.add_argument("--multiple-of", type=int, default=1,
                    help="prune with ecospa.pruner(multiple_of=): kept widths in multiples of this")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    ap.add_argument("--no-overhead", dest="overhead", action="store_false")
    ap.add_argument("--overhead-reps", type=int, default=None,
                    help="interleaved repetitions of the overhead comparison (default: 3x --reps; the "
                         "ratio sits near 1.0, where 7 reps on a shared CPU swing it by 5-10%%)")
    ap.add_argument("--only-overhead", action="store_true",
                    help="only ecospa vs transformers (dense, same weights); merged into --out's 'overhead'")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the measured peak training-step memory")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of other models already in --out (one model per invocation)")
    ap.add_argument("--load", default=None, help="what else ran on the machine (recorded in conditions)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    _raise_recompile_limit()
    BACKEND["name"] = args.compile_backend
    q = args.quick
    args.models = args.models or (["llama-tiny", "gpt2-tiny"] if q else ["llama-60m", "gpt2-small"])
    args.seq = args.seq or (64 if q else 256)
    args.train_batch = args.train_batch or (2 if q else 4)
    args.warmup = args.warmup if args.warmup is not None else (1 if q else 2)
    args.reps = args.reps or (3 if q else 7)
    args.overhead_reps = args.overhead_reps or 3 * args.reps
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                        f"speed{'_quick' if q else ''}_{args.device}.json")
    dtype = getattr(torch, args.dtype)
    cond = conditions(args.device, dtype, seq=args.seq, train_batch=args.train_batch, warmup=args.warmup,
                      reps=args.reps, compile=args.compile,
                      compile_mode=(f"torch.compile(fullgraph=True, dynamic=False, backend={args.compile_backend!r})"
                                    if args.compile else None), models=args.models, fractions=args.fractions,
                      prefill_batches=args.prefill_batches, multiple_of=args.multiple_of,
                      load=args.load or f"loadavg {os.getloadavg()[0]:.2f} at start",
                      timing="interleaved: rep r of every variant before rep r+1 of any; medians",
                      memory="peak bytes allocated during (clone params, AdamW init, one step): "
                             + ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
                                else "torch.profiler memory events (CPU allocator)"))
    print("conditions:", cond, flush=True)
    results = {"conditions": cond, "rows": [], "overhead": {}}
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        results["rows"] = [r for r in old.get("rows", []) if r["model"] not in args.models]
        results["overhead"] = {k: v for k, v in (old.get("overhead") or {}).items() if k not in args.models}
        results["conditions_of_other_models"] = {**old.get("conditions_of_other_models", {}), **{
            m: old["conditions"] for m in {r["model"] for r in results["rows"]}}}
    if args.only_overhead:
        old = json.load(open(args.out)) if os.path.exists(args.out) else {"conditions": cond, "rows": []}
        old.setdefault("overhead", {})
        for name in args.models:
            module, kw = MODELS[name]
            cfg = module.Config(**kw, **({"max_seq_len": max(1024, args.seq)} if module is gpt2 else {}))
            dense = optree.tree_map(lambda x: x.to(args.device), module.init(cfg, seed=0, dtype=dtype))
            x = torch.randint(0, cfg.vocab_size, (8, args.seq), generator=torch.Generator().manual_seed(0))
            old["overhead"][name] = {**overhead(module, cfg, dense, x.to(args.device), args.device, args), "conditions": cond}
            print(name, old["overhead"][name], flush=True)
            write_results(args.out, old)
        return
    kept_rows = list(results["rows"])
    for name in args.models:
        def save(rows, ov, name=name):  # after each mode of each model: a killed run keeps what it measured
            results["rows"] = kept_rows + rows
            results["overhead"][name] = ov
            write_results(args.out, results)
        rows, ov = bench_model(name, args, args.device, dtype, save)
        kept_rows += rows
    for r in results["rows"]:
        print(f"{r['model']:>11} kept={r['kept_fraction']:.2f} ideal={r['flop_ideal_speedup']:.2f}x " + " ".join(
            f"{k[:-len('_speedup')]}={r[k]:.2f}x" for k in r if k.endswith("_speedup") and k != "flop_ideal_speedup")
            + " ".join(f" {k}={r[k]:.2f}" for k in r if k.startswith("train_peak_ratio")))
    print("overhead:", results["overhead"])


if __name__ == "__main__":
    main()
