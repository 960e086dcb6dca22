"""Coupled sparse pre-training: dense warm-up -> coupled Fisher -> aligned removal -> keep training.

The pieces (``ecospa.train.step``), usable in your own loop (see the README's "Your own loop"):
    step = make_step(loss_fn, optimizer)           # grads from torch.func.grad_and_value
    params, opt_state, loss, grads = step(params, opt_state, batch)
    imp = estimator.update(imp, old_params, grads) # importance from the step's own grads
    keep = ecospa.select(params, groups, estimator.scores(imp), sparsity=...)
    params, opt_state = ecospa.slice_units(params, groups, keep), optim.slice_state(opt_state, groups, keep)
``train(cfg)`` runs them with schedules, evaluation, JSON-lines metrics and exact resume.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional

import optree
import torch

from ecospa import _progress, optim
from ecospa._tree import count_params
from ecospa.errors import UsageError, whole
from ecospa.func.families import family
from ecospa.importance import ImportanceState
from ecospa.io import data
from ecospa.io.files import exclusive
from ecospa.prune import scale_units, slice_units
from ecospa.schedule import PruneSchedule, blend_scores, dense_sizes, kept_scores, round_target
from ecospa.select import select
from ecospa.train.config import (TrainConfig, check_budget, check_run_target, check_schedule,
                                 checkpoint_every, lr_schedule, opt_lr)
from ecospa.train.flops import forward_flops, train_step_flops
from ecospa.train.rundir import append_line, check_fresh, check_out, remove_run, trim_metrics
from ecospa.train.runtime import LOCAL
from ecospa.train.saving import (CheckpointNotSaved, Checkpointer, TrainingDiverged, all_finite,
                                 load_for_resume)
from ecospa.train.step import estimator_for, lm_loss, peak_memory_mb, self_distill_loss


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


def _choose(params, groups, scores, target, dense, schedule: PruneSchedule):
    """The units a round keeps: {group name: int64 [blocks, k]}."""
    by = "budget" if schedule.budget is not None else "sparsity"
    counts = round_target(target, groups, dense, params, by=by, scores=scores,
                          multiple_of=schedule.multiple_of)["counts"]
    return select(params, groups, scores, counts=counts)


def _slice(params, opt_state, groups, keep, schedule: PruneSchedule):
    params, opt_state = slice_units(params, groups, keep), optim.slice_state(opt_state, groups, keep)
    if schedule.moments == "reset":  # zeroed moments; the count (lr schedule, bias correction) goes on
        zeros = optree.tree_map(torch.zeros_like, params, namespace="")
        opt_state = optim.AdamWState(opt_state.count, zeros, optree.tree_map(torch.zeros_like, params,
                                                                             namespace=""))
    return params, opt_state


def _prune_round(params, opt_state, groups, scores, target, dense, schedule: PruneSchedule):
    """(params, opt_state, keep): the round's units chosen and sliced out of both trees."""
    keep = _choose(params, groups, scores, target, dense, schedule)
    return (*_slice(params, opt_state, groups, keep, schedule), keep)


def _carried(state: dict) -> Optional[dict]:
    """The importance carried from the previous round (``PruneSchedule.carry``), or None."""
    c = state.get("carried")
    return None if c is None else {k: torch.tensor(v, dtype=torch.float64) for k, v in c.items()}


def _carry_on(state: dict, schedule: PruneSchedule, scores: dict, keep: dict) -> None:
    """Keep this round's (blended) scores of its kept units for the next round (JSON in the
    checkpoint's extra: float64 values round-trip exactly)."""
    if schedule.carry:
        state["carried"] = {k: v.tolist() for k, v in kept_scores(scores, keep).items()}


