"""``TrainConfig``: everything a pre-training run needs, checked before anything runs
(presets in ``ecospa.train.presets``)."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

from ecospa.errors import UsageError, whole
from ecospa.func import llama
from ecospa.func.families import FAMILIES
from ecospa.groups import validate
from ecospa.importance import ESTIMATORS
from ecospa.schedule import PruneSchedule, warmup_cosine
from ecospa.select import check_target

# Fields that may change between a run and its resume without changing the computation.
RESUMABLE = ("out", "compile", "device", "log_every", "ckpt_every", "eval_every",
             "eval_batches")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pre-training run needs (presets in ``ecospa.train.presets``)."""

    model: Any = llama.Config(vocab_size=256, dim=64, n_layers=2, n_heads=4, ffn_dim=172)
    data: str = "pydoc"
    tokenizer: str = "byte"
    batch_size: int = 16
    seq_len: int = 128
    steps: int = 1000
    lr: float = 3e-3
    lr_warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    clip_norm: Optional[float] = 1.0
    prune: PruneSchedule = PruneSchedule(warmup_steps=200, window=20, rounds=3, every=100, sparsity=0.5)
    estimator: str = "fisher"
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: Optional[int] = None  # None: at every evaluation; 0: only at the end (and at ``until``)
    log_every: int = 10
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False
    out: str = "runs/train"

    def __post_init__(self):
        if getattr(self.model, "name", None) not in FAMILIES:
            raise ValueError(f"model must be a llama.Config or gpt2.Config, got {type(self.model).__name__}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16 or float64, got {self.dtype!r}")
        for k in ("batch_size", "seq_len", "steps", "eval_every", "log_every", "eval_batches"):
            if not whole(getattr(self, k)) or getattr(self, k) < 1:
                raise UsageError(f"{k} must be a whole number >= 1, got {getattr(self, k)!r}")
        if self.ckpt_every is not None and (not whole(self.ckpt_every) or self.ckpt_every < 0):
            raise UsageError(f"ckpt_every must be a whole number >= 0 (0: only at the end) or None "
                             f"(at every evaluation), got {self.ckpt_every!r}")
        if not whole(self.lr_warmup) or self.lr_warmup < 0:
            raise UsageError(f"lr_warmup must be a whole number >= 0, got {self.lr_warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a finite number > 0, got {self.lr!r}")


def checkpoint_every(cfg: TrainConfig) -> int:
    """Steps between periodic checkpoints (0: none before the end): ``cfg.ckpt_every``, or the
    evaluation interval when it is None (the default), so a kill loses at most one interval."""
    return cfg.eval_every if cfg.ckpt_every is None else cfg.ckpt_every


def config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


# PruneSchedule fields added after checkpoints were written without them, at their neutral value
NEW_SCHEDULE_FIELDS = {"decay_steps": 0, "distill_steps": 0, "distill_weight": 0.5, "carry": 0.0}


def _filled(saved: dict) -> dict:
    """``saved`` with the schedule fields an older ecospa did not write, at their neutral value."""
    if not isinstance(saved, dict) or not isinstance(saved.get("prune"), dict):
        return saved
    return dict(saved, prune={**NEW_SCHEDULE_FIELDS, **saved["prune"]})


def config_from_json(saved: dict) -> TrainConfig:
    """The ``TrainConfig`` that ``config_json`` wrote (a checkpoint's ``train_config``); ValueError
    if it does not describe one (a checkpoint of another ecospa version)."""
    saved = _filled(saved)
    try:
        fields = dict(saved)
        model = dict(fields.pop("model"))
        cfg = TrainConfig(model=FAMILIES[model["name"]].Config(**model),
                          prune=PruneSchedule(**fields.pop("prune")), **fields)
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(f"the checkpoint's training configuration cannot be read back ({err}); "
                         "start a new run in another --out") from err
    if config_json(cfg) != saved:
        raise ValueError("the checkpoint's training configuration does not read back as written; "
                         "start a new run in another --out")
    return cfg


