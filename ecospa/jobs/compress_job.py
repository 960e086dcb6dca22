"""``Job``: everything ``ecospa compress`` needs, validated when built: every value and every
output path is checked (``UsageError``, exit code 2) before a model is loaded or a file touched."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping, Optional, Union

from ecospa.allocation import ALLOCATIONS, check_multiple_of
from ecospa.errors import UsageError, check_fraction, whole
from ecospa.func.reconstruct import TARGETS
from ecospa.importance import ESTIMATORS
from ecospa.io.files import check_output_path
from ecospa.io.load import run_checkpoint
from ecospa.jobs.export import FORMATS, check_out
from ecospa.select import parse_sparsity

Sparsity = Union[float, Mapping[str, float]]
RANK_BY = ("estimator", "obs")
LR_SCHEDULES = ("constant", "cosine")
CALIB_TEXTS = ("train", "teacher", "mix")
RECOVERY_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class Job:
    """Everything ``compress`` needs; validated when built (a bad value never touches files)."""

    model: str
    out: Optional[str] = None
    data: str = "pydoc"
    budget: Optional[float] = None
    sparsity: Optional[Sparsity] = None
    estimator: str = "fisher"
    allocation: str = "global"             # how --budget is spread over groups (ecospa.allocation)
    multiple_of: int = 1                   # blocks x kept units a multiple of this (or all)
    rounds: int = 1
    distill: bool = True                   # KL to the dense logits + hard labels (measured best, 50%/80 steps)
    distill_weight: float = 0.5            # 1.0: KD only (no hard-label cross-entropy)
    rank_by: str = "obs"                   # vo/mlp units by their error after the refit; or "estimator"
    reconstruct: bool = True               # layer-wise ridge refit of the output projections
    recon_batches: int = 32                # TRAIN batches (batch_size x seq_len) for the refit and obs
    ridge: float = 1e-1                    # the refit's, relative to the Gram's mean diagonal (0.1 beat
    #                                        0.01 on both held-out texts at 25% and 50% with obs at 0.01;
    #                                        see benchmarks/results)
    obs_ridge: Optional[float] = 1e-2      # the obs scores' own ridge; None: --ridge. 0.01 beat 0.1 on both
    #                                        held-out texts after the gradient-free stages (50%, issue 28:
    #                                        pydoc 24.54 vs 26.33, stdlib 21.13 vs 21.91)
    recon_target: str = "residual"         # or "local" (see ecospa.func.reconstruct)
    lr_schedule: str = "constant"          # or "cosine": linear warm-up, cosine to 10%
    warmup: int = 0                        # warm-up steps of the cosine schedule
    recovery_dtype: str = "float32"        # "bfloat16": recovery's matmuls (student and teacher) under
    #                                        torch.autocast, the params, gradients and AdamW moments float32,
    #                                        every loss in float32; fast only where the hardware has bfloat16
    #                                        matmuls (GPUs, CPUs with AVX512-BF16 or AMX)
    steps: int = 80
    eval_at: tuple = ()                    # recovery steps (of --steps) at which to also evaluate: a curve
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 2e-4
    calib_batches: int = 4
    micro_batch: Optional[int] = 1         # rows per backward pass of the calibration and of recovery
    #                                        with --no-layerwise: the batch's gradient (rows averaged), the
    #                                        activations of this many rows in memory; None: the whole batch
    #                                        at once. --layerwise (default) keeps one layer's activations
    #                                        and differentiates whole batches (no running gradient sum)
    layerwise: bool = True                 # calibration and recovery gradients one layer at a time
    #                                        (ecospa.func.layerwise): the same scores and steps, one layer's
    #                                        activations in memory, one more forward pass; the perplexities
    #                                        with 128 tokens' logits at a time (chunked_loss); False:
    #                                        torch.func.grad of the whole forward, whole logits
    teacher_rows: int = 0                  # rows of every recovery batch drawn from text SAMPLED FROM THE
    #                                        DENSE MODEL (temperature 1, each from one TRAIN token; issue 28:
    #                                        general ability); the other rows are TRAIN windows
    teacher_pool: int = 32                 # sequences of that text, sampled once before recovery and cycled
    calib_text: str = "train"              # the text of the gradient-free stages' batches (calibration, obs
    #                                        scores, refit): "train" windows; "teacher": text SAMPLED FROM
    #                                        THE DENSE MODEL (temperature 1, each from one TRAIN token, its
    #                                        own sequences per batch); "mix": half of every batch each
    train_embedding: bool = True           # recovery trains the token embedding (with a tied head, the head
    #                                        too); False: held at the dense values (no gradient, no AdamW
    #                                        moments, no copy: it stays the teacher's tensor)
    eval_seq_len: int = 512
    eval_windows: Optional[int] = 40
    eval_batch_size: int = 1               # windows per held-out forward: 1 keeps one window's logits [T, V] in
    #                                        memory (4: 0.8 GB for SmolLM2's 49152-token vocabulary); the
    #                                        same perplexity up to float summation order
    seed: int = 0
    eval_extra: tuple = ("stdlib",)        # more held-out sources (their VAL split), never trained on
    export_hf: Optional[str] = None
    export: Optional[str] = None           # another export (see ecospa.jobs.export), in export_format
    export_format: str = "hf-padded"
    overwrite: bool = False                # replace an earlier checkpoint at out / earlier exports
    progress: bool = True
    eval_cache: bool = True                # the dense model's held-out perplexities from / into the cache of
    #                                        earlier jobs on the same weights, tokens and settings
    #                                        (ecospa.jobs.eval_cache); False: evaluated, nothing written
    ppl_dense: Optional[float] = None  # skip the dense evaluation when already known
    ppl_dense_extra: Optional[Mapping[str, float]] = None  # the same for eval_extra's sources

    @property
    def per_round(self) -> int:
        """Recovery steps after each round (``steps`` split over ``rounds``, at least 1; 0 without)."""
        return max(1, self.steps // self.rounds) if self.steps else 0

    def __post_init__(self):
        """Check every value and every output path; UsageError before anything is loaded."""
        try:
            self._check_values()
        except UsageError:
            raise
        except ValueError as err:  # the sparsity parser's messages: still the user's input
            raise UsageError(str(err)) from err
        self._check_paths()

    def _check_values(self) -> None:
        if (self.budget is None) == (self.sparsity is None):
            raise UsageError("give exactly one target: --budget F (fraction of the coupled groups' "
                             "parameters removed) or --sparsity (e.g. 'qk=0.25,vo=0.25,mlp=0.5')")
        if self.budget is not None:
            check_fraction(self.budget, "--budget", zero=False)
        if self.sparsity is not None:
            sparsity = parse_sparsity(self.sparsity) if isinstance(self.sparsity, str) else self.sparsity
            if isinstance(sparsity, Mapping):
                for kind in sparsity:
                    if not isinstance(kind, str) or "=" in kind or "," in kind:
                        raise UsageError(f"--sparsity names unknown group kinds [{kind!r}]")
                    parse_sparsity(f"{kind}=0")  # unknown kinds: the one parser's message
            fracs = sparsity.values() if isinstance(sparsity, Mapping) else [sparsity]
            for v in fracs:
                check_fraction(v, "--sparsity fraction")
            object.__setattr__(self, "sparsity", sparsity)
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"--estimator {self.estimator!r} is unknown; use one of {sorted(ESTIMATORS)}")
        for name in ("rounds", "batch_size", "seq_len", "calib_batches", "eval_seq_len",
                     "eval_batch_size"):
            v = getattr(self, name)
            if not whole(v) or v < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {v!r}")
        if self.micro_batch is not None and (not whole(self.micro_batch) or self.micro_batch < 1):
            raise UsageError(f"--micro-batch must be a whole number >= 1, got {self.micro_batch!r}")
        if self.eval_windows is not None and (not whole(self.eval_windows) or self.eval_windows < 1):
            raise UsageError(f"--eval-windows must be a whole number >= 1, got {self.eval_windows!r}")
        if not whole(self.teacher_rows) or not 0 <= self.teacher_rows <= self.batch_size:
            raise UsageError(f"--teacher-rows must be a whole number in [0, --batch-size {self.batch_size}], "
                             f"got {self.teacher_rows!r}")
        if not whole(self.teacher_pool) or self.teacher_pool < 1:
            raise UsageError(f"--teacher-pool must be a whole number >= 1, got {self.teacher_pool!r}")
        if self.calib_text not in CALIB_TEXTS:
            raise UsageError(f"--calib-text must be one of {', '.join(CALIB_TEXTS)}, got {self.calib_text!r}")
        if self.calib_text == "mix" and self.batch_size < 2:
            raise UsageError("--calib-text mix puts half of every batch from each text, so it needs "
                             f"--batch-size >= 2, got {self.batch_size}; use train or teacher")
        if not whole(self.steps) or self.steps < 0:
            raise UsageError(f"--steps must be a whole number >= 0, got {self.steps!r}")
        if self.steps and self.steps % self.rounds:  # else rounds x (steps // rounds) steps would run
            low = max(self.rounds, self.steps // self.rounds * self.rounds)
            raise UsageError(f"--steps {self.steps} does not split into --rounds {self.rounds} equal "
                             f"recovery phases; give a multiple of {self.rounds} (e.g. --steps {low} "
                             f"or {low + self.rounds}) or --steps 0")
        at, total = tuple(self.eval_at or ()), self.per_round * self.rounds
        if any(not whole(x) or not 1 <= x <= total for x in at):
            raise UsageError(f"--eval-at takes recovery steps in [1, {total}] (the steps --steps {self.steps} "
                             f"runs in --rounds {self.rounds}), got {list(at)!r}")
        object.__setattr__(self, "eval_at", tuple(sorted(set(at))))
        if not whole(self.seed) or self.seed < 0:
            raise UsageError(f"--seed must be a whole number >= 0, got {self.seed!r}")
        if not (_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be a finite number > 0, e.g. 2e-4; got {self.lr!r}")
        if not (_number(self.distill_weight) and 0.0 <= self.distill_weight <= 1.0):
            raise UsageError(f"--distill-weight must lie in [0, 1], got {self.distill_weight!r}")
        try:
            check_multiple_of(self.multiple_of)
        except ValueError as err:
            raise UsageError(f"--multiple-of: {err}") from err
        if self.allocation not in ALLOCATIONS:
            raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        if self.allocation != "global" and self.budget is None:
            raise UsageError(f"--allocation {self.allocation} spreads a --budget; with --sparsity every "
                             "group already has its fraction (drop --allocation or give --budget)")
        if self.rank_by not in RANK_BY:
            raise UsageError(f"--rank-by must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if self.recon_target not in TARGETS:
            raise UsageError(f"--recon-target must be one of {', '.join(TARGETS)}, got {self.recon_target!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise UsageError(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, "
                             f"got {self.lr_schedule!r}")
        if self.recovery_dtype not in RECOVERY_DTYPES:
            raise UsageError(f"--recovery-dtype must be one of {', '.join(RECOVERY_DTYPES)}, "
                             f"got {self.recovery_dtype!r}")
        if not (_number(self.ridge) and math.isfinite(self.ridge) and self.ridge > 0):
            raise UsageError(f"--ridge must be a finite number > 0, e.g. 0.1; got {self.ridge!r}")
        if self.obs_ridge is not None and not (_number(self.obs_ridge) and math.isfinite(self.obs_ridge)
                                               and self.obs_ridge > 0):
            raise UsageError(f"--obs-ridge must be a finite number > 0, e.g. 0.01; got {self.obs_ridge!r}")
        if not whole(self.recon_batches) or self.recon_batches < 1:
            raise UsageError(f"--recon-batches must be a whole number >= 1, got {self.recon_batches!r}")
        if not whole(self.warmup) or self.warmup < 0 or (self.steps and self.warmup > self.steps):
            raise UsageError(f"--warmup must be a whole number in [0, --steps], got {self.warmup!r}")
        extra = (self.eval_extra,) if isinstance(self.eval_extra, str) else tuple(self.eval_extra or ())
        if any(not isinstance(x, str) or not x for x in extra) or self.data in extra:
            raise UsageError(f"--eval-extra must name other text sources than --data {self.data!r}, "
                             f"got {self.eval_extra!r}")
        object.__setattr__(self, "eval_extra", extra)
        if self.ppl_dense is not None and not (_number(self.ppl_dense) and self.ppl_dense > 0):
            raise UsageError(f"ppl_dense must be a number > 0, got {self.ppl_dense!r}")

    def _check_paths(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise UsageError(f"--model must name a model, got {self.model!r}")
        model = os.path.abspath(run_checkpoint(self.model)) if os.path.exists(self.model) else None
        outs = [(flag, os.path.abspath(p)) for flag, p in (("--out", self.out),
                                                           ("--export-hf", self.export_hf),
                                                           ("--export", self.export)) if p]
        for flag, path in outs:
            if model is not None and _inside(model, path):
                raise UsageError(f"{flag} {path!r} is or holds the input model {self.model!r}; "
                                 "choose another directory")
        for i, (fa, a) in enumerate(outs):
            for fb, b in outs[i + 1:]:
                if _inside(a, b) or _inside(b, a):
                    raise UsageError(f"{fa} {a!r} and {fb} {b!r} overlap; give separate paths")
        if self.out:
            check_out_dir(self.out, overwrite=self.overwrite)
        if self.export_hf:
            check_out(self.export_hf, "hf-padded", self.overwrite, flag="--export-hf")
        if self.export:
            if self.export_format not in FORMATS:
                raise UsageError(f"--format must be one of {', '.join(FORMATS)}, "
                                 f"got {self.export_format!r}")
            check_out(self.export, self.export_format, self.overwrite, flag="--export")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


def _inside(path: str, root: str) -> bool:
    """``path`` is ``root`` or lies under it (both absolute)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


