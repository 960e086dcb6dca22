"""Pre-training quality: EcoSpa vs dense, a dense model of the same final size, and ablations.

    python benchmarks/pretrain.py --preset small   # the capacity-bound CPU regime (1800 steps: 8-13 min a variant, 1 core)
    python benchmarks/pretrain.py --quick          # a few dozen steps per variant (CI smoke)
    python benchmarks/pretrain.py --search --variants dense dense-small --dim 128 --steps 900
                                                   # one point of the regime search (appended to
                                                   # benchmarks/results/pretrain_search.json)

Same data, steps, seed and learning-rate schedule for every variant:
  dense        the full model, never pruned
  dense-small  a dense model whose ffn and head widths are scaled so its parameter count matches
               EcoSpa's final one (EcoSpa's row when it ran first, else the dense count minus
               ``--budget`` of the group parameters): the honest baseline, is sparse training
               better than just training a smaller model?
  ecospa       coupled Fisher importance, pruning rounds from the preset's schedule
  uncoupled / magnitude / random   the same schedule with other importance estimators
Levers of the schedule (``--tag`` labels their rows): --rounds / --every / --prune-start / --window /
--ramp, --gradual START END (many small rounds spread over that span), --decay-steps (soft removal),
--distill-steps / --distill-weight (self-distillation), --carry (importance across rounds), --rewarm, --moments, --sparsity; --seed for a
second seed.
Every run is one thread (``--threads``). Rows carry the final val ppl, training FLOPs
(``ecospa.train.flops``: from the shapes each step used), wall time, peak memory and the curve
(val ppl against steps and FLOPs). Writes benchmarks/results/pretrain.json (conditions, rows, a
README table); ``--merge`` keeps the other variants' rows already in the file (so variants can run
in separate processes), ``--search`` appends the rows to the regime search file instead.
"""
from __future__ import annotations

import argparse
import dataclasses
import fcntl
import json
import os
import sys
import tempfile

import torch

from ecospa.func.families import family_of
from ecospa.schedule import PruneSchedule, dense_sizes, respread
from ecospa.train import count_params, presets, train
from ecospa.train.flops import train_step_flops

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


def budget_target(model, budget: float) -> int:
    """Parameters left when ``budget`` of the coupled groups' parameters is removed."""
    fam = family_of(model)
    params = fam.init(model, 0)
    group0 = sum(v[1] for v in dense_sizes(params, fam.coupled_groups(model)).values())
    return round(count_params(params) - budget * group0)


def run(cfg, name, out_root):
    cfg = dataclasses.replace(cfg, out=os.path.join(out_root, name))
    print(f"== {name}: {cfg.steps} steps", flush=True)
    r = train(cfg, progress=False, overwrite=True)
    with open(os.path.join(cfg.out, "metrics.jsonl")) as f:
        lines = [json.loads(x) for x in f if x.strip()]
    curve = [[m["step"], m["val_ppl"], m.get("train_flops")] for m in lines if "val_ppl" in m]
    row = {"variant": name, "params": r["kept_params"], "dense_params": r["dense_params"],
           "val_ppl": r["val_ppl"], "train_flops": r.get("train_flops"), "wall_s": r["wall_s"],
           "peak_mem_mb": r["peak_mem_mb"],
           "tokens_per_s_final": r["tokens_per_s_pruned"] or r["tokens_per_s_dense"],
           "final_loss": r["losses"][-1], "rounds": r["rounds"], "schedule": dataclasses.asdict(cfg.prune),
           "lr": cfg.lr, "seed": cfg.seed, "steps": cfg.steps, "curve": curve}
    print(f"   { {k: v for k, v in row.items() if k != 'curve'} }", flush=True)
    return row