def check_resumable(cfg: TrainConfig, saved: dict, step: Optional[int] = None) -> None:
    """``cfg`` continues the run ``saved`` (its ``config_json``) exactly: only the ``RESUMABLE``
    fields differ, and ``steps``, which may grow to extend the run (not below ``step``, the
    checkpoint's)."""
    now, saved = config_json(cfg), _filled(saved)
    diff = [k for k in now if k not in RESUMABLE + ("steps",) and now[k] != saved.get(k)]
    if diff:
        was = "; ".join(f"{k} {_short(saved.get(k))} in the checkpoint, {_short(now[k])} now" for k in diff)
        raise UsageError(f"cannot resume exactly: the checkpoint was made with different {diff} "
                         f"({was}); leave those flags out to continue with the run's own settings, "
                         "or start a new run (a new --out, or --overwrite)")
    if step is not None and cfg.steps < step:
        raise UsageError(f"--steps {cfg.steps} is below the checkpoint's step {step}: a resumed run "
                         f"cannot go back; give --steps {step} or more (or leave it out)")


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 160 else text[:157] + "..."


def check_schedule(cfg: TrainConfig) -> None:
    """Every pruning round must run within ``cfg.steps`` (rounds past the end would be dropped)."""
    rounds = cfg.prune.rounds_at()
    late = [s for s, _ in rounds if s >= cfg.steps]
    if not late and rounds and cfg.prune.slice_step(rounds[-1][0]) >= cfg.steps:
        end = cfg.prune.slice_step(rounds[-1][0])
        raise UsageError(f"the last pruning round at step {rounds[-1][0]} slices its units after "
                         f"--decay-steps {cfg.prune.decay_steps}, at step {end}, past the end "
                         f"({cfg.steps} steps); use --steps {end + 1} or more, or fewer --decay-steps")
    if not late:
        return
    sched, fit = cfg.prune, len(rounds) - len(late)
    every = sched.every or sched.window
    first = sched.warmup_steps + sched.window
    raise UsageError(
        f"the {len(rounds)} pruning rounds do not fit in {cfg.steps} steps: the first runs at step "
        f"{first} and then one every {every} steps, so the last would run at step {rounds[-1][0]}; "
        f"only {fit} fit. Use --rounds {fit} or fewer, or --steps {rounds[-1][0] + 1} or more"
        if fit else
        f"the {len(rounds)} pruning rounds do not fit in {cfg.steps} steps: the first would run at "
        f"step {first}; use --steps {rounds[-1][0] + 1} or more (or fewer --rounds)")


def check_run_target(cfg: TrainConfig, groups) -> None:
    """The sparsity's kinds must be those of the model's groups (a typo would prune nothing)."""
    if cfg.prune.is_dense():
        return
    try:
        check_target(groups, sparsity=cfg.prune.sparsity, budget=cfg.prune.budget)
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from err


def check_budget(cfg: TrainConfig, params, groups) -> None:
    """A budget must be reachable: every group keeps at least one unit per block."""
    budget = cfg.prune.budget
    if budget is None or cfg.prune.is_dense():
        return
    sizes = validate(params, groups)
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    total = sum(cost[g.name] * sizes[g.name][1] for g in groups)
    most = 1.0 - sum(cost.values()) / total
    if budget > most + 1e-12:
        raise UsageError(f"--budget {budget} cannot be reached: keeping one unit per block in every "
                         f"coupled group already keeps {1 - most:.1%} of their parameters; use a "
                         f"budget of at most {math.floor(most * 1e4) / 1e4:.4f}")


def lr_schedule(cfg: TrainConfig) -> Callable[[int], float]:
    """The learning-rate schedule of a run: warm-up, then cosine decay to ``min_lr_ratio``; times
    the pruning schedule's re-warm factor after each round (``PruneSchedule.rewarm``)."""
    base = warmup_cosine(cfg.lr, min(cfg.lr_warmup, cfg.steps), cfg.steps, cfg.min_lr_ratio)
    if not cfg.prune.rewarm:
        return base
    return lambda step: base(step) * cfg.prune.lr_factor(step)


def opt_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate ``train`` uses at ``step``."""
    return lr_schedule(cfg)(step)


__all__ = ["TrainConfig", "RESUMABLE", "checkpoint_every", "lr_schedule", "opt_lr", "config_json", "config_from_json", "check_resumable",
           "check_schedule", "check_run_target", "check_budget"]
