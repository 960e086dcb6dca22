"""How many units each group keeps under one parameter budget: the allocation variants.

All take per-unit importance ``scores`` ({group name: [n_blocks, n_units]}) and ``max_params``,
the most parameters the groups may keep, and return {group name: units kept in every block}
(for ``ecospa.select(..., counts=)``). Column c of a group is its c-th best unit in every
block (widths stay uniform within a group); column 0 is always kept (a group never empties).

- ``global`` (default; ``ecospa.select.allocate``): the columns with the most importance per
  parameter first, across all layers and group kinds.
- ``zscore`` (FLAP-style): each group's scores standardized (zero mean, unit deviation), then
  one global threshold on the standardized score per unit, not per parameter.
- ``protect`` (LLM-Pruner-style): the first ``ceil(L/8)`` and last ``ceil(L/16)`` layers keep
  every unit; ``global`` allocates the rest of the budget over the other layers.
- ``depth`` (SlimGPT-style): the fraction removed grows linearly with depth, from 0.5x to 1.5x
  the mean fraction (at most 0.95), uniform within a layer; the scores only pick the units.

    counts = allocation.counts("zscore", params, groups, scores, max_params=0.5 * group_params)
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import torch

from ecospa.groups import Group, validate
from ecospa._types import Params, Scores

ALLOCATIONS = ("global", "zscore", "protect", "depth")


def layer_of(group: Group) -> Optional[int]:
    """The layer index of a group whose members live under ("layers", i, ...), else None."""
    path = group.members[0].path
    return path[1] if len(path) > 1 and path[0] == "layers" and isinstance(path[1], int) else None


def greedy(names: Sequence[str], cost: Mapping[str, float], value: Mapping[str, torch.Tensor],
           allowed: float, what: str = "") -> dict:
    """Keep column 0 of every group, then columns 1, 2, ... by descending ``value[name][c]``
    (ties: group order, then column) while the kept ``cost`` stays within ``allowed``; a group's
    columns are only taken as a prefix. ValueError if column 0 of every group already costs more."""
    floor = sum(cost[n] for n in names)
    if floor > allowed + 1e-9:
        total = sum(cost[n] * value[n].numel() for n in names)
        raise ValueError(
            f"{what or f'keeping at most {allowed:.0f} of {total} parameters'}, but keeping one unit per "
            f"block in every group already needs {floor}; it would empty a group. "
            f"Use a budget of at most {1 - floor / total:.4f}.")
    items = sorted((-float(value[n][c]), gi, c, n) for gi, n in enumerate(names)
                   for c in range(1, value[n].numel()))
    counts = {n: 1 for n in names}
    used = floor
    for _, _, c, name in items:
        # Columns of one group come in order (non-increasing value), so this keeps prefixes.
        if used + cost[name] > allowed + 1e-9 or counts[name] != c:
            continue
        counts[name] += 1
        used += cost[name]
    return counts


def _columns(s: torch.Tensor) -> torch.Tensor:
    """Sum over blocks of each block's c-th best score: the worth of column c."""
    return torch.sort(s, dim=1, descending=True).values.sum(0)


def counts(how: str, params: Params, groups: Sequence[Group], scores: Scores, max_params: float) -> dict:
    """{group name: units kept} for allocation ``how`` (one of ``ALLOCATIONS``)."""
    from ecospa.select import allocate, check_scores  # select builds on this module

    if how not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {how!r}")
    if how == "global":
        return allocate(params, groups, scores, max_params)
    sizes = validate(params, groups)
    s = check_scores(scores, groups, sizes)
    names = [g.name for g in groups]
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    if how == "zscore":
        # rounded: the float noise of standardizing must not reorder units whose z-scores are equal
        z = {n: torch.round((s[n] - s[n].mean()) / (s[n].std(unbiased=False) + 1e-12), decimals=9) for n in names}
        return greedy(names, cost, {n: _columns(z[n]) / sizes[n][0] for n in names}, max_params)
    layers = {g.name: layer_of(g) for g in groups}
    if any(v is None for v in layers.values()):
        raise ValueError(f"allocation {how!r} needs groups under ('layers', i, ...); "
                         f"use allocation 'global' or 'zscore' for these groups")
    n_layers = max(layers.values()) + 1
    total = sum(cost[n] * sizes[n][1] for n in names)
    if how == "protect":
        first, last = math.ceil(n_layers / 8), math.ceil(n_layers / 16)
        kept = [n for n in names if layers[n] < first or layers[n] >= n_layers - last]
        rest = [n for n in names if n not in kept]
        whole = sum(cost[n] * sizes[n][1] for n in kept)
        left = max_params - whole
        if left + 1e-9 < sum(cost[n] for n in rest):  # not even one unit per block of the others
            raise ValueError(
                f"allocation 'protect' keeps the first {first} and last {last} of {n_layers} layers whole "
                f"({whole} parameters), which leaves {left:.0f} of the {max_params:.0f} the budget keeps "
                f"for the other {len(rest)} groups: too few. Use a smaller budget or allocation 'global'")
        out = {n: sizes[n][1] for n in kept}
        if rest:
            out.update(greedy(rest, cost, {n: _columns(s[n]) / cost[n] for n in rest}, left))
        return out
    mean = max(0.0, 1.0 - max_params / total) if total else 0.0
    out = {}
    for n in names:
        ramp = 0.5 + (layers[n] / (n_layers - 1) if n_layers > 1 else 0.5)
        frac = min(0.95, mean * ramp)
        out[n] = max(1, min(sizes[n][1], round((1.0 - frac) * sizes[n][1])))
    return out


__all__ = ["ALLOCATIONS", "counts", "greedy", "layer_of"]
