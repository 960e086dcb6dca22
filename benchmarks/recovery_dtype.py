"""Time of one recovery step of ``ecospa compress`` in float32 vs ``--recovery-dtype bfloat16``
(torch.autocast), alternated in one process, at SmolLM2-135M's shape.

    python benchmarks/recovery_dtype.py            # SmolLM2-135M's shape, 4 x 256 tokens (~3 min, 2 cores)
    python benchmarks/recovery_dtype.py --quick    # a tiny shape, seconds (tests); writes recovery_dtype_quick.json

The step is the job's: the layer-wise gradient of the distillation loss (KL weight 0.5) to the
dense teacher, then AdamW in place. Random weights of the real shape with half of every group's
units kept by random scores (the time does not depend on the values). The two dtypes alternate,
each with its own copy of the student and AdamW state, on the same batches; medians over
``--reps`` steps after one warm-up step each, the ratio to float32 measured in the same run, the
losses of the two on the first batch, and the CPU's features (a bfloat16 matmul is fast only with
AVX512-BF16 or AMX: elsewhere the ratio is far above 1). Writes benchmarks/results/recovery_dtype.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from obs_refit import SHAPES  # noqa: E402  (the same shapes)

DTYPES = ("float32", "bfloat16")


def run(shape: str, rows: int, seq: int, reps: int) -> dict:
    from _common import conditions
    from ecospa import optim
    from ecospa.func import llama
    from ecospa.func.families import family_of
    from ecospa.func.layerwise import distill_loss, layer_grad_and_value
    from ecospa.jobs.compress import autocast
    from ecospa.prune import slice_units
    from ecospa.select import select

    cfg = llama.Config(**SHAPES[shape])
    fam = family_of(cfg)
    dense = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)
    gen = torch.Generator().manual_seed(1)
    scores = {g.name: torch.rand(g.sizes(dense), generator=gen, dtype=torch.float64) for g in groups}
    student = slice_units(dense, groups, select(dense, groups, scores, sparsity=0.5))
    batches = [torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen) for _ in range(reps + 1)]
    grad_fn = layer_grad_and_value(fam, cfg, distill_loss(fam, cfg, dense, 0.5))
    opt = optim.adamw(2e-4, weight_decay=0.0)
    state = {}
    for d in DTYPES:
        p = torch.utils._pytree.tree_map(lambda x: x.clone(), student)
        state[d] = [p, opt.init(p), grad_fn if d == "float32" else autocast(grad_fn, d)]
    load = [os.getloadavg()[0]]
    times, first_loss = {d: [] for d in DTYPES}, {}
    for i, batch in enumerate(batches):
        for d in DTYPES:
            p, s, fn = state[d]
            t0 = time.perf_counter()
            grads, loss = fn(p, batch)
            p, s = opt.update(grads, s, p, donate=True)
            del grads
            dt = time.perf_counter() - t0
            state[d][:2] = p, s
            if i == 0:
                first_loss[d] = float(loss)
            else:  # the first step of each is a warm-up
                times[d].append(dt)
            print(f"step {i} {d}: {dt:.2f} s, loss {float(loss):.4f}", flush=True)
    load.append(os.getloadavg()[0])
    med = {d: statistics.median(v) for d, v in times.items()}
    cond = conditions("cpu", torch.float32, shape=shape, rows=rows, seq=seq, reps=reps,
                      load_avg_start=load[0], load_avg_end=load[1])
    table = [{"recovery_dtype": d, "median_s": round(med[d], 4), "times_s": " ".join(f"{t:.2f}" for t in times[d]),
              "ratio": round(med[d] / med["float32"], 3), "first_loss": round(first_loss[d], 6)} for d in DTYPES]
    return {"conditions": cond, "table": table}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (seconds); writes recovery_dtype_quick.json")
    ap.add_argument("--reps", type=int, default=5, help="measured steps of each dtype (after one warm-up step)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/recovery_dtype[_quick].json)")
    args = ap.parse_args(argv)
    from _common import write_results
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, rows, seq = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 256)
    res = run(shape, rows, seq, args.reps)
    print(json.dumps(res["conditions"]))
    for r in res["table"]:
        print(f"{r['recovery_dtype']}: median {r['median_s']} s ({r['times_s']}), ratio {r['ratio']}, "
              f"first loss {r['first_loss']}")
    path = args.out or os.path.join(RESULTS, "recovery_dtype_quick.json" if args.quick else "recovery_dtype.json")
    write_results(path, res)


if __name__ == "__main__":
    main()
