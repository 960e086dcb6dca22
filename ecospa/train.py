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
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import optree
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ecospa import checkpoint, data, optim
from ecospa.func import gpt2, llama
from ecospa.importance import ESTIMATORS, ImportanceState
from ecospa.prune import slice_units
from ecospa.schedule import PruneSchedule, dense_sizes, round_target, warmup_cosine
from ecospa.select import select

MODELS = {"llama": llama, "gpt2": gpt2}
# Fields that may change between a run and its resume without changing the computation.
RESUMABLE = ("out", "compile", "device", "log_every", "ckpt_every", "eval_every",
             "eval_batches")


class TrainingDiverged(ValueError):
    """The loss became NaN or inf; the last good checkpoint is left intact."""


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
    ckpt_every: int = 0          # 0: only at the end (and when stopped with ``until``)
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
        for k in ("batch_size", "seq_len", "steps", "eval_every", "log_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


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
        raise ValueError(f"cannot resume exactly: the checkpoint was made with different {diff}; "
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


def train(cfg: TrainConfig, *, resume: bool = False, until: Optional[int] = None,
          progress: Optional[bool] = None, parallel=None) -> dict:
    """Run (or resume) coupled sparse pre-training; returns a summary dict.

    Args:
      cfg: the run's settings; checkpoints and ``metrics.jsonl`` go to ``cfg.out``.
      resume: continue from ``cfg.out/checkpoint`` exactly (same batches, params, moments,
        importance and pruning so far; bit-identical losses on CPU).
      until: stop after this many steps (saving a checkpoint) without changing the schedule.
      progress: show a tqdm bar (default: when stderr is a terminal).
      parallel: the runtime from ``ecospa.distributed.init_from_env()`` for data-parallel
        training under torchrun (each rank takes its rows of the global batch; rank 0 writes
        files); default: one process.
    Returns:
      dict with dense_params, kept_params, val_ppl, tokens_per_s_dense/_pruned, peak_mem_mb,
      wall_s, losses (this call's), rounds, and the final params / opt_state.
    Raises:
      TrainingDiverged: the loss became NaN/inf (the last good checkpoint stays intact).
    """
    from ecospa.distributed import LOCAL
    par = parallel or LOCAL
    t_start = time.perf_counter()
    out, family = Path(cfg.out), MODELS[cfg.model.name]
    ckpt_path, metrics = out / "checkpoint", out / "metrics.jsonl"
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)
    tok = data.tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.model.vocab_size}; raise vocab_size")
    train_ids = tok.encode(data.corpus(cfg.data, "train"))
    val = [b.to(device) for b in data.eval_batches(tok.encode(data.corpus(cfg.data, "val")),
                                                   cfg.batch_size, cfg.seq_len, cfg.eval_batches)]
    groups = family.coupled_groups(cfg.model)
    loss_fn = lm_loss(family.forward, cfg.model)
    opt = optim.adamw(warmup_cosine(cfg.lr, min(cfg.lr_warmup, cfg.steps), cfg.steps, cfg.min_lr_ratio),
                      b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    est = estimator_for(cfg.estimator, groups, cfg.seed)
    rounds = dict(cfg.prune.rounds_at())
    last_round = max(rounds) if rounds else None

    if resume:
        ck = checkpoint.load_full(ckpt_path)
        _check_resume(cfg, ck.extra["train_config"])
        to_dev = lambda t: optree.tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x,  # noqa: E731
                                           t, namespace="")
        params, opt_state, start = to_dev(ck.params), to_dev(ck.opt_state), ck.step
        imp = ImportanceState(*to_dev(ck.state))
        dense = {k: tuple(v) for k, v in ck.extra["dense"].items()}
        dense_params, done = ck.extra["dense_params"], ck.extra["rounds_done"]
    else:
        params = optree.tree_map(lambda x: x.to(device), family.init(cfg.model, cfg.seed, dtype),
                                 namespace="")
        opt_state, imp, start, done = opt.init(params), est.init(params), 0, []
        dense, dense_params = dense_sizes(params, groups), count_params(params)
        if par.is_main:
            out.mkdir(parents=True, exist_ok=True)
            metrics.write_text("")
    log = (lambda record: _write_line(metrics, record)) if par.is_main else (lambda record: None)  # noqa: E731

    def save(step):
        extra = {"train_config": _config_json(cfg), "dense": dense, "dense_params": dense_params,
                 "rounds_done": done}
        if par.is_main:  # the checkpoint holds only the global state: written once
            checkpoint.save(ckpt_path, params, cfg.model, opt_state=opt_state, state=tuple(imp),
                            extra=extra, step=step)
        par.barrier()

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
        if not math.isfinite(loss):
            bar.close()
            raise TrainingDiverged(f"loss became {loss} at step {s}; the last good checkpoint in "
                                   f"{ckpt_path} is intact. Try a lower learning rate (now {cfg.lr}) "
                                   "or a smaller clip_norm.")
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
        if cfg.ckpt_every and (s + 1) % cfg.ckpt_every == 0 and s + 1 < stop:
            save(s + 1)
    bar.close()
    save(stop)
    if val_ppl is None:
        val_ppl = math.exp(min(par.evaluate(loss_fn, params, val), 50.0))
    kept = count_params(params)
    return {"steps": stop, "dense_params": dense_params, "kept_params": kept,
            "param_reduction": 1 - kept / dense_params, "val_ppl": val_ppl,
            "tokens_per_s_dense": timer.rate("dense"), "tokens_per_s_pruned": timer.rate("pruned"),
            "peak_mem_mb": peak_memory_mb(cfg.device), "wall_s": time.perf_counter() - t_start,
            "losses": losses, "rounds": done, "params": params, "opt_state": opt_state}


def opt_lr(cfg: TrainConfig, step: int) -> float:
    """The learning rate ``train`` uses at ``step``."""
    return warmup_cosine(cfg.lr, min(cfg.lr_warmup, cfg.steps), cfg.steps, cfg.min_lr_ratio)(step)


__all__ = ["TrainConfig", "TrainingDiverged", "train", "make_step", "lm_loss", "evaluate",
           "count_params", "peak_memory_mb", "StepOut", "opt_lr"]
