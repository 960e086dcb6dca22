"""Schedules: the learning rate (``warmup_cosine``) and the sparsity (``PruneSchedule``).

A pruning schedule for pre-training from scratch (PAPER §5): ``warmup_steps`` dense steps, then
``rounds`` pruning rounds ``every`` steps apart; importance is accumulated over the ``window``
steps just before each round. The cumulative target after round r (0-based) samples the ramp,
``final * ramp((r + 1) / rounds)``, with ``ramp(t) = 1 - (1 - t)**3`` (cubic, front-loaded, as in
gradual magnitude pruning) or ``t`` (linear).

Soft removal (``decay_steps`` D > 0): the units a round chooses at step ``s`` are not sliced at
once. After each of the steps ``s .. s+D-1`` their coupled weights (``ecospa.prune.scale_units``)
are multiplied by ``decay_multiplier``, so that without updates they would follow the ramp
``1 - (k+1)/D`` after step ``s+k``: exactly 0 after step ``s+D-1``. They are sliced out before
step ``s+D`` (``slice_step``), when they contribute nothing. Until then they are computed (and
counted as dense FLOPs).

Gradual shrinking (``gradual``): many small rounds spread evenly over a span of the run (by
default 25%-75% of the steps).

Targets are always relative to the ORIGINAL dense model. After the first round the tree is
smaller, so ``round_target`` converts a cumulative target into the units every group of the
CURRENT tree keeps (``select(..., counts=...)``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence, Union

import torch

from ecospa._types import Params, Scores
from ecospa.errors import check_fraction
from ecospa.groups import Group, validate
from ecospa.allocation import aligned, check_multiple_of, steps
from ecospa.allocation import counts as allocation_counts
from ecospa.select import Sparsity


def warmup_cosine(peak_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warm-up from 0 to ``peak_lr`` over ``warmup`` steps, then cosine decay to
    ``min_ratio * peak_lr`` at step ``total`` (constant after).

    Example: ``lr = warmup_cosine(1e-3, 100, 1000); lr(0) == 1e-5``.
    """
    if not peak_lr >= 0 or warmup < 0 or total < 1 or warmup > total:
        raise ValueError(f"need peak_lr >= 0 and 0 <= warmup <= total, total >= 1; got "
                         f"peak_lr={peak_lr}, warmup={warmup}, total={total}")
    if not 0 <= min_ratio <= 1:
        raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")

    def lr(step: int) -> float:
        if step < warmup:
            return peak_lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return peak_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))

    return lr


MOMENTS = ("carry", "reset")
RAMPS = {"cubic": lambda t: 1.0 - (1.0 - t) ** 3, "linear": lambda t: t}
Target = Union[float, Mapping[str, float]]