def locked_update(path: str, update) -> dict:
    """Read ``path`` (JSON, {} when absent), apply ``update(payload) -> payload``, write it back,
    all under an exclusive lock (variants may run in parallel processes)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        payload = {}
        if os.path.exists(path):
            with open(path) as f:
                payload = json.load(f)
        payload = update(payload)
        write_results(path, payload)
    return payload


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--budget", type=float, default=0.5, help="fraction of group parameters removed")
    ap.add_argument("--variants", nargs="*", default=["dense", "ecospa", "dense-small", "uncoupled",
                                                       "magnitude", "random"])
    ap.add_argument("--out", default=None)
    ap.add_argument("--merge", action="store_true", help="keep other variants' rows already in --out")
    ap.add_argument("--search", action="store_true",
                    help="append the rows to benchmarks/results/pretrain_search.json (regime search)")
    ap.add_argument("--threads", type=int, default=1)
    for k in ("dim", "layers", "ffn", "seq-len", "batch-size", "eval-every"):
        ap.add_argument(f"--{k}", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--prune-start", type=int, default=None, help="dense steps before the first window")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--every", type=int, default=None)
    ap.add_argument("--window", type=int, default=None, help="Fisher estimation steps before each round (lever)")
    ap.add_argument("--ramp", choices=["cubic", "linear"], default=None, help="how the target grows over the rounds (lever)")
    ap.add_argument("--sparsity", type=float, default=None,
                    help="the same fraction of units removed in every group instead of the global --budget (lever)")
    ap.add_argument("--rewarm", type=int, default=None, help="lr re-warm steps after each round (lever)")
    ap.add_argument("--moments", choices=["carry", "reset"], default=None, help="AdamW moments after a round (lever)")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="self-distillation from the pre-round snapshot until this many steps after each "
                         "round's slicing (PruneSchedule.distill_steps; default 0)")
    ap.add_argument("--distill-weight", type=float, default=None,
                    help="the KL term's weight while self-distilling (default 0.5)")
    ap.add_argument("--carry", type=float, default=None,
                    help="importance carried across rounds (PruneSchedule.carry, in [0, 1); default 0) (lever)")
    ap.add_argument("--decay-steps", type=int, default=None,
                    help="soft removal: the units a round chooses ramp to exactly 0 over this many steps, "
                         "then are sliced (counted as dense FLOPs until then) (lever)")
    ap.add_argument("--gradual", type=float, nargs=2, metavar=("START", "END"), default=None,
                    help="gradual shrinking: spread the --rounds evenly from START to END (fractions of the "
                         "steps, e.g. 0.25 0.75) (lever)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the init and the batches (default: the preset's, 0)")
    ap.add_argument("--tag", default=None, help="a label for this run's rows (levers, search points)")
    ap.add_argument("--reuse-search", action="store_true",
                    help="copy the dense / dense-small rows of this exact configuration from the search "
                         "file instead of rerunning them (with --merge)")
    ap.add_argument("--note", action="append", default=[], help="a line for the results' notes (with --merge)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = presets.get(args.preset)
    model = base.model
    if args.dim or args.layers or args.ffn or args.seq_len:
        heads = base.model.n_heads
        model = dataclasses.replace(model, dim=args.dim or model.dim, n_layers=args.layers or model.n_layers,
                                    ffn_dim=args.ffn or model.ffn_dim, head_dim=(args.dim or model.dim) // heads,
                                    max_seq_len=max(model.max_seq_len, args.seq_len or 0))
    base = dataclasses.replace(base, model=model, seq_len=args.seq_len or base.seq_len,
                               batch_size=args.batch_size or base.batch_size, lr=args.lr or base.lr,
                               eval_every=args.eval_every or base.eval_every)
    steps = args.steps or (40 if args.quick else base.steps)
    sched = base.prune
    if args.quick:  # the same code path at toy size (pydoc text): seconds per variant
        sched = PruneSchedule(warmup_steps=10, window=5, rounds=2, every=8, ramp=sched.ramp, budget=args.budget)
        base = dataclasses.replace(presets.shrink(base, steps=steps, dim=32, n_layers=2, batch_size=4, seq_len=32),
                                   eval_every=20, eval_batches=2, log_every=10)
    else:
        sched = dataclasses.replace(sched, sparsity=None, budget=args.budget)
    if args.prune_start is not None or args.rounds is not None or args.every is not None:
        sched = dataclasses.replace(sched, warmup_steps=sched.warmup_steps if args.prune_start is None else args.prune_start,
                                    rounds=args.rounds or sched.rounds, every=args.every or sched.every)
    if args.sparsity is not None:
        sched = dataclasses.replace(sched, sparsity=args.sparsity, budget=None)
    if args.window is not None or args.ramp is not None:
        sched = dataclasses.replace(sched, window=args.window or sched.window, ramp=args.ramp or sched.ramp)
    if args.rewarm is not None or args.moments is not None:
        sched = dataclasses.replace(sched, rewarm=args.rewarm or 0, moments=args.moments or "carry")
    if args.decay_steps is not None:
        sched = dataclasses.replace(sched, decay_steps=args.decay_steps)
    if args.distill_steps is not None:
        sched = dataclasses.replace(sched, distill_steps=args.distill_steps,
                                    distill_weight=sched.distill_weight if args.distill_weight is None
                                    else args.distill_weight)
    if args.carry is not None:
        sched = dataclasses.replace(sched, carry=args.carry)
    if args.gradual is not None:
        sched = respread(sched, steps, *args.gradual)
    base = dataclasses.replace(base, steps=steps, prune=sched,
                               seed=base.seed if args.seed is None else args.seed)
    results = os.path.join(os.path.dirname(__file__), "results")
    out = args.out or os.path.join(results, "pretrain_search.json" if args.search else
                                   f"pretrain{'_quick' if args.quick else ''}.json")
    cond = conditions(base.device, getattr(torch, base.dtype), preset=args.preset, steps=steps,
                      batch_size=base.batch_size, seq_len=base.seq_len, seed=base.seed, budget=args.budget,
                      lr=base.lr, schedule=dataclasses.asdict(sched), data=base.data,
                      model=dataclasses.asdict(base.model),
                      tokens_seen=steps * base.batch_size * base.seq_len,
                      dense_train_flops=steps * train_step_flops(family_of(base.model).init(base.model, 0),
                                                                 base.model.name, base.batch_size, base.seq_len))
    print("conditions:", cond, flush=True)
    rows = []
    dense_sched = PruneSchedule(rounds=0)

    def save(payload):
        if args.search:
            payload.setdefault("runs", []).extend(dict(r, conditions=cond) for r in rows[-1:])
            payload["table"] = search_table(payload["runs"])
            return payload
        keep = [r for r in payload.get("rows", []) if args.merge and r["variant"] not in {x["variant"] for x in rows}]
        order = {v: i for i, v in enumerate(["dense", "dense-small", "ecospa", "uncoupled", "magnitude", "random"])}
        merged = sorted(keep + rows, key=lambda r: (order.get(r["variant"].split("@")[0], 99), r["variant"]))
        extra = {k: v for k, v in payload.items() if args.merge and k not in ("conditions", "rows", "table")}
        if args.note:
            extra["notes"] = extra.get("notes", []) + [n for n in args.note if n not in extra.get("notes", [])]
        main_cond = payload.get("conditions") if args.tag and args.merge and payload.get("conditions") else cond
        return {**extra, "conditions": main_cond, "rows": merged,
                "table": _table(merged, main_cond.get("dense_train_flops"))}

    if args.reuse_search or (args.note and not args.variants):
        same = ("model", "steps", "lr", "seq_len", "batch_size", "data", "seed")
        path = os.path.join(results, "pretrain_search.json")
        runs = (json.load(open(path)).get("runs", []) if args.reuse_search and os.path.exists(path) else [])
        found = {r["variant"]: r for r in runs  # the latest run of each variant
                 if r["variant"] in args.variants and all(r["conditions"].get(k) == cond[k] for k in same)}
        rows += [{**{k: v for k, v in r.items() if k != "conditions"}, "reused_from": "pretrain_search.json"}
                 for r in found.values()]
        print(f"reused {[r['variant'] for r in rows]} from {path}" if args.reuse_search else "notes", flush=True)
        locked_update(out, save)
        return
    with tempfile.TemporaryDirectory() as tmp:
        for v in args.variants:
            if v == "dense":
                rows.append(run(dataclasses.replace(base, prune=dense_sched), v, tmp))
            elif v == "dense-small":
                ref = next((r for r in rows if r["variant"] == "ecospa"), None)
                target = ref["params"] if ref else budget_target(base.model, args.budget)
                small = matching_model(base.model, target)
                rows.append(run(dataclasses.replace(base, model=small, prune=dense_sched), v, tmp))
                rows[-1]["model"] = f"head_dim={small.head_dim} ffn_dim={small.ffn_dim}"
            else:
                est = "fisher" if v == "ecospa" else v
                rows.append(run(dataclasses.replace(base, estimator=est), v, tmp))
            if args.tag:
                rows[-1]["variant"] = f"{v}@{args.tag}"
            locked_update(out, save)
    for r in _table(rows, cond["dense_train_flops"]):
        print(r)


def search_table(runs):
    """One line per searched configuration: dense-full vs dense-small at equal steps, compared at
    the last evaluation both reached (runs cut at a deadline carry only a ``note``: the preset's
    model, batch and sequence length)."""
    small = presets.get("small")
    points: dict = {}
    for r in runs:
        c = r["conditions"]
        m = c.get("model") or dataclasses.asdict(small.model)
        key = (m["dim"], m["n_layers"], m["ffn_dim"], c.get("seq_len", small.seq_len),
               c.get("batch_size", small.batch_size), c["lr"], c["steps"])
        points.setdefault(key, {})[r["variant"].split("@")[0]] = r  # the latest run of each variant
    table = []
    for (dim, layers, ffn, seq, batch, lr, steps), got in points.items():
        d, s = got.get("dense"), got.get("dense-small")
        if not d or not s:
            continue
        dc, sc = ({step: ppl for step, ppl, *_ in x["curve"]} for x in (d, s))
        common = sorted(set(dc) & set(sc))
        if not common:
            continue
        at = common[-1]
        table.append({"dim": dim, "layers": layers, "ffn": ffn, "seq": seq, "batch": batch, "lr": lr,
                      "planned steps": steps, "compared at step": at, "tokens (M)": at * batch * seq / 1e6,
                      "dense ppl": dc[at], "dense-small ppl": sc[at], "small / dense": sc[at] / dc[at],
                      "small/dense by step": "; ".join(f"{t}: {sc[t] / dc[t]:.3f}" for t in common)})
    return table


def _table(rows, dense_train_flops=None):
    """One line per row; "FLOPs / dense" against the dense row, or without one against
    ``dense_train_flops`` (the dense model's FLOPs, counted from its shapes: the same number)."""
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    if dense is None and dense_train_flops:
        dense = {"val_ppl": float("nan"), "train_flops": dense_train_flops}
    small = next((r for r in rows if r["variant"] == "dense-small"), None)
    table = []
    for r in rows:
        t = {"variant": r["variant"], "params (M)": r["params"] / 1e6, "val ppl": r["val_ppl"]}
        t["ppl / dense"] = r["val_ppl"] / dense["val_ppl"] if dense else float("nan")
        t["ppl / dense-small"] = r["val_ppl"] / small["val_ppl"] if small else float("nan")
        flops = r.get("train_flops")
        t["train PFLOPs"] = flops / 1e15 if flops else float("nan")
        t["FLOPs / dense"] = flops / dense["train_flops"] if flops and dense and dense.get("train_flops") else float("nan")
        t["tokens/s (final phase)"] = r["tokens_per_s_final"]
        t["wall s"] = r["wall_s"]
        t["peak MB"] = r.get("peak_mem_mb", float("nan"))
        table.append(t)
    return table


if __name__ == "__main__":
    main()
