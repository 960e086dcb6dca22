"""Coupled sparse pre-training: dense warm-up -> coupled Fisher -> aligned removal -> keep training.

The pieces, usable in your own loop (see ``tests/test_train.py::test_custom_loop_example``):
    step = make_step(loss_fn, optimizer)           # grads from torch.func.grad_and_value
    params, opt_state, loss, grads = step(params, opt_state, batch)
    imp = estimator.update(imp, old_params, grads) # importance from the step's own grads
    keep = ecospa.select(params, groups, estimator.scores(imp), sparsity=...)
    params, opt_state = ecospa.slice_units(params, groups, keep), optim.slice_state(opt_state, groups, keep)
``train(cfg)`` runs them with schedules, evaluation, JSON-lines metrics and exact resume.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import resource
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import optree
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ecospa import checkpoint, data, optim
from ecospa.errors import UsageError
from ecospa.func import gpt2, llama
from ecospa.groups import validate
from ecospa.importance import ESTIMATORS, ImportanceState
from ecospa.prune import slice_units
from ecospa.schedule import PruneSchedule, dense_sizes, round_target, warmup_cosine
from ecospa.select import check_target, select

MODELS = {"llama": llama, "gpt2": gpt2}
# Fields that may change between a run and its resume without changing the computation.
RESUMABLE = ("out", "compile", "device", "log_every", "ckpt_every", "eval_every",
             "eval_batches")


# The files a run writes into ``out`` (besides leftovers of interrupted writes).
RUN_FILES = ("checkpoint", "metrics.jsonl", "summary.json")


class TrainingDiverged(ValueError):
    """The loss or the parameters became NaN or inf; the last good checkpoint is left intact
    (nothing non-finite is ever saved)."""


class CheckpointNotSaved(OSError):
    """The final checkpoint could not be written; the message names the one that is intact."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything a pre-training run needs (presets in ``ecospa.presets``)."""

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
        if getattr(self.model, "name", None) not in MODELS:
            raise ValueError(f"model must be a llama.Config or gpt2.Config, got {type(self.model).__name__}")
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {sorted(ESTIMATORS)}, got {self.estimator!r}")
        if self.dtype not in ("float32", "bfloat16", "float64"):
            raise ValueError(f"dtype must be float32, bfloat16 or float64, got {self.dtype!r}")
        for k in ("batch_size", "seq_len", "steps", "eval_every", "log_every", "eval_batches"):
            if not _is_int(getattr(self, k)) or getattr(self, k) < 1:
                raise UsageError(f"{k} must be a whole number >= 1, got {getattr(self, k)!r}")
        if self.ckpt_every is not None and (not _is_int(self.ckpt_every) or self.ckpt_every < 0):
            raise UsageError(f"ckpt_every must be a whole number >= 0 (0: only at the end) or None "
                             f"(at every evaluation), got {self.ckpt_every!r}")
        if not _is_int(self.lr_warmup) or self.lr_warmup < 0:
            raise UsageError(f"lr_warmup must be a whole number >= 0, got {self.lr_warmup!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"lr must be a finite number > 0, got {self.lr!r}")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def checkpoint_every(cfg: TrainConfig) -> int:
    """Steps between periodic checkpoints (0: none before the end): ``cfg.ckpt_every``, or the
    evaluation interval when it is None (the default), so a kill loses at most one interval."""
    return cfg.eval_every if cfg.ckpt_every is None else cfg.ckpt_every


def lm_loss(forward: Callable, model_cfg) -> Callable:
    """``loss_fn(params, batch)``: next-token cross-entropy on batch [B, T+1] (float32)."""
    def loss_fn(params, batch):
        logits = forward(params, batch[:, :-1], model_cfg)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    return loss_fn


class StepOut(NamedTuple):
    params: Any
    opt_state: optim.AdamWState
    loss: torch.Tensor
    grads: Any


def make_step(loss_fn: Callable, optimizer: optim.Optimizer, compile: bool = False) -> Callable:
    """``step(params, opt_state, batch) -> StepOut(params, opt_state, loss, grads)``, pure.

    ``compile=True`` compiles the loss-and-gradient function with ``torch.compile`` (the
    optimizer's foreach update stays eager). Build a new step after pruning: shapes change.
    """
    grad_fn = torch.func.grad_and_value(loss_fn)
    if compile:
        grad_fn = torch.compile(grad_fn, dynamic=False)

    def step(params, opt_state, batch):
        grads, loss = grad_fn(params, batch)
        new_params, new_state = optimizer.update(grads, opt_state, params)
        return StepOut(new_params, new_state, loss.detach(), grads)

    return step


def count_params(params) -> int:
    return sum(x.numel() for x in optree.tree_leaves(params, namespace=""))


def peak_memory_mb(device: str) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate(loss_fn: Callable, params, batches) -> float:
    """Mean loss over fixed batches, weighted by tokens."""
    total = n = 0.0
    for b in batches:
        total += float(loss_fn(params, b)) * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return total / n


def estimator_for(name: str, groups, seed: int):
    return ESTIMATORS[name](groups, seed=seed) if name == "random" else ESTIMATORS[name](groups)


def _config_json(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def _check_resume(cfg: TrainConfig, saved: dict) -> None:
    now = _config_json(cfg)
    diff = [k for k in now if k not in RESUMABLE and now[k] != saved.get(k)]
    if diff:
        raise UsageError(f"cannot resume exactly: the checkpoint was made with different {diff}; "
                         "use the same settings (or a new --out)")


class _Timer:
    """Tokens/s over the dense phase and over the final (fully pruned) phase, skipping the first
    steps after each shape change (compilation, allocator warm-up)."""

    def __init__(self, skip: int = 3):
        self.skip, self.since_change, self.phases = skip, 0, {"dense": [0.0, 0], "pruned": [0.0, 0]}

    def changed(self):
        self.since_change = 0

    def add(self, phase: Optional[str], seconds: float, tokens: int):
        self.since_change += 1
        if phase and self.since_change > self.skip:
            self.phases[phase][0] += seconds
            self.phases[phase][1] += tokens

    def rate(self, phase: str) -> Optional[float]:
        s, t = self.phases[phase]
        return t / s if s > 0 else None


def _write_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _prune_round(params, opt_state, groups, scores, target, dense, schedule: PruneSchedule):
    by = "budget" if schedule.budget is not None else "sparsity"
    keep = select(params, groups, scores, **round_target(target, groups, dense, params, by=by))
    return slice_units(params, groups, keep), optim.slice_state(opt_state, groups, keep)


def _all_finite(tree) -> bool:
    """Whether every floating-point tensor in ``tree`` is finite (one device sync)."""
    xs = [x for x in optree.tree_leaves(tree, namespace="") if torch.is_tensor(x) and x.is_floating_point()]
    if not xs:
        return True
    try:  # the norms are NaN/inf iff a value is (or is so large that its norm overflows)
        norms = torch._foreach_norm(xs)
        return bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all())
    except (RuntimeError, AttributeError, TypeError):  # mixed devices, an older torch
        return all(bool(torch.isfinite(x).all()) for x in xs)


def _check_out(out: Path) -> None:
    """``out`` must be (or become) a writable directory: not a file, not under a file."""
    try:
        for p in (out, *out.parents):
            if p.exists():
                if not p.is_dir():
                    raise UsageError(f"--out {out}: {p} is a file, not a directory; choose another --out")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise UsageError(f"--out {out}: {p} is not writable; choose another --out")
                return
    except OSError as err:  # a name too long, a loop of symlinks, ...
        shown = str(out) if len(str(out)) < 200 else str(out)[:80] + "..." + str(out)[-40:]
        raise UsageError(f"--out {shown}: {err.strerror or err}; choose another --out") from err


def _run_files(out: Path) -> list:
    """What a previous run left in ``out``: our files and the leftovers of interrupted writes."""
    if not out.is_dir():
        return []
    found = [out / n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    leftovers = [p for n in RUN_FILES for p in out.glob(f".{n}.*-*")
                 if any(f".{n}.{k}-" in p.name for k in ("old", "tmp", "trash"))]
    return found + sorted(leftovers)


def _check_fresh(out: Path, overwrite: bool) -> list:
    """A new run needs a directory without another run's files; ``overwrite`` allows replacing
    them (only ours: a foreign ``checkpoint`` is refused). Returns what is to be replaced."""
    found = _run_files(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UsageError(f"{out} already holds a training run ({names}); use --resume to continue "
                         "it, --overwrite to replace it, or another --out")
    ck = out / "checkpoint"
    if ck in found and (ck.is_symlink() or not ck.is_dir() or not (ck / "manifest.json").is_file()):
        raise UsageError(f"{ck} is not an ecospa checkpoint; --overwrite replaces only ecospa's own "
                         "files: move it away or choose another --out")
    for name in ("metrics.jsonl", "summary.json"):
        if out / name in found and ((out / name).is_symlink() or not (out / name).is_file()):
            raise UsageError(f"{out / name} is not a file ecospa wrote; move it away or choose "
                             "another --out")
    return found


def _remove_run(paths: list) -> None:
    """Delete a previous run's files (from ``_run_files``): each is renamed aside first, so a kill
    midway leaves no partial checkpoint that could pass for a complete one; the checkpoint's
    leftovers and the checkpoint go before the metrics and the summary."""
    def base(p: Path) -> str:
        return next(n for n in RUN_FILES if p.name == n or p.name.startswith(f".{n}."))

    order = {"checkpoint": 0, "summary.json": 1, "metrics.jsonl": 2}
    for p in sorted(paths, key=lambda p: (not p.name.startswith("."), order[base(p)])):
        if not (p.exists() or p.is_symlink()):
            continue
        trash = p if ".trash-" in p.name else p.with_name(f".{base(p)}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(p, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step`` (the checkpoint's), atomically: a resumed
    run writes the later ones again."""
    kept = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if not isinstance(r, dict) or not _is_int(r.get("step")):
                continue
            # a prune event at step s happens before step s trains; a record at s after it
            if r["step"] < step or (r["step"] == step and "event" not in r):
                kept.append(line)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w") as f:
            f.write("".join(x + "\n" for x in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _check_schedule(cfg: TrainConfig) -> None:
    """Every pruning round must run within ``cfg.steps`` (rounds past the end would be dropped)."""
    rounds = cfg.prune.rounds_at()
    late = [s for s, _ in rounds if s >= cfg.steps]
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


def _check_target(cfg: TrainConfig, groups) -> None:
    """The sparsity's kinds must be those of the model's groups (a typo would prune nothing)."""
    if cfg.prune.is_dense():
        return
    try:
        check_target(groups, sparsity=cfg.prune.sparsity, budget=cfg.prune.budget)
    except UsageError:
        raise
    except ValueError as err:
        raise UsageError(str(err)) from err


def _check_budget(cfg: TrainConfig, params, groups) -> None:
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


def _load_for_resume(ckpt_path: Path, cfg: TrainConfig) -> checkpoint.Checkpoint:
    try:
        ck = checkpoint.load_full(ckpt_path)
    except FileNotFoundError as err:
        raise UsageError(f"--resume: {err}: there is no checkpoint to continue from; start a new "
                         "run without --resume (with --overwrite if the directory holds an "
                         "unfinished one)") from err
    extra = ck.extra
    if not isinstance(extra.get("train_config"), dict):
        raise UsageError(f"--resume: {ckpt_path} was not written by `ecospa train` (it holds no "
                         "training state; `ecospa compress` writes such checkpoints): evaluate or "
                         "compress it instead, or start a new run in another --out")
    state_ok = (isinstance(extra.get("dense"), dict) and _is_int(extra.get("dense_params"))
                and isinstance(extra.get("rounds_done"), list) and ck.opt_state is not None
                and isinstance(ck.state, (tuple, list)) and _is_int(ck.step) and ck.step >= 0)
    if not state_ok:
        raise ValueError(f"{ckpt_path}: the training state in the checkpoint is incomplete "
                         "(dense sizes, rounds, optimizer or importance state, step)")
    if not _all_finite(ck.params):
        raise ValueError(f"{ckpt_path} holds NaN or inf parameters (written after the loss diverged, "
                         "by an ecospa before issue 9's fix); start a new run (--overwrite) with a "
                         "lower learning rate")
    _check_resume(cfg, extra["train_config"])
    return ck


def _targets(cfg: TrainConfig, params, groups, dense: dict, done: list, dense_params: int) -> tuple:
    """(requested, reached): the schedule's final target and what the current tree removed."""
    sched = cfg.prune
    requested = {"sparsity": sched.sparsity if not sched.is_dense() else 0.0,
                 "budget": sched.budget, "rounds": len(sched.rounds_at())}
    now = dense_sizes(params, groups)
    units: dict = {}
    for g in groups:
        d, n = units.get(g.kind, (0, 0))
        units[g.kind] = (d + dense[g.name][0], n + now[g.name][0])
    group0 = sum(v[1] for v in dense.values())
    kept = count_params(params)
    reached = {"sparsity": {k: 1 - n / d for k, (d, n) in units.items()},
               "budget": 1 - sum(v[1] for v in now.values()) / group0 if group0 else 0.0,
               "rounds": len(done), "param_reduction": 1 - kept / dense_params}
    return requested, reached


def train(cfg: TrainConfig, *, resume: bool = False, until: Optional[int] = None,
          progress: Optional[bool] = None, parallel=None, overwrite: bool = False) -> dict:
    """Run (or resume) coupled sparse pre-training; returns a summary dict.

    Everything is validated before the first step (flags, the output directory, the schedule
    against ``cfg.steps``, the target against the model); nothing is written until then.

    Args:
      cfg: the run's settings; checkpoints and ``metrics.jsonl`` go to ``cfg.out``.
      resume: continue from ``cfg.out/checkpoint`` exactly (same batches, params, moments,
        importance and pruning so far; bit-identical losses on CPU). Metric lines after the
        checkpoint's step (from a run that was killed) are dropped first.
      until: stop after this many steps (saving a checkpoint) without changing the schedule;
        >= 1 and, on resume, >= the checkpoint's step.
      progress: show a tqdm bar (default: when stderr is a terminal).
      parallel: the runtime from ``ecospa.distributed.init_from_env()`` for data-parallel
        training under torchrun (each rank takes its rows of the global batch; rank 0 writes
        files); default: one process.
      overwrite: a new run may replace a previous run's files in ``cfg.out`` (only ecospa's own:
        checkpoint, metrics.jsonl, summary.json, leftovers); without it such a directory is
        refused, so two runs never mix.
    Returns:
      dict with dense_params, kept_params, param_reduction, target (requested) and reached,
      val_ppl, tokens_per_s_dense/_pruned, peak_mem_mb, wall_s, losses (this call's), rounds,
      and the final params / opt_state.
    Raises:
      UsageError: invalid settings, found before training.
      TrainingDiverged: the loss or the parameters became NaN/inf (the last good checkpoint
        stays intact; the message says which step it holds, or that there is none).
      CheckpointNotSaved: the final checkpoint could not be written (the message names the
        checkpoint that is intact). A failed periodic save only warns and training goes on.
    """
    from ecospa.distributed import LOCAL
    par = parallel or LOCAL
    t_start = time.perf_counter()
    out, family = Path(cfg.out), MODELS[cfg.model.name]
    ckpt_path, metrics = out / "checkpoint", out / "metrics.jsonl"
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)

    # --- validate everything before anything is written or trained ---
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one")
    if until is not None and (not _is_int(until) or until < 1):
        raise UsageError(f"--until must be a step >= 1, got {until!r}")
    _check_out(out)
    _check_schedule(cfg)
    groups = family.coupled_groups(cfg.model)
    _check_target(cfg, groups)
    if resume:
        ck = _load_for_resume(ckpt_path, cfg)
        if until is not None and until < ck.step:
            raise UsageError(f"--until {until} is before the checkpoint's step {ck.step}: a resumed "
                             f"run cannot go back; use --until {ck.step} or more")
        replaced = []
    else:
        replaced = _check_fresh(out, overwrite)
    tok = data.tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.model.vocab_size}; raise vocab_size")
    train_ids = tok.encode(data.corpus(cfg.data, "train"))
    val = [b.to(device) for b in data.eval_batches(tok.encode(data.corpus(cfg.data, "val")),
                                                   cfg.batch_size, cfg.seq_len, cfg.eval_batches)]
    loss_fn = lm_loss(family.forward, cfg.model)
    opt = optim.adamw(warmup_cosine(cfg.lr, min(cfg.lr_warmup, cfg.steps), cfg.steps, cfg.min_lr_ratio),
                      b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    est = estimator_for(cfg.estimator, groups, cfg.seed)
    rounds = dict(cfg.prune.rounds_at())
    last_round = max(rounds) if rounds else None

    if resume:
        to_dev = lambda t: optree.tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x,  # noqa: E731
                                           t, namespace="")
        params, opt_state, start = to_dev(ck.params), to_dev(ck.opt_state), ck.step
        imp = ImportanceState(*to_dev(ck.state))
        dense = {k: tuple(v) for k, v in ck.extra["dense"].items()}
        dense_params, done = ck.extra["dense_params"], ck.extra["rounds_done"]
        last_saved = ck.step
    else:
        params = optree.tree_map(lambda x: x.to(device), family.init(cfg.model, cfg.seed, dtype),
                                 namespace="")
        _check_budget(cfg, params, groups)
        opt_state, imp, start, done = opt.init(params), est.init(params), 0, []
        dense, dense_params = dense_sizes(params, groups), count_params(params)
        last_saved = None
    par.barrier()  # every rank validated the same directory before rank 0 changes it
    if par.is_main:
        if resume:
            _trim_metrics(metrics, start)
        else:
            _remove_run(replaced)
            out.mkdir(parents=True, exist_ok=True)
            metrics.write_text("")
    log = (lambda record: _write_line(metrics, record)) if par.is_main else (lambda record: None)  # noqa: E731

    def where() -> str:
        if last_saved is None:
            return f"no checkpoint was written (checkpoints every {every} steps)" if every else \
                "no checkpoint was written (--ckpt-every 0: only at the end)"
        return f"the last good checkpoint (step {last_saved}) in {ckpt_path} is intact"

    def save(step: int, final: bool) -> None:
        nonlocal last_saved
        if not _all_finite(params):  # never written as "last good"
            raise TrainingDiverged(f"the parameters are NaN or inf at step {step}; not saved; "
                                   f"{where()}. Try a lower learning rate (now {cfg.lr}).")
        extra = {"train_config": _config_json(cfg), "dense": dense, "dense_params": dense_params,
                 "rounds_done": done}
        if par.is_main:  # the checkpoint holds only the global state: written once
            try:
                checkpoint.save(ckpt_path, params, cfg.model, opt_state=opt_state, state=tuple(imp),
                                extra=extra, step=step)
            except Exception as err:  # noqa: BLE001  (disk full, read-only, a missing module, ...)
                kept = (f"the previous checkpoint (step {last_saved}) in {ckpt_path} is intact"
                        if last_saved is not None else "no checkpoint has been written yet")
                what = f"could not save the checkpoint at step {step} ({type(err).__name__}: {err}); {kept}"
                if final:
                    raise CheckpointNotSaved(f"{what}. Fix the cause and run again"
                                             + (" with --resume" if last_saved is not None else "")
                                             ) from err
                tqdm.write(f"warning: {what}; training goes on and saves again at the next "
                           "checkpoint", file=sys.stderr)
            else:
                last_saved = step
        par.barrier()

    every = checkpoint_every(cfg)
    stop = cfg.steps if until is None else min(until, cfg.steps)
    step_fn, timer, losses, val_ppl, window = par.make_step(loss_fn, opt, cfg.compile), _Timer(), [], None, []
    bar = tqdm(total=cfg.steps, initial=start, disable=not par.is_main or not (
        sys.stderr.isatty() if progress is None else progress))
    for s in range(start, stop):
        if s in rounds:
            scores = par.reduce_scores(est.scores(imp))  # the same kept units on every rank
            params, opt_state = _prune_round(params, opt_state, groups, scores, rounds[s], dense, cfg.prune)
            imp, step_fn = est.init(params), par.make_step(loss_fn, opt, cfg.compile)
            done.append([s, rounds[s], count_params(params)])
            timer.changed()
            log({"event": "prune", "step": s, "target": rounds[s],
                 "kept_params": count_params(params), "dense_params": dense_params})
        batch = data.batch_at(train_ids, s, cfg.batch_size, cfg.seq_len, cfg.seed).to(device)
        t0 = time.perf_counter()
        res = step_fn(params, opt_state, par.shard(batch))
        loss = float(res.loss)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss) or not _all_finite(res.params):
            bar.close()
            what = (f"loss became {loss}" if not math.isfinite(loss)
                    else f"the parameters became NaN or inf in the update (loss {loss:.4g})")
            raise TrainingDiverged(f"{what} at step {s}; {where()}. Try a lower learning rate "
                                   f"(now {cfg.lr}) or a smaller clip_norm.")
        if cfg.prune.in_window(s):
            imp = est.update(imp, params, res.grads)
        params, opt_state = res.params, res.opt_state
        losses.append(loss)
        phase = "dense" if not done else ("pruned" if s >= (last_round or 0) else None)
        timer.add(phase, dt, batch[:, 1:].numel())
        window.append((dt, batch[:, 1:].numel()))
        record = None
        if (s + 1) % cfg.log_every == 0 or s + 1 == stop:
            tps = sum(n for _, n in window) / max(sum(t for t, _ in window), 1e-9)
            record, window = {"step": s + 1, "loss": loss, "lr": opt_lr(cfg, s), "tokens_per_s": tps,
                              "kept_params": count_params(params), "dense_params": dense_params,
                              "peak_mem_mb": peak_memory_mb(cfg.device)}, []
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            val_ppl = math.exp(min(par.evaluate(loss_fn, params, val), 50.0))
            record = dict(record or {"step": s + 1, "loss": loss}, val_ppl=val_ppl)
        if record:
            log(record)
            bar.set_postfix(loss=f"{loss:.3f}", kept=f"{count_params(params) / dense_params:.0%}")
        bar.update(1)
        if every and (s + 1) % every == 0 and s + 1 < stop:
            save(s + 1, final=False)
    bar.close()
    save(stop, final=True)
    if val_ppl is None:
        val_ppl = math.exp(min(par.evaluate(loss_fn, params, val), 50.0))
    kept = count_params(params)
    requested, reached = _targets(cfg, params, groups, dense, done, dense_params)
    return {"steps": stop, "dense_params": dense_params, "kept_params": kept,
            "param_reduction": 1 - kept / dense_params, "target": requested, "reached": reached,
            "val_ppl": val_ppl,
            "tokens_per_s_dense": timer.rate("dense"), "tokens_per_s_pruned": timer.rate("pruned"),
            "peak_mem_mb": peak_memory_mb(cfg.device), "wall_s": time.perf_counter() - t_start,
            "losses": losses, "rounds": done, "params": params, "opt_state": opt_state}


def opt_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate ``train`` uses at ``step``."""
    return warmup_cosine(cfg.lr, min(cfg.lr_warmup, cfg.steps), cfg.steps, cfg.min_lr_ratio)(step)


__all__ = ["TrainConfig", "TrainingDiverged", "CheckpointNotSaved", "checkpoint_every", "train", "make_step", "lm_loss", "evaluate",
           "count_params", "peak_memory_mb", "StepOut", "opt_lr"]