@dataclass(frozen=True)
class PruneSchedule:
    """When to prune and how much (cumulative, relative to the dense model).

    warmup_steps: dense steps before the first estimation window starts.
    window: steps of importance accumulation before each round.
    rounds: number of pruning rounds (0: stay dense).
    every: steps between rounds (default: ``window``); must be >= ``window``.
    ramp: "cubic" or "linear" (how the cumulative target grows over the rounds).
    sparsity: final fraction of units removed per group (float or {kind: float}); or
    budget: final fraction of the groups' parameters removed, allocated globally.
    (Neither given: sparsity 0.5.)
    multiple_of: blocks x units kept a multiple of this (or all units): kernel-friendly widths.
    rewarm: after each round the learning rate ramps linearly from lr/rewarm back to the
      schedule's value over this many steps (0: no re-warm).
    moments: "carry" (default: the AdamW moments are sliced with the params) or "reset" (zeroed
      after each round; the step count, and so the lr schedule and bias correction, go on).
    decay_steps: soft removal: the chosen units ramp to exactly zero over this many steps and are
      sliced after it (0: sliced at once); needs ``every >= window + decay_steps``.
    distill_steps: self-distillation: from each round's step until this many steps after its
      slicing, the loss is ``(1 - distill_weight) x cross-entropy + distill_weight x
      KL(teacher || model)``, the teacher being a frozen copy of the model taken just before the
      round (0: off). A later round's snapshot replaces an earlier one.
    distill_weight: the KL term's weight in (0, 1] (1: KL only).
    carry: importance carried across rounds, in [0, 1): each round's scores (divided by their
      mean over every unit, a scale that does not change which units a round keeps) become
      ``carry x`` the previous round's blended scores of the units it kept ``+ (1 - carry) x``
      this round's own window (an EMA over rounds; 0: each round sees only its own window).
    """

    warmup_steps: int = 100
    window: int = 20
    rounds: int = 1
    every: Optional[int] = None
    ramp: str = "cubic"
    sparsity: Optional[Sparsity] = None
    budget: Optional[float] = None
    multiple_of: int = 1
    rewarm: int = 0
    moments: str = "carry"
    decay_steps: int = 0
    distill_steps: int = 0
    distill_weight: float = 0.5
    carry: float = 0.0

    def __post_init__(self):
        check_multiple_of(self.multiple_of)
        if isinstance(self.decay_steps, bool) or not isinstance(self.decay_steps, int) or self.decay_steps < 0:
            raise ValueError(f"decay_steps must be a whole number of steps >= 0, got {self.decay_steps!r}")
        if self.decay_steps and self.rounds > 1 and (self.every or self.window) < self.window + self.decay_steps:
            raise ValueError(f"every={self.every} must be >= window + decay_steps = "
                             f"{self.window + self.decay_steps}: a round's units must be sliced "
                             "before the next round's estimation window starts")
        if isinstance(self.distill_steps, bool) or not isinstance(self.distill_steps, int) or self.distill_steps < 0:
            raise ValueError(f"distill_steps must be a whole number of steps >= 0, got {self.distill_steps!r}")
        if (isinstance(self.distill_weight, bool) or not isinstance(self.distill_weight, (int, float))
                or not 0 < self.distill_weight <= 1):
            raise ValueError(f"distill_weight must be in (0, 1] (the KL term's share of the loss), "
                             f"got {self.distill_weight!r}")
        check_fraction(self.carry, "carry (the previous rounds' share of a round's importance)")
        if isinstance(self.rewarm, bool) or not isinstance(self.rewarm, int) or self.rewarm < 0:
            raise ValueError(f"rewarm must be a whole number of steps >= 0, got {self.rewarm!r}")
        if self.moments not in MOMENTS:
            raise ValueError(f"moments must be one of {MOMENTS}, got {self.moments!r}")
        if self.sparsity is not None and self.budget is not None:
            raise ValueError("PruneSchedule: give exactly one of sparsity= or budget=")
        if self.sparsity is None and self.budget is None:
            object.__setattr__(self, "sparsity", 0.5)
        if self.ramp not in RAMPS:
            raise ValueError(f"ramp must be one of {sorted(RAMPS)}, got {self.ramp!r}")
        if min(self.warmup_steps, self.rounds) < 0 or self.window < 1:
            raise ValueError(f"need warmup_steps >= 0, rounds >= 0, window >= 1; got {self}")
        if self.every is not None and self.every < self.window:
            raise ValueError(f"every={self.every} must be >= window={self.window}: "
                             "estimation windows may not overlap a previous round")
        for kind, v in self._final_items():
            check_fraction(v, f"{'budget' if self.budget is not None else 'sparsity'}[{kind}]")

    def _final_items(self):
        final = self.budget if self.budget is not None else self.sparsity
        return final.items() if isinstance(final, Mapping) else [("all", final)]

    @property
    def final(self) -> Target:
        return self.budget if self.budget is not None else self.sparsity

    def _scaled(self, f: float) -> Target:
        final = self.final
        if isinstance(final, Mapping):
            return {k: v * f for k, v in final.items()}
        return final * f

    def is_dense(self) -> bool:
        return self.rounds == 0 or all(v == 0 for _, v in self._final_items())

    def rounds_at(self) -> list:
        """[(step, cumulative target)] for every round; the round runs before step ``step``."""
        if self.is_dense():
            return []
        every = self.every or self.window
        ramp = RAMPS[self.ramp]
        return [(self.warmup_steps + self.window + r * every, self._scaled(ramp((r + 1) / self.rounds)))
                for r in range(self.rounds)]

    def target_at(self, step: int) -> Target:
        """Cumulative target in force at ``step`` (0 before the first round)."""
        current = self._scaled(0.0)
        for s, target in self.rounds_at():
            if s <= step:
                current = target
        return current

    def lr_factor(self, step: int) -> float:
        """The re-warm factor at ``step`` (1.0 without ``rewarm``): ``min(1, (step - r + 1) / rewarm)``
        after the last round ``r <= step``."""
        past = [s for s, _ in self.rounds_at() if s <= step] if self.rewarm else []
        return min(1.0, (step - past[-1] + 1) / self.rewarm) if past else 1.0

    def slice_step(self, round_step: int) -> int:
        """The step before which the units chosen at ``round_step`` are sliced out."""
        return round_step + self.decay_steps

    def distill_end(self, round_step: int) -> int:
        """The first step after the self-distillation that follows the round at ``round_step``."""
        return self.slice_step(round_step) + self.distill_steps

    def decaying(self, step: int) -> Optional[int]:
        """The round step ``s`` whose soft-removal ramp covers ``step`` (s <= step < s + decay_steps),
        or None."""
        if not self.decay_steps:
            return None
        return next((s for s, _ in self.rounds_at() if s <= step < s + self.decay_steps), None)

    def decay_level(self, step: int) -> float:
        """The ramp's value after step ``step``'s update: ``1 - (k + 1) / decay_steps`` at
        ``k = step - s`` inside a ramp (exactly 0.0 at its last step), 1.0 outside."""
        s = self.decaying(step)
        return 1.0 if s is None else (self.decay_steps - (step - s) - 1) / self.decay_steps

    def decay_multiplier(self, step: int) -> float:
        """What the chosen units are multiplied by after step ``step``'s update:
        ``decay_level(step) / decay_level(step - 1)`` inside a ramp (exactly 0.0 at its last step),
        1.0 outside; the product over a ramp is its level."""
        s = self.decaying(step)
        if s is None:
            return 1.0
        left = self.decay_steps - (step - s)  # steps of the ramp left, this one included
        return (left - 1) / left

    def in_window(self, step: int) -> bool:
        """Whether step ``step``'s gradients feed the importance estimate of the next round."""
        return any(s - self.window <= step < s for s, _ in self.rounds_at())