def _keep_from_json(keep: dict) -> dict:
    return {k: torch.tensor(v, dtype=torch.int64) for k, v in keep.items()}


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
        checkpoint's step (from a run that was killed) are dropped first. ``cfg`` must equal the
        run's settings (``check_resumable``) except the ``RESUMABLE`` fields and ``steps``, which
        may grow to extend the run (the LR cosine then ends at the new ``steps``).
      until: stop after this many steps (saving a checkpoint) without changing the schedule;
        >= 1 and, on resume, >= the checkpoint's step.
      progress: show a tqdm bar (None, the default: a bar when stderr is a terminal, else a
        line every ~10 s with the step, loss, rate and ETA; ``ecospa._progress.bar``).
      parallel: the runtime from ``ecospa.train.runtime.init_from_env()`` for data-parallel
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
    par = parallel or LOCAL
    if not par.is_main:  # rank 0 holds the run directory's lock for all ranks
        return _train(cfg, resume, until, progress, par, overwrite)
    check_out(Path(cfg.out))  # a usable path before the lock file is made beside it
    with exclusive(cfg.out):  # one writer per run directory (a second gets the holder's pid)
        return _train(cfg, resume, until, progress, par, overwrite)


def _train(cfg: TrainConfig, resume: bool, until: Optional[int], progress: Optional[bool], par,
           overwrite: bool) -> dict:
    t_start = time.perf_counter()
    out, fam = Path(cfg.out), family(cfg.model.name)
    ckpt_path, metrics = out / "checkpoint", out / "metrics.jsonl"
    dtype, device = getattr(torch, cfg.dtype), torch.device(cfg.device)

    # --- validate everything before anything is written or trained ---
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: give one")
    if until is not None and (not whole(until) or until < 1):
        raise UsageError(f"--until must be a step >= 1, got {until!r}")
    check_out(out)
    check_schedule(cfg)
    groups = fam.coupled_groups(cfg.model)
    check_run_target(cfg, groups)
    if resume:
        ck = load_for_resume(ckpt_path, cfg)
        if until is not None and until < ck.step:
            raise UsageError(f"--until {until} is before the checkpoint's step {ck.step}: a resumed "
                             f"run cannot go back; use --until {ck.step} or more")
        replaced = []
    else:
        replaced = check_fresh(out, overwrite)
    tok = data.tokenizer(cfg.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise UsageError(f"tokenizer {cfg.tokenizer!r} has {tok.vocab_size} tokens but the model's "
                         f"vocab_size is {cfg.model.vocab_size}; raise vocab_size")
    train_ids = tok.encode(data.corpus(cfg.data, "train"))
    val = [b.to(device) for b in data.eval_batches(tok.encode(data.corpus(cfg.data, "val")),
                                                   cfg.batch_size, cfg.seq_len, cfg.eval_batches)]
    loss_fn = lm_loss(fam.forward, cfg.model)
    opt = optim.adamw(lr_schedule(cfg),
                      b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay, clip_norm=cfg.clip_norm)
    est = estimator_for(cfg.estimator, groups, cfg.seed)
    rounds = dict(cfg.prune.rounds_at())
    last_round = cfg.prune.slice_step(max(rounds)) if rounds else None  # the last slicing

    if resume:
        to_dev = lambda t: optree.tree_map(lambda x: x.to(device) if torch.is_tensor(x) else x,  # noqa: E731
                                           t, namespace="")
        params, opt_state, start = to_dev(ck.params), to_dev(ck.opt_state), ck.step
        saved = to_dev(ck.state)
        if isinstance(saved, dict):  # a self-distillation teacher was in use
            imp, teacher = ImportanceState(*saved["importance"]), saved["teacher"]
        else:
            imp, teacher = ImportanceState(*saved), None
        dense = {k: tuple(v) for k, v in ck.extra["dense"].items()}
        dense_params, done = ck.extra["dense_params"], ck.extra["rounds_done"]
        last_saved = ck.step
    else:
        params = optree.tree_map(lambda x: x.to(device), fam.init(cfg.model, cfg.seed, dtype),
                                 namespace="")
        check_budget(cfg, params, groups)
        opt_state, imp, start, done, teacher = opt.init(params), est.init(params), 0, [], None
        dense, dense_params = dense_sizes(params, groups), count_params(params)
        last_saved = None
    par.barrier()  # every rank validated the same directory before rank 0 changes it
    if par.is_main:
        if resume:
            trim_metrics(metrics, start)
        else:
            remove_run(replaced)
            out.mkdir(parents=True, exist_ok=True)
            metrics.write_text("")
    log = (lambda record: append_line(metrics, record)) if par.is_main else (lambda record: None)  # noqa: E731
    every = checkpoint_every(cfg)
    saver = Checkpointer(ckpt_path, cfg, par, every, last_saved)

    state = {"dense": dense, "dense_params": dense_params, "rounds_done": done}  # done grows in place
    state["train_flops"] = int(ck.extra.get("train_flops", 0)) if resume else 0  # ecospa.train.flops
    # soft removal in progress: {"step": round step, "target", "keep": {group: [[unit, ...], ...]}}
    state["pending"] = ck.extra.get("pending") if resume else None
    pending_keep = _keep_from_json(state["pending"]["keep"]) if state["pending"] else None
    # self-distillation in progress: {"step": round step, "end": first step without the teacher}
    state["distill"] = ck.extra.get("distill") if resume else None
    # PruneSchedule.carry: the last round's blended scores of its kept units {group: [[...]]}
    state["carried"] = ck.extra.get("carried") if resume else None

    def make_step():  # the loss: plain, or distilling from the pre-round snapshot
        fn = loss_fn if teacher is None else self_distill_loss(fam.forward, cfg.model, teacher,
                                                                 cfg.prune.distill_weight)
        return par.make_step(fn, opt, cfg.compile)

    stop = cfg.steps if until is None else min(until, cfg.steps)
    step_fn, timer, losses, val_ppl, window = make_step(), _Timer(), [], None, []
    bar = _progress.bar(cfg.steps, "train", "step", initial=start,
                        enabled=progress if par.is_main else False)
    for s in range(start, stop):
        if state["distill"] is not None and s == state["distill"]["end"]:
            teacher = state["distill"] = None
            step_fn = make_step()
            log({"event": "distill_end", "step": s})
        pend = state["pending"]
        if pend is not None and s == cfg.prune.slice_step(pend["step"]):  # fully decayed: slice
            params, opt_state = _slice(params, opt_state, groups, pending_keep, cfg.prune)
            imp, step_fn = est.init(params), make_step()
            done.append([pend["step"], pend["target"], count_params(params)])
            state["pending"] = pending_keep = None
            timer.changed()
            log({"event": "prune", "step": s, "chosen_at": pend["step"], "target": pend["target"],
                 "kept_params": count_params(params), "dense_params": dense_params})
        if s in rounds:
            scores = par.reduce_scores(est.scores(imp))  # the same kept units on every rank
            scores = blend_scores(_carried(state), scores, cfg.prune.carry)
            if cfg.prune.distill_steps:  # the model before this round teaches it after
                teacher = optree.tree_map(torch.clone, params, namespace="")
                state["distill"] = {"step": s, "end": cfg.prune.distill_end(s)}
                step_fn = make_step()
                log({"event": "distill", "step": s, "until": state["distill"]["end"]})
            if cfg.prune.decay_steps:  # soft removal: ramp the chosen units to zero, slice later
                pending_keep = _choose(params, groups, scores, rounds[s], dense, cfg.prune)
                _carry_on(state, cfg.prune, scores, pending_keep)
                state["pending"] = {"step": s, "target": rounds[s],
                                    "keep": {k: v.tolist() for k, v in pending_keep.items()}}
                imp = est.init(params)
                log({"event": "decay", "step": s, "target": rounds[s],
                     "slice_step": cfg.prune.slice_step(s), "dense_params": dense_params})
            else:
                params, opt_state, keep = _prune_round(params, opt_state, groups, scores, rounds[s], dense,
                                                       cfg.prune)
                _carry_on(state, cfg.prune, scores, keep)
                imp, step_fn = est.init(params), make_step()
                done.append([s, rounds[s], count_params(params)])
                timer.changed()
                log({"event": "prune", "step": s, "target": rounds[s],
                     "kept_params": count_params(params), "dense_params": dense_params})
        batch = data.batch_at(train_ids, s, cfg.batch_size, cfg.seq_len, cfg.seed).to(device)
        t0 = time.perf_counter()
        res = step_fn(params, opt_state, par.shard(batch))
        loss = float(res.loss)
        dt = time.perf_counter() - t0
        if not math.isfinite(loss) or not all_finite(res.params):
            bar.close()
            what = (f"loss became {loss}" if not math.isfinite(loss)
                    else f"the parameters became NaN or inf in the update (loss {loss:.4g})")
            raise TrainingDiverged(f"{what} at step {s}; {saver.where()}. Try a lower learning rate "
                                   f"(now {cfg.lr}) or a smaller clip_norm.")
        if cfg.prune.in_window(s):
            imp = est.update(imp, params, res.grads)
        params, opt_state = res.params, res.opt_state
        if state["pending"] is not None:  # the chosen units follow the soft-removal ramp
            params = scale_units(params, groups, pending_keep, cfg.prune.decay_multiplier(s))
        losses.append(loss)
        state["train_flops"] += train_step_flops(params, cfg.model.name, cfg.batch_size, cfg.seq_len)
        if teacher is not None:  # the teacher's forward (no backward)
            state["train_flops"] += forward_flops(teacher, cfg.model.name, cfg.batch_size, cfg.seq_len)
        phase = "dense" if not done else ("pruned" if s >= (last_round or 0) else None)
        timer.add(phase, dt, batch[:, 1:].numel())
        window.append((dt, batch[:, 1:].numel()))
        record = None
        if (s + 1) % cfg.log_every == 0 or s + 1 == stop:
            tps = sum(n for _, n in window) / max(sum(t for t, _ in window), 1e-9)
            record, window = {"step": s + 1, "loss": loss, "lr": opt_lr(cfg, s), "tokens_per_s": tps,
                              "kept_params": count_params(params), "dense_params": dense_params,
                              "peak_mem_mb": peak_memory_mb(cfg.device)}, []
            if teacher is not None:  # "loss" is then (1 - W) CE + W KL, not the cross-entropy alone
                record["distilling"] = cfg.prune.distill_weight
        if (s + 1) % cfg.eval_every == 0 or s + 1 == cfg.steps:
            val_ppl = math.exp(min(par.evaluate(loss_fn, params, val), 50.0))
            record = dict(record or {"step": s + 1, "loss": loss}, val_ppl=val_ppl)
        if record:
            record["train_flops"] = state["train_flops"]
            log(record)
            bar.set_postfix(loss=f"{loss:.3f}", kept=f"{count_params(params) / dense_params:.0%}")
        bar.update(1)
        if every and (s + 1) % every == 0 and s + 1 < stop:
            saver.save(s + 1, False, params, opt_state, imp, state, teacher)
    bar.close()
    saver.save(stop, True, params, opt_state, imp, state, teacher)
    if val_ppl is None:
        val_ppl = math.exp(min(par.evaluate(loss_fn, params, val), 50.0))
    kept = count_params(params)
    requested, reached = _targets(cfg, params, groups, dense, done, dense_params)
    return {"steps": stop, "dense_params": dense_params, "kept_params": kept,
            "param_reduction": 1 - kept / dense_params, "target": requested, "reached": reached,
            "val_ppl": val_ppl, "train_flops": state["train_flops"],
            "tokens_per_s_dense": timer.rate("dense"), "tokens_per_s_pruned": timer.rate("pruned"),
            "peak_mem_mb": peak_memory_mb(cfg.device), "wall_s": time.perf_counter() - t_start,
            "losses": losses, "rounds": done, "params": params, "opt_state": opt_state}


__all__ = ["TrainingDiverged", "CheckpointNotSaved", "train"]
