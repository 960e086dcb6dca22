"""Peak memory and time of one calibration batch and one recovery step at SmolLM2-135M's shape:
gradients of the whole forward vs one layer at a time (``--layerwise``), and AdamW's pure update
vs the in-place one (``donate=True``), each configuration in its own child process.

    python benchmarks/grad_memory.py            # SmolLM2-135M's shape, random weights (~10 min on 2 cores)
    python benchmarks/grad_memory.py --quick    # a tiny shape, seconds (tests); writes grad_memory_quick.json

Random weights of the real shape (dim 576, 30 layers, 9/3 heads, SwiGLU 1536, vocab 49152, tied):
memory and time do not depend on the values. Calibration: one batch of ``--calib-rows`` x 512
tokens, coupled Fisher. Recovery: a student with 50% of the coupled units removed, distilling
from the dense teacher (KL 0.5 + CE 0.5, the job's default), batch 4 x 256 tokens, ``--steps``
AdamW steps. As in the job: the whole graph differentiates one row at a time (``--micro-batch
1``), layer by layer the whole batch at once.
Peak = the child's ``ru_maxrss`` (the whole process: model, teacher, runtime); "base" = its RSS
before the measured work. Times are medians of the steps; the machine's load is printed.
Writes benchmarks/results/grad_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                         max_seq_len=2048),
    "tiny": dict(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64),
}


def child(kind: str, mode: str, donate: bool, shape: str, rows: int, seq: int, steps: int) -> dict:
    """One measurement, in this (fresh) process."""
    import resource

    import optree

    import torch

    import ecospa
    import ecospa.jobs.compress as jm
    from ecospa import optim
    from ecospa.func import llama
    from ecospa.func.families import FAMILIES
    from ecospa.func.layerwise import lm_layer_grads
    from ecospa.importance import coupled_fisher, fisher
    from ecospa.jobs.compress_job import Job
    from ecospa.train.step import lm_loss, make_step

    def rss_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    cfg = llama.Config(**SHAPES[shape])
    dense = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)
    gen = torch.Generator().manual_seed(0)
    times = []
    if kind == "calibrate":
        est = coupled_fisher(groups)
        batch = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen)
        grad_fn = lm_layer_grads(FAMILIES["llama"], cfg, est.reads) if mode == "layerwise" else None
        base = rss_mb()
        t = time.perf_counter()
        fisher(lm_loss(llama.forward, cfg), dense, groups, [batch], estimator=est,
               micro_batch=None if grad_fn else 1, grad_fn=grad_fn)
        times.append(time.perf_counter() - t)
    else:
        scores = {g.name: torch.rand(*g.sizes(dense), generator=gen) for g in groups}
        student = ecospa.slice_units(dense, groups, ecospa.select(dense, groups, scores, sparsity=0.5))
        student = jm._owned(student, dense)
        job = Job("smollm2-135m", budget=0.5, distill=True, layerwise=mode == "layerwise")
        _, loss, by_layer = jm._losses(FAMILIES["llama"], cfg, dense, job)
        opt = optim.adamw(2e-4, weight_decay=0.0)
        state = opt.init(student)
        step = make_step(loss, opt, micro_batch=None if by_layer else 1, grad_and_value=by_layer, donate=donate)
        batch = torch.randint(0, cfg.vocab_size, (rows, seq + 1), generator=gen)
        base = rss_mb()
        for _ in range(steps):
            t = time.perf_counter()
            out = step(student, state, batch)
            student, state = out.params, out.opt_state
            del out
            times.append(time.perf_counter() - t)
    fp32 = sum(x.numel() for x in optree.tree_leaves(dense, namespace="") if x.is_floating_point()) * 4 / 2**20
    return {"phase": kind, "grads": mode, "donate": donate, "rows": rows, "seq_len": seq,
            "base_rss_mb": round(base), "peak_rss_mb": round(rss_mb()), "dense_fp32_mb": round(fp32),
            "seconds_median": round(statistics.median(times), 2), "seconds": [round(x, 2) for x in times]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--calib-rows", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=7, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        import torch
        torch.set_num_threads(args.threads)
        kind, mode, donate, shape, rows, seq, steps = args.child
        print(json.dumps(child(kind, mode, donate == "1", shape, int(rows), int(seq), int(steps))))
        return 0
    shape = "tiny" if args.quick else "smollm2-135m"
    calib_seq, rec_rows, rec_seq = (16, 2, 16) if args.quick else (512, 4, 256)
    import platform

    import torch
    cond = {"shape": shape, **SHAPES[shape], "threads": args.threads, "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "python": platform.python_version(), "dtype": "float32",
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "load_avg_start": round(os.getloadavg()[0], 2),
            "MALLOC_MMAP_THRESHOLD_": "65536"}
    print("conditions:", json.dumps(cond), flush=True)
    runs = [("calibrate", m, False, args.calib_rows, calib_seq, 1) for m in ("whole", "layerwise")]
    runs += [("recover", m, d, rec_rows, rec_seq, args.steps) for d in (False, True) for m in ("whole", "layerwise")]
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=ROOT)
    for kind, mode, donate, r, seq, steps in runs:
        cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(args.threads), "--child", kind, mode,
               "1" if donate else "0", shape, str(r), str(seq), str(steps)]
        got = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if got.returncode:
            print(got.stderr[-3000:], file=sys.stderr)
            return 1
        row = json.loads(got.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    for kind in ("calibrate", "recover"):
        ref = next(r for r in rows if r["phase"] == kind and r["grads"] == "whole" and not r["donate"])
        for r in rows:
            if r["phase"] == kind:
                r["extra_over_whole"] = round((r["peak_rss_mb"] - r["base_rss_mb"]) /
                                              max(1, ref["peak_rss_mb"] - ref["base_rss_mb"]), 3)
                r["time_over_whole"] = round(r["seconds_median"] / ref["seconds_median"], 3)
    cond["load_avg_end"] = round(os.getloadavg()[0], 2)
    out = args.out or os.path.join(RESULTS, "grad_memory_quick.json" if args.quick else "grad_memory.json")
    tmp = out + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"conditions": cond, "rows": rows}, f, indent=1)
    os.replace(tmp, out)
    print(f"{'phase':10} {'grads':10} {'donate':7} {'base MB':>8} {'peak MB':>8} {'extra/whole':>11} {'s':>7} {'t/whole':>7}")
    for r in rows:
        print(f"{r['phase']:10} {r['grads']:10} {str(r['donate']):7} {r['base_rss_mb']:8} {r['peak_rss_mb']:8} "
              f"{r['extra_over_whole']:11} {r['seconds_median']:7} {r['time_over_whole']:7}")
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