TRAIN_RUN_FILES = ("metrics.jsonl", "summary.json")  # beside RUN/checkpoint (ecospa.train.rundir)


def check_out_dir(out: str, flag: str = "--out", overwrite: bool = False) -> str:
    """UsageError unless ``out`` can become a native checkpoint without touching anything else:
    absent, an empty directory, or (with ``overwrite``) an earlier compress checkpoint. A
    training run's directory or its ``checkpoint`` is never replaced (``ecospa train`` owns it)."""
    path = check_output_path(out, flag)
    parent = os.path.dirname(path)
    if os.path.basename(path) == "checkpoint" and any(
            os.path.lexists(os.path.join(parent, f)) for f in TRAIN_RUN_FILES):
        raise UsageError(f"{flag} {out!r} is the checkpoint of the training run {parent!r}; compress "
                         "never replaces it: choose another --out")
    if any(os.path.lexists(os.path.join(path, f)) for f in TRAIN_RUN_FILES):
        raise UsageError(f"{flag} {out!r} is a training run's directory; choose another --out")
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {out!r} is a file; give a directory path for the checkpoint")
    entries = os.listdir(path)
    if entries and not os.path.isfile(os.path.join(path, "manifest.json")):
        raise UsageError(f"{flag} {out!r} is a non-empty directory that is not an ecospa "
                         f"checkpoint (it holds {sorted(entries)[:3]}); choose a new or empty one")
    if entries and not overwrite:
        raise UsageError(f"{flag} {out!r} holds an earlier checkpoint; pass --overwrite to replace it, "
                         "or choose another --out")
    return path


__all__ = ["Job", "Sparsity", "check_out_dir", "RANK_BY", "LR_SCHEDULES", "CALIB_TEXTS"]
