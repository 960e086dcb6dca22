"""Pre-training quality: EcoSpa vs dense, a dense model of the same final size, and ablations.

    python benchmarks/pretrain.py             # the "tiny" preset, full length (tens of minutes on 2 cores)
    python benchmarks/pretrain.py --quick     # a few dozen steps per variant (CI smoke)

Same data, steps, seed and learning-rate schedule for every variant:
  dense        the full model, never pruned
  dense-small  a dense model whose ffn and head widths are scaled so its parameter count matches
               EcoSpa's final one (the honest baseline: is sparse training better than just
               training a smaller model?)
  ecospa       coupled Fisher importance, pruning rounds from the preset's schedule
  uncoupled / magnitude / random   the same schedule with other importance estimators
Writes benchmarks/results/pretrain.json (conditions, per-variant summaries, a README table).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import torch

from ecospa.func.families import family_of
from ecospa.schedule import PruneSchedule
from ecospa.train import count_params, presets, train

sys.path.insert(0, os.path.dirname(__file__))
from _common import conditions, write_results  # noqa: E402


def scaled_model(model, scale: float):
    """The same architecture with ffn and head widths scaled by ``scale`` (head dim kept even)."""
    head = max(2, 2 * round(model.head_dim * scale / 2))
    ffn = max(1, round(model.ffn_dim * scale))
    return dataclasses.replace(model, head_dim=head, ffn_dim=ffn)


def matching_model(model, target_params: int):
    """The scaled model whose parameter count is closest to ``target_params``."""
    init = family_of(model).init
    best = None
    for i in range(10, 101):
        m = scaled_model(model, i / 100)
        n = count_params(init(m, 0))
        if best is None or abs(n - target_params) < abs(best[1] - target_params):
            best = (m, n)
    return best[0]


def run(cfg, name, out_root):
    cfg = dataclasses.replace(cfg, out=os.path.join(out_root, name))
    print(f"== {name}: {cfg.steps} steps", flush=True)
    r = train(cfg, progress=False, overwrite=True)
    row = {"variant": name, "params": r["kept_params"], "dense_params": r["dense_params"],
           "val_ppl": r["val_ppl"], "wall_s": r["wall_s"],
           "tokens_per_s_final": r["tokens_per_s_pruned"] or r["tokens_per_s_dense"],
           "final_loss": r["losses"][-1]}
    print(f"   {row}", flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of group parameters removed")
    ap.add_argument("--variants", nargs="*", default=["dense", "ecospa", "dense-small", "uncoupled",
                                                       "magnitude", "random"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    base = presets.get(args.preset)
    steps = args.steps or (40 if args.quick else base.steps)
    sched = base.prune
    if args.quick:
        sched = PruneSchedule(warmup_steps=10, window=5, rounds=2, every=8, ramp=sched.ramp, budget=args.budget)
        base = dataclasses.replace(base, eval_every=steps, eval_batches=2, log_every=10)
    else:
        sched = dataclasses.replace(sched, sparsity=None, budget=args.budget)
    base = dataclasses.replace(base, steps=steps, prune=sched)
    out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                   f"pretrain{'_quick' if args.quick else ''}.json")
    cond = conditions(base.device, getattr(torch, base.dtype), preset=args.preset, steps=steps,
                      batch_size=base.batch_size, seq_len=base.seq_len, seed=base.seed, budget=args.budget,
                      schedule=dataclasses.asdict(sched), data=base.data, model=dataclasses.asdict(base.model))
    print("conditions:", cond, flush=True)
    rows = []
    dense_sched = PruneSchedule(rounds=0)
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            if v == "dense":
                rows.append(run(dataclasses.replace(base, prune=dense_sched), v, tmp))
            elif v == "dense-small":
                ref = next((r for r in rows if r["variant"] == "ecospa"), None)
                if ref is None:
                    raise ValueError("dense-small needs the ecospa variant to run first (it matches its size)")
                small = matching_model(base.model, ref["params"])
                rows.append(run(dataclasses.replace(base, model=small, prune=dense_sched), v, tmp))
                rows[-1]["model"] = f"head_dim={small.head_dim} ffn_dim={small.ffn_dim}"
            else:
                est = "fisher" if v == "ecospa" else v
                rows.append(run(dataclasses.replace(base, estimator=est), v, tmp))
            write_results(out, {"conditions": cond, "rows": rows, "table": _table(rows)})
    for r in _table(rows):
        print(r)


def _table(rows):
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    small = next((r for r in rows if r["variant"] == "dense-small"), None)
    table = []
    for r in rows:
        t = {"variant": r["variant"], "params (M)": r["params"] / 1e6, "val ppl": r["val_ppl"]}
        t["ppl / dense"] = r["val_ppl"] / dense["val_ppl"] if dense else float("nan")
        t["ppl / dense-small"] = r["val_ppl"] / small["val_ppl"] if small else float("nan")
        t["tokens/s (final phase)"] = r["tokens_per_s_final"]
        t["wall s"] = r["wall_s"]
        table.append(t)
    return table


if __name__ == "__main__":
    main()
