"""Time of the job's gradient-free core: the obs scores, the slicing and the refit done apart
(``obs_scores`` + ``slice_units`` + ``reconstruct``, the job before session 16) vs in one pass
(``obs_refit``, the job's default now), alternated in one process, at SmolLM2-135M's shape.

    python benchmarks/obs_refit.py                # SmolLM2-135M's shape, 8 batches of 4 x 256 (~10 min, 2 cores)
    python benchmarks/obs_refit.py --quick        # a tiny shape, seconds (tests); writes obs_refit_quick.json

Random weights of the real shape (dim 576, 30 layers, 9/3 heads, SwiGLU 1536): the time does not
depend on the values. The kept units: half of every group by random scores (the counts of a 50%
job; the obs scores then choose the vo/mlp units, as in the job). Both paths as the job calls
them (ridge 0.1, obs ridge 0.01, the inner activations recomputed after each solve); the fused
path also keeps the model before the refit (the job evaluates it). Medians over ``--reps``
alternating repetitions, the ratio to the separate path measured in the same run, the largest
difference between the two results (it should be 0), and the machine's load before and after.
Writes benchmarks/results/obs_refit.json.
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

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         max_seq_len=2048),
    "tiny": dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64),
}


def run(shape: str, batches: int, rows: int, seq: int, reps: int) -> dict:
    from _common import conditions
    from ecospa.func import llama
    from ecospa.func.reconstruct import obs_refit, obs_scores, reconstruct
    from ecospa.prune import slice_units
    from ecospa.select import keep_top, select

    cfg = llama.Config(**SHAPES[shape])
    dense = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)
    gen = torch.Generator().manual_seed(1)
    scores = {g.name: torch.rand(g.sizes(dense), generator=gen, dtype=torch.float64) for g in groups}
    keep = select(dense, groups, scores, sparsity=0.5)
    calib = [torch.randint(0, cfg.vocab_size, (rows, seq), generator=gen) for _ in range(batches)]

    def separate():
        obs = obs_scores(dense, cfg, groups, calib, ridge=0.01)
        chosen = {**keep, **{n: keep_top(s, keep[n].shape[1]) for n, s in obs.items()}}
        return reconstruct(slice_units(dense, groups, chosen), dense, cfg, calib, ridge=0.1, donate=True,
                           cache_inner=False)

    def fused():
        return obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.1, obs_ridge=0.01, keep_pruned=True,
                         cache_inner=False).params

    load = [os.getloadavg()[0]]
    times = {"separate": [], "fused": []}
    out = {}
    for _ in range(reps):
        for name, fn in (("separate", separate), ("fused", fused)):
            t0 = time.perf_counter()
            out[name] = fn()
            times[name].append(time.perf_counter() - t0)
            print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    load.append(os.getloadavg()[0])
    diff = max(float((a - b).abs().max()) for la, lb in zip(out["separate"]["layers"], out["fused"]["layers"])
               for a, b in zip(la.values(), lb.values()))
    med = {k: statistics.median(v) for k, v in times.items()}
    cond = conditions("cpu", torch.float32, shape=shape, batches=batches, rows=rows, seq=seq, reps=reps,
                      load_avg_start=load[0], load_avg_end=load[1])
    table = [{"path": "obs_scores + slice_units + reconstruct (separate)", "median_s": round(med["separate"], 4),
              "times_s": " ".join(f"{t:.1f}" for t in times["separate"]), "ratio": 1.0},
             {"path": "obs_refit (one pass)", "median_s": round(med["fused"], 4),
              "times_s": " ".join(f"{t:.1f}" for t in times["fused"]),
              "ratio": round(med["fused"] / med["separate"], 3)}]
    return {"conditions": cond, "table": table, "max_abs_diff": diff}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a tiny shape (seconds); writes obs_refit_quick.json")
    ap.add_argument("--batches", type=int, default=8, help="refit batches (the job's default is 32)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="results file (default benchmarks/results/obs_refit[_quick].json)")
    args = ap.parse_args(argv)
    from _common import write_results
    if args.threads:
        torch.set_num_threads(args.threads)
    shape, rows, seq = ("tiny", 2, 16) if args.quick else ("smollm2-135m", 4, 256)
    res = run(shape, args.batches, rows, seq, args.reps)
    print(json.dumps(res["conditions"]))
    for r in res["table"]:
        print(f"{r['path']}: median {r['median_s']} s ({r['times_s']}), ratio {r['ratio']}")
    print(f"largest difference between the two results: {res['max_abs_diff']:.3g}")
    path = args.out or os.path.join(RESULTS, "obs_refit_quick.json" if args.quick else "obs_refit.json")
    write_results(path, res)


if __name__ == "__main__":
    main()