# the PruneSchedule fields that say how each round prunes (not when): ``gradual`` keeps them
HOW = ("ramp", "sparsity", "budget", "multiple_of", "rewarm", "moments", "decay_steps", "distill_steps",
       "distill_weight", "carry")


def _normalized(scores: Mapping[str, torch.Tensor]) -> dict:
    """``scores`` divided by their mean over every unit of every group (float64; all zero: as is)."""
    total = sum(float(x.double().sum()) for x in scores.values())
    n = sum(x.numel() for x in scores.values())
    mean = total / n if n else 0.0
    return {k: x.double() / mean if mean > 0 else x.double() for k, x in scores.items()}


def blend_scores(carried: Optional[Mapping[str, torch.Tensor]], scores: Mapping[str, torch.Tensor],
                 carry: float) -> dict:
    """A round's scores with ``PruneSchedule.carry``: ``carry x carried + (1 - carry) x`` this
    round's scores divided by their mean over every unit. ``carried`` (the previous round's
    blended scores of its kept units, ``kept_scores``) None or ``carry`` 0: ``scores`` unchanged.
    Example: ``scores = blend_scores(carried, est.scores(imp), 0.5)``
    """
    if carried is None or not carry:
        return dict(scores)
    now = _normalized(scores)
    for k, x in now.items():
        if k not in carried or tuple(carried[k].shape) != tuple(x.shape):
            raise ValueError(f"carried importance of {k!r} has shape "
                             f"{tuple(carried[k].shape) if k in carried else None}, this round's "
                             f"{tuple(x.shape)}: it must be the previous round's kept units")
    return {k: carry * carried[k].to(x) + (1.0 - carry) * x for k, x in now.items()}


def kept_scores(scores: Mapping[str, torch.Tensor], keep: Mapping[str, torch.Tensor]) -> dict:
    """What a round carries on: its (blended) scores [blocks, units] of the units in ``keep``
    ({group: int64 [blocks, k]}, in the order the sliced tree holds them), divided by their mean
    over every kept unit (the scale of the next round's normalized scores)."""
    return _normalized({k: x.double().gather(-1, keep[k].to(x.device)) for k, x in scores.items()})


def respread(sched: PruneSchedule, steps: int, start: float, end: float) -> PruneSchedule:
    """``sched``'s rounds spread by ``gradual`` from ``start`` to ``end`` of ``steps``; its
    window and every ``HOW`` field stay."""
    return gradual(steps, sched.rounds, start, end, window=sched.window,
                   **{k: getattr(sched, k) for k in HOW})


