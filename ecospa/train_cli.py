"""``ecospa train``: coupled sparse pre-training from scratch (default: the tiny CPU demo)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os

from ecospa import distributed, presets
from ecospa.importance import ESTIMATORS
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train


def _fraction(text: str):
    """0.5, or per kind: qk=0.25,vo=0.25,mlp=0.5"""
    try:
        if "=" in text:
            return {k.strip(): float(v) for k, v in (p.split("=") for p in text.split(","))}
        return float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected a number or kind=number,... got {text!r}") from err


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny", choices=sorted(presets.PRESETS),
                        help="model + recipe (default: tiny, a byte-level LLaMA on the embedded pydoc text)")
    parser.add_argument("--steps", type=int, help="total optimizer steps (the schedules follow)")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_fraction,
                        help="final fraction of units removed per group (0.5 or qk=0.25,vo=0.25,mlp=0.5); 0 = dense")
    target.add_argument("--budget", type=float,
                        help="final fraction of the groups' parameters removed, allocated globally")
    parser.add_argument("--rounds", type=int, help="number of pruning rounds")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), help="importance estimator (default fisher)")
    parser.add_argument("--data", help="pydoc | stdlib | file:PATH | wikitext103 | c4")
    parser.add_argument("--lr", type=float, help="peak learning rate")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--out", default="runs/train", help="output directory (checkpoint, metrics.jsonl)")
    parser.add_argument("--resume", action="store_true", help="continue exactly from OUT/checkpoint")
    parser.add_argument("--until", type=int, help="stop after this many steps (resume later)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step (recompiled after pruning)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--ckpt-every", type=int)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    parser.add_argument("--dist-timeout", type=float, default=distributed.DEFAULT_TIMEOUT_S,
                        help="under torchrun: seconds a collective may wait for the other ranks "
                             "before the job fails (default %(default)s)")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset with the command line's overrides applied."""
    cfg = presets.get(args.preset)
    over = {k: v for k, v in dict(steps=args.steps, estimator=args.estimator, data=args.data, lr=args.lr,
                                  batch_size=args.batch_size, seed=args.seed, device=args.device,
                                  dtype=args.dtype, eval_every=args.eval_every,
                                  ckpt_every=args.ckpt_every).items() if v is not None}
    over.update(out=args.out, compile=args.compile)
    sched = cfg.prune
    if args.steps is not None and args.steps != cfg.steps:  # stretch the pruning schedule too
        f = args.steps / cfg.steps
        sched = dataclasses.replace(sched, warmup_steps=int(sched.warmup_steps * f),
                                    window=max(1, int(sched.window * f)),
                                    every=max(1, int((sched.every or sched.window) * f)))
        over["lr_warmup"] = max(1, int(cfg.lr_warmup * f))
        over["eval_every"] = args.eval_every or max(1, int(cfg.eval_every * f))
    if args.sparsity is not None:
        sched = dataclasses.replace(sched, sparsity=args.sparsity, budget=None)
    if args.budget is not None:
        sched = dataclasses.replace(sched, sparsity=None, budget=args.budget)
    if args.rounds is not None:
        sched = dataclasses.replace(sched, rounds=args.rounds)
    return dataclasses.replace(cfg, prune=sched, **over)


def summary_table(r: dict) -> str:
    """The final summary as aligned text."""
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)
    rows = [("steps", str(r["steps"])),
            ("parameters (dense -> kept)", f"{r['dense_params']:,} -> {r['kept_params']:,} "
                                           f"(-{r['param_reduction']:.1%})"),
            ("validation perplexity", fmt(r["val_ppl"], ".3f")),
            ("tokens/s dense phase", fmt(r["tokens_per_s_dense"], ",.0f")),
            ("tokens/s after pruning", fmt(r["tokens_per_s_pruned"], ",.0f")),
            ("peak memory (MB)", fmt(r["peak_mem_mb"], ",.0f")),
            ("wall time (s)", fmt(r["wall_s"], ".1f"))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun shows the recorded traceback of the first failing rank as the root cause.
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(_run)(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # Under torchrun (WORLD_SIZE > 1): data-parallel over a process group; else one process.
    par = distributed.init_from_env(cfg.device, args.dist_timeout)
    try:
        distributed.check_divisible(cfg.batch_size, par.world_size)
        cfg = dataclasses.replace(cfg, device=getattr(par, "device", cfg.device))
        result = train(cfg, resume=args.resume, until=args.until, progress=args.progress, parallel=par)
        if par.is_main:
            if par.world_size > 1:
                print(f"data-parallel over {par.world_size} processes (global batch {cfg.batch_size})")
            print(summary_table(result))
            keep = {k: v for k, v in result.items() if k not in ("params", "opt_state", "losses")}
            with open(f"{cfg.out}/summary.json", "w") as f:
                json.dump(dict(keep, world_size=par.world_size) if par.world_size > 1 else keep, f, indent=1)
    finally:
        par.close()
    return 0
