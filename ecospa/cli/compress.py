"""``ecospa compress``: calibrate, prune, recover and save a pretrained model (``ecospa.jobs.compress``).

    ecospa compress --model smollm2-135m --budget 0.5 --steps 80 --out runs/smol50

Every flag's default is the ``Job`` field's default; the flags are validated by building the
``Job`` (UsageError, exit code 2) before the model is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from ecospa.allocation import ALLOCATIONS
from ecospa.cli._options import MODEL_HELP, add_threads, renamed
from ecospa.errors import nonneg_int, positive_float, positive_int, seed_int
from ecospa.importance import ESTIMATORS
from ecospa.func.reconstruct import TARGETS
from ecospa.jobs.compress import Job, compress, table
from ecospa.jobs.compress_job import CALIB_TEXTS, LR_SCHEDULES, RANK_BY, RECOVERY_DTYPES
from ecospa.jobs.phases import return_freed_memory
from ecospa.io.load import train_config_of
from ecospa.jobs.export import FORMATS

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Job)}
DEFAULT_OUT = os.path.join("runs", "compress")  # like `ecospa train`'s runs/train: a result is always kept


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ecospa compress``."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="native checkpoint directory to write, atomically; "
                   "an earlier compress checkpoint there is replaced only with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier compress checkpoint at --out and earlier exports at "
                   "--export/--export-hf (a training run's checkpoint is never replaced)")
    p.add_argument("--data", default=_DEFAULTS["data"], help="text source; train split calibrates/recovers, "
                   "val split is held out for perplexity")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--budget", type=float, help="fraction of the coupled groups' parameters "
                        "to remove, allocated globally by importance per parameter")
    target.add_argument("--sparsity",
                        help="fraction of units removed per group: 0.5 or 'qk=0.25,vo=0.25,mlp=0.5'")
    p.add_argument("--estimator", default=_DEFAULTS["estimator"], choices=sorted(ESTIMATORS),
                   help="importance estimator for the coupled groups")
    p.add_argument("--allocation", default=_DEFAULTS["allocation"], choices=ALLOCATIONS,
                   help="how --budget is spread over layers and group kinds: global (importance per "
                   "parameter), zscore (per-group standardized scores, FLAP), protect (first/last layers "
                   "kept dense), depth (fraction removed grows with depth, SlimGPT)")
    p.add_argument("--multiple-of", type=positive_int, default=_DEFAULTS["multiple_of"],
                   help="keep each group's width (blocks x units) a multiple of this (or whole): kernel-friendly widths "
                        "(8 for fp32 CPU matmuls; 1: any width)")
    p.add_argument("--rounds", type=positive_int, default=_DEFAULTS["rounds"], help="iterative prune-and-recover rounds")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=_DEFAULTS["distill"],
                   help="recover with KL to the dense model's logits (mixed with the hard-label loss by "
                   "--distill-weight); --no-distill: hard labels only")
    p.add_argument("--distill-weight", type=float, default=_DEFAULTS["distill_weight"], help="weight of the KL term, in [0, 1] (1: distillation only, no hard labels)")
    p.add_argument("--rank-by", default=_DEFAULTS["rank_by"], choices=RANK_BY,
                   help="which units of the vo/mlp groups to keep: by --estimator's scores, or 'obs': "
                   "by the calibration error that remains after refitting the output projection")
    p.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=_DEFAULTS["reconstruct"],
                   help="layer-wise ridge refit of the output projections to the dense model after "
                   "pruning (no gradients; --no-reconstruct to switch it off)")
    p.add_argument("--recon-batches", type=positive_int, default=_DEFAULTS["recon_batches"],
                   help="TRAIN batches (--batch-size x --seq-len tokens each) for the refit and obs scores")
    p.add_argument("--ridge", type=positive_float, default=_DEFAULTS["ridge"],
                   help="ridge of the refit, relative to the Gram matrix's mean diagonal")
    p.add_argument("--obs-ridge", type=positive_float, default=_DEFAULTS["obs_ridge"],
                   help="ridge of the obs scores' refit alone (the scores that rank units with --rank-by obs; "
                        "the refit itself uses --ridge)")
    p.add_argument("--recon-target", default=_DEFAULTS["recon_target"], choices=TARGETS,
                   help="residual: repair the stream up to each layer; local: match each layer alone")
    p.add_argument("--lr-schedule", default=_DEFAULTS["lr_schedule"], choices=LR_SCHEDULES,
                   help="learning rate over the recovery steps (cosine: --warmup, then down to 10%%)")
    p.add_argument("--warmup", type=nonneg_int, default=_DEFAULTS["warmup"],
                   help="warm-up steps of --lr-schedule cosine")
    p.add_argument("--recovery-dtype", default=_DEFAULTS["recovery_dtype"], choices=RECOVERY_DTYPES,
                   help="bfloat16: recovery's matmuls (student and teacher) in bfloat16 under torch.autocast, "
                   "the weights, gradients and optimizer state float32; faster only on hardware with "
                   "bfloat16 matmuls (GPUs, CPUs with AVX512-BF16 or AMX), far slower elsewhere")
    p.add_argument("--eval-extra", nargs="*", default=list(_DEFAULTS["eval_extra"]),
                   help="other held-out sources scored on their VAL split (never trained on)")
    p.add_argument("--steps", type=nonneg_int, default=_DEFAULTS["steps"], help="recovery steps in total")
    p.add_argument("--eval-at", type=positive_int, nargs="*", default=[],
                   help="recovery steps at which to also evaluate (a curve in the summary, saved in the checkpoint's manifest.json), e.g. --eval-at 80 160")
    p.add_argument("--batch-size", type=positive_int, default=_DEFAULTS["batch_size"],
                   help="sequences per calibration, refit and recovery batch")
    p.add_argument("--seq-len", type=positive_int, default=_DEFAULTS["seq_len"],
                   help="tokens per calibration, refit and recovery sequence")
    p.add_argument("--lr", type=positive_float, default=_DEFAULTS["lr"], help="recovery learning rate (AdamW)")
    p.add_argument("--calib-batches", type=positive_int, default=_DEFAULTS["calib_batches"],
                   help="TRAIN batches for the importance scores")
    p.add_argument("--micro-batch", type=positive_int, default=_DEFAULTS["micro_batch"],
                   help="with --no-layerwise: rows of a calibration or recovery batch differentiated at a "
                   "time (their gradients averaged: the batch's gradient, with the activation memory of this "
                   "many rows); --layerwise differentiates whole batches one layer at a time")
    p.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=_DEFAULTS["layerwise"],
                   help="calibration and recovery gradients computed one layer at a time (the same numbers "
                   "with one layer's activations and a few tokens' logits in memory, one more forward pass; "
                   "the perplexities also a few tokens' logits at a time; --no-layerwise: one backward pass "
                   "through the whole model, --micro-batch rows at a time, whole logits)")
    p.add_argument("--teacher-rows", type=nonneg_int, default=_DEFAULTS["teacher_rows"],
                   help="rows of every recovery batch that are text sampled from the dense model itself "
                   "(temperature 1, each started from one TRAIN token; no other data): general text for "
                   "the distillation; the other rows are TRAIN windows (0: TRAIN only)")
    p.add_argument("--teacher-pool", type=positive_int, default=_DEFAULTS["teacher_pool"],
                   help="sequences of --seq-len tokens sampled from the dense model once, before recovery, "
                   "and cycled through by --teacher-rows")
    p.add_argument("--calib-text", default=_DEFAULTS["calib_text"], choices=CALIB_TEXTS,
                   help="text of the gradient-free stages' batches (calibration, obs scores, refit): TRAIN "
                   "windows; teacher: text sampled from the dense model itself (temperature 1, each "
                   "sequence started from one TRAIN token; no other data), its own sequences for every "
                   "batch; mix: half of every batch each")
    p.add_argument("--train-embedding", action=argparse.BooleanOptionalAction,
                   default=_DEFAULTS["train_embedding"],
                   help="recovery trains the token embedding (with a tied head such as SmolLM2's, the head "
                   "too); --no-train-embedding holds it at the dense values: no gradient, no AdamW moments "
                   "and no copy of it (less memory and time)")
    p.add_argument("--eval-seq-len", type=positive_int, default=_DEFAULTS["eval_seq_len"],
                   help="predictions per held-out window (`ecospa eval --seq-len`)")
    p.add_argument("--eval-windows", type=positive_int, default=_DEFAULTS["eval_windows"], metavar="N",
                   help="held-out windows scored per source (as `ecospa eval --eval-windows`)")
    p.add_argument("--eval-cache", action=argparse.BooleanOptionalAction, default=_DEFAULTS["eval_cache"],
                   help="read the dense model's held-out perplexities from the cache of earlier jobs on the "
                   "same weights, tokens and evaluation settings, and write them there ($ECOSPA_CACHE_DIR, "
                   "else ~/.cache/ecospa/eval; keyed by a SHA-256 of all of them, so changed weights or "
                   "text never read a stale number); --no-eval-cache evaluates and writes nothing")
    p.add_argument("--seed", type=seed_int, default=_DEFAULTS["seed"], help="seed of the batches and estimators")
    p.add_argument("--export-hf", help="also write a stock transformers directory (the hf-padded "
                   "format of `ecospa export`: exact for any pruned tree; new, empty, or with --overwrite "
                   "an earlier export of ours; default: none)")
    p.add_argument("--export", help="also export the compressed model here, in --format "
                   "(any pruned tree: padded or compact layouts, see `ecospa export`; default: none)")
    p.add_argument("--format", dest="export_format", default=_DEFAULTS["export_format"], choices=FORMATS,
                   help="format of --export, as `ecospa export --format` (hf-padded: stock transformers, exact)")
    renamed(p, "--export-format", "--format")
    add_threads(p)


def warn_context(job: Job) -> None:
    """One warning line per window (--seq-len, --eval-seq-len) longer than the context the model
    was trained on (a train run's seq_len): its numbers would not compare with the run's."""
    trained = train_config_of(job.model)
    ctx = (trained or {}).get("seq_len")
    for flag, value in (("--seq-len", job.seq_len), ("--eval-seq-len", job.eval_seq_len)):
        if ctx and value > ctx:
            print(f"ecospa compress: warning: {flag} {value} is longer than the {ctx} tokens the model "
                  f"was trained on (its run's seq_len): positions past it were never trained; give "
                  f"{flag} {ctx} to compress it on its own context", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Build the job from the flags (validated before any loading), run it, print the table."""
    fields = {f.name for f in dataclasses.fields(Job)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    job = Job(**values)  # parses --sparsity; UsageError (exit 2) before anything is loaded
    if args.threads:
        torch.set_num_threads(args.threads)
    if os.environ.get("ECOSPA_FIXED_MMAP_THRESHOLD", "1") != "0":
        return_freed_memory()  # resident memory follows the live tensors (ecospa.jobs.phases)
    warn_context(job)
    summary = compress(job)
    print(table(summary), flush=True)
    if job.out:
        print(f"saved {os.path.abspath(job.out)}", flush=True)
    if summary.get("export_failed"):
        print(f"ecospa compress: error: export failed: {summary['export_failed']}", file=sys.stderr)
        return 1
    return 0


__all__ = ["add_arguments", "run"]
