"""``ecospa train``: coupled sparse pre-training from scratch (default: the tiny CPU demo)."""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from ecospa._text import aligned
from ecospa.cli._options import add_device, add_threads, dtype_help, dtype_name, preset_default, preset_epilog
from ecospa.errors import UsageError, fraction, nonneg_int, positive_float, positive_int, seed_int
from ecospa.importance import ESTIMATORS
from ecospa.schedule import respread
from ecospa.select import parse_sparsity
from ecospa.train import presets, runtime
from ecospa.train.config import TrainConfig
from ecospa.train.loop import train
from ecospa.train.rundir import write_json
from ecospa.train.saving import stored_config


def _sparsity(text: str):
    """argparse type: 0.5, or per kind: qk=0.25,vo=0.25,mlp=0.5 (``ecospa.select.parse_sparsity``)."""
    try:
        return parse_sparsity(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _kd_weight(text: str) -> float:
    """argparse type: a number in (0, 1], the KL term's share of the self-distillation loss."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a weight in (0, 1] (1: KL only), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = preset_epilog()
    parser.add_argument("--preset", choices=sorted(presets.PRESETS),
                        help="model + recipe (default: tiny, a byte-level LLaMA on the embedded pydoc text; "
                             "with --resume: the run's own settings; what each sets is listed below)")
    parser.add_argument("--steps", type=positive_int,
                        help="total optimizer steps (the schedules follow; with --resume: a larger "
                             "number extends the run, the pruning schedule stays) " + preset_default("steps"))
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--sparsity", type=_sparsity,
                        help="final fraction of units removed per group (0.5 or qk=0.25,vo=0.25,mlp=0.5); 0 = dense "
                             + preset_default("sparsity"))
    target.add_argument("--budget", type=fraction,
                        help="final fraction of the groups' parameters removed, allocated globally "
                             + preset_default("budget"))
    parser.add_argument("--rounds", type=nonneg_int,
                        help="number of pruning rounds (all must fit in --steps; 0 = dense) " + preset_default("rounds"))
    parser.add_argument("--multiple-of", type=positive_int,
                        help="keep each group's width (blocks x units) a multiple of this (or whole): kernel-friendly widths "
                             "(8 for fp32 CPU matmuls; 1: any width) " + preset_default("multiple_of"))
    parser.add_argument("--rewarm", type=nonneg_int,
                        help="after each pruning round, ramp the learning rate back up over this many steps (0: off) "
                             + preset_default("rewarm"))
    parser.add_argument("--moments", choices=["carry", "reset"],
                        help="AdamW moments after a pruning round: sliced with the params (carry) or zeroed (reset) "
                             + preset_default("moments"))
    parser.add_argument("--decay-steps", type=nonneg_int,
                        help="soft removal: the units a round chooses are multiplied by a ramp that reaches "
                             "exactly 0 over this many steps, then sliced out (still computed, and counted "
                             "as dense FLOPs, until then; 0: sliced at once) " + preset_default("decay_steps"))
    parser.add_argument("--distill-steps", type=nonneg_int,
                        help="self-distillation: from each pruning round until this many steps after its "
                             "slicing, also match the model's own snapshot from just before the round "
                             "(KL; its forward is counted in the FLOPs; 0: off) " + preset_default("distill_steps"))
    parser.add_argument("--distill-weight", type=_kd_weight,
                        help="the KL term's weight in the loss while self-distilling, in (0, 1] "
                             + preset_default("distill_weight"))
    parser.add_argument("--carry", type=fraction,
                        help="importance carried across rounds, in [0, 1): each round ranks units by this "
                             "share of the previous rounds' (mean-normalized) Fisher plus the rest from its "
                             "own window (an EMA over rounds; 0: its own window only) " + preset_default("carry"))
    parser.add_argument("--gradual", type=float, nargs=2, metavar=("START", "END"),
                        help="gradual shrinking: spread the --rounds evenly from START to END (fractions of "
                             "--steps, e.g. 0.25 0.75; the first round's window ends at START); the ramp, "
                             "target and window stay the preset's (default: the preset's round steps)")
    parser.add_argument("--estimator", choices=sorted(ESTIMATORS), help="importance estimator " + preset_default("estimator"))
    parser.add_argument("--data", help="pydoc | stdlib | file:PATH | wikitext103 | c4 " + preset_default("data"))
    parser.add_argument("--lr", type=positive_float, help="peak learning rate " + preset_default("lr"))
    parser.add_argument("--batch-size", type=positive_int, help="sequences per optimizer step (global) "
                        + preset_default("batch_size"))
    parser.add_argument("--out", default="runs/train",
                        help="output directory (checkpoint, metrics.jsonl, summary.json)")
    run = parser.add_mutually_exclusive_group()
    run.add_argument("--resume", action="store_true",
                     help="continue exactly from OUT/checkpoint with the run's stored settings; only "
                          "the flags given override them (refused if that changes the computation)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace the previous run in OUT (its checkpoint, metrics.jsonl, summary.json); "
                          "without it a new run refuses a directory that holds one")
    parser.add_argument("--until", type=positive_int,
                        help="stop after this many steps, resume later (default: run all --steps)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the step (recompiled after pruning; default: off)")
    parser.add_argument("--seed", type=seed_int, help="seed of the init and the batches " + preset_default("seed"))
    add_device(parser, default=None, help_default="the --preset's value; tiny: cpu")
    add_threads(parser)
    parser.add_argument("--dtype", type=dtype_name, choices=["float32", "bfloat16", "float64"],
                        help=dtype_help("parameter dtype") + " " + preset_default("dtype"))
    parser.add_argument("--eval-every", type=positive_int, help="steps between validation evaluations "
                        + preset_default("eval_every"))
    parser.add_argument("--ckpt-every", type=nonneg_int,
                        help="steps between checkpoints (0: only at the end) " + preset_default("ckpt_every"))
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="progress bar (default: when stderr is a terminal)")
    parser.add_argument("--dist-timeout", type=positive_float, default=runtime.DEFAULT_TIMEOUT_S,
                        help="under torchrun: seconds a collective may wait for the other ranks "
                             "before the job fails (default: %(default)s)")


# The flags that set a TrainConfig field (argparse dest == field name); each defaults to None, so
# a flag the user did not give is told from one given with the preset's value.
FIELDS = ("steps", "estimator", "data", "lr", "batch_size", "seed", "device", "dtype", "eval_every",
          "ckpt_every", "compile")
SCHEDULE = ("rounds", "multiple_of", "rewarm", "moments", "decay_steps", "distill_steps", "distill_weight",
            "carry")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's settings: with ``--resume`` (and no ``--preset``) the ones stored in
    ``OUT/checkpoint``, else the preset's; the flags given on the command line override them."""
    if args.resume and args.preset is None:
        return _overrides(stored_config(Path(args.out) / "checkpoint"), args)
    cfg = presets.get(args.preset or "tiny")
    if args.steps is not None and args.steps != cfg.steps:  # stretch the schedules too
        f = args.steps / cfg.steps
        sched = cfg.prune
        sched = dataclasses.replace(sched, warmup_steps=int(sched.warmup_steps * f),
                                    window=max(1, int(sched.window * f)),
                                    every=max(1, int((sched.every or sched.window) * f)))
        cfg = dataclasses.replace(cfg, prune=sched, lr_warmup=max(1, int(cfg.lr_warmup * f)),
                                  eval_every=max(1, int(cfg.eval_every * f)))
    return _overrides(cfg, args)


def _overrides(cfg: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``cfg`` with the flags that were given (not None) in place of its values."""
    over = {k: getattr(args, k) for k in FIELDS if getattr(args, k) is not None}
    sched = dataclasses.replace(cfg.prune, **{k: getattr(args, k) for k in SCHEDULE
                                              if getattr(args, k) is not None})
    if args.sparsity is not None:
        sched = dataclasses.replace(sched, sparsity=args.sparsity, budget=None)
    if args.budget is not None:
        sched = dataclasses.replace(sched, sparsity=None, budget=args.budget)
    if getattr(args, "gradual", None) is not None:
        sched = _gradual(sched, over.get("steps", cfg.steps), *args.gradual)
    return dataclasses.replace(cfg, prune=sched, out=args.out,
                               compile=bool(over.pop("compile", cfg.compile)), **over)


def _gradual(sched, steps: int, start: float, end: float):
    """``sched`` with its rounds spread from ``start`` to ``end`` of ``steps`` (``schedule.gradual``)."""
    try:
        return respread(sched, steps, start, end)
    except ValueError as err:
        raise UsageError(f"--gradual {start:g} {end:g}: {err}") from err


def _target_text(r: dict) -> str:
    """'budget 0.5 -> 0.498' or 'sparsity 0.5 -> qk 0.50, vo 0.50, mlp 0.50' (requested -> reached)."""
    want, got = r.get("target"), r.get("reached")
    if not want or not got:
        return "n/a"
    if want["budget"] is not None:
        return f"budget {want['budget']:g} -> {got['budget']:.3f}"
    s = want["sparsity"]
    s = s if isinstance(s, (int, float)) else ",".join(f"{k}={v:g}" for k, v in s.items())
    return f"sparsity {s} -> " + ", ".join(f"{k} {v:.2f}" for k, v in got["sparsity"].items())


def summary_table(r: dict) -> str:
    """The final summary as aligned text."""
    def fmt(x, spec):
        return "n/a" if x is None else format(x, spec)
    rows = [("steps", str(r["steps"])),
            ("target (requested -> reached)", _target_text(r)),
            ("parameters (dense -> kept)", f"{r['dense_params']:,} -> {r['kept_params']:,} "
                                           f"(-{r['param_reduction']:.1%})"),
            ("validation perplexity", fmt(r["val_ppl"], ".3f")),
            ("tokens/s dense phase", fmt(r["tokens_per_s_dense"], ",.0f")),
            ("tokens/s after pruning", fmt(r["tokens_per_s_pruned"], ",.0f")),
            ("peak memory (MB)", fmt(r["peak_mem_mb"], ",.0f")),
            ("wall time (s)", fmt(r["wall_s"], ".1f"))]
    return aligned(rows)


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # torchrun shows the recorded traceback of the first failing rank as the root cause.
        return record(_run)(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # Under torchrun (WORLD_SIZE > 1): data-parallel over a process group; else one process.
    par = runtime.init_from_env(cfg.device, args.dist_timeout)
    try:
        runtime.check_divisible(cfg.batch_size, par.world_size)
        cfg = dataclasses.replace(cfg, device=getattr(par, "device", cfg.device))
        result = train(cfg, resume=args.resume, until=args.until, progress=args.progress, parallel=par,
                       overwrite=args.overwrite)
        if par.is_main:
            if par.world_size > 1:
                print(f"data-parallel over {par.world_size} processes (global batch {cfg.batch_size})")
            print(summary_table(result))
            keep = {k: v for k, v in result.items() if k not in ("params", "opt_state", "losses")}
            write_json(Path(cfg.out) / "summary.json",
                        dict(keep, world_size=par.world_size) if par.world_size > 1 else keep)
            out = os.path.abspath(cfg.out)
            print(f"saved {out}: checkpoint/ (load it with --model {cfg.out}), metrics.jsonl, summary.json")
    finally:
        par.close()
    return 0