def gradual(steps: int, rounds: int, start: float = 0.25, end: float = 0.75, window: int = 40,
            **options) -> PruneSchedule:
    """Gradual shrinking: ``rounds`` rounds spread evenly from ``start * steps`` to (about)
    ``end * steps``: the first round runs at ``round(start * steps)``, then one every
    ``max(window + decay_steps, floor((end - start) * steps / (rounds - 1)))`` steps.
    ``options``: the other ``PruneSchedule`` fields (ramp, budget, sparsity, decay_steps, ...).

    Example: ``gradual(1800, 10, window=40, budget=0.5, ramp="linear")``: rounds at 450, 550, ..., 1350.
    """
    if not (isinstance(steps, int) and steps >= 1 and isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"gradual needs steps >= 1 and rounds >= 1, got steps={steps!r}, rounds={rounds!r}")
    if not 0 <= start < end <= 1:
        raise ValueError(f"gradual needs 0 <= start < end <= 1, got start={start}, end={end}")
    first = round(start * steps)
    if first < window:
        raise ValueError(f"the first round at step {first} leaves no room for a {window}-step window")
    least = window + options.get("decay_steps", 0)
    every = max(least, math.floor((end - start) * steps / (rounds - 1) + 1e-9)) if rounds > 1 else None  # (0.4 * 1000 / 4 = 99.99..)
    return PruneSchedule(warmup_steps=first - window, window=window, rounds=rounds, every=every, **options)


def dense_sizes(params: Params, groups: Sequence[Group]) -> dict:
    """What ``round_target`` needs to remember about the dense model:
    {group name: (n_units, parameters of the group)}."""
    sizes = validate(params, groups)
    return {g.name: (sizes[g.name][1], sizes[g.name][0] * sizes[g.name][1] * g.numel_per_unit(params))
            for g in groups}


def round_target(target: Target, groups: Sequence[Group], dense: Mapping[str, tuple], params: Params,
                 by: str = "sparsity", scores: Optional[Scores] = None, allocation: str = "global",
                 multiple_of: int = 1) -> dict:
    """Convert a cumulative target (relative to the dense model) into ``select`` arguments for
    the CURRENT, possibly already pruned, ``params``: {"counts": {group name: units kept}}.

    by="sparsity": every group keeps ``max(1, round((1 - target) * dense units))`` units, never
      more than it has now (``target``: a fraction, or {kind: fraction}, missing kinds 0).
    by="budget": at most ``(1 - target) * dense group parameters`` remain, allocated globally by
      ``scores`` (``ecospa.select.allocate``). Without ``scores`` it returns the equivalent
      fraction of the CURRENT group parameters instead, {"budget": f}, for ``select(budget=)``.
      ``allocation`` names another way to spread the budget (``ecospa.allocation.ALLOCATIONS``).
    ``multiple_of``: blocks x every count a multiple of it, or the group's current width.
    ``dense`` is ``dense_sizes`` of the dense tree.
    Example:
      keep = ecospa.select(params, groups, scores, **round_target(0.3, groups, dense, params))
    """
    sizes = validate(params, groups)
    if by == "budget":
        if isinstance(target, Mapping):
            raise ValueError("a budget is one global fraction, not a per-kind dict")
        check_fraction(target, "budget target")
        allowed = sum(dense[g.name][1] for g in groups) * (1.0 - target)
        if scores is not None:
            return {"counts": allocation_counts(allocation, params, groups, scores, allowed, multiple_of)}
        now = sum(sizes[g.name][0] * sizes[g.name][1] * g.numel_per_unit(params) for g in groups)
        return {"budget": max(0.0, 1.0 - allowed / now) if now else 0.0}
    if by != "sparsity":
        raise ValueError(f"by must be 'sparsity' or 'budget', got {by!r}")
    counts, m = {}, steps(groups, sizes, multiple_of)
    for g in groups:
        frac = target.get(g.kind, 0.0) if isinstance(target, Mapping) else target
        check_fraction(frac, f"sparsity target for group {g.name!r}")
        now = sizes[g.name][1]
        counts[g.name] = aligned(min(now, round((1.0 - frac) * dense[g.name][0])), now, m[g.name])
    return {"counts": counts}


__all__ = ["warmup_cosine", "PruneSchedule", "gradual", "respread", "HOW", "blend_scores", "kept_scores", "RAMPS", "MOMENTS", "dense_sizes", "round_target"]
