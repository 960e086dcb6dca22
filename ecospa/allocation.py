"""How many units each group keeps under one parameter budget: the allocation variants.

All take per-unit importance ``scores`` ({group name: [n_blocks, n_units]}) and ``max_params``,
the most parameters the groups may keep, and return {group name: units kept in every block}
(for ``ecospa.select(..., counts=)``). Column c of a group is its c-th best unit in every
block (widths stay uniform within a group); column 0 is always kept (a group never empties).
With ``multiple_of=m`` every group keeps a total width (blocks x units per block) that is a
multiple of m, or all its units: per block a multiple of ``m / gcd(m, blocks)`` (``steps``,
``aligned``). Matmul kernels run full vector widths (fp32 AVX2: 8; tensor cores: 8-64): a kept
MLP width of 550 runs slower than one of 552.

- ``global`` (default; ``ecospa.select.allocate``): the columns with the most importance per
  parameter first, across all layers and group kinds.
- ``zscore`` (FLAP-style): each group's scores standardized (zero mean, unit deviation), then
  one global threshold on the standardized score per unit, not per parameter.
- ``protect`` (LLM-Pruner-style): the first ``ceil(L/8)`` and last ``ceil(L/16)`` layers keep
  every unit; ``global`` allocates the rest of the budget over the other layers.
- ``depth`` (SlimGPT-style): the fraction removed grows linearly with depth, from 0.5x to 1.5x
  a mean fraction (at most 0.95), uniform within a layer; the mean is the one that removes the
  budget (weighted by each layer's cost: the layers of a tree pruned in an earlier round differ);
  the scores only pick the units.

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


def check_multiple_of(m) -> int:
    """``m`` if it is a whole number >= 1, else ValueError."""
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"multiple_of must be a whole number >= 1 (units per block are kept in "
                         f"multiples of it), got {m!r}")
    return m


def aligned(k: int, n: int, m: int = 1) -> int:
    """The allowed count nearest to ``k`` for a group of ``n`` units: a multiple of ``m`` in
    [m, n], or ``n`` itself (ties: the larger). ``m=1``: ``k`` clamped to [1, n]."""
    if k >= n or n <= m:
        return n
    if m == 1:
        return max(1, k)
    lo = m * (max(k, m) // m)  # the multiple at or below k (at least m), then the next allowed width
    hi = min(n, lo + m)
    return hi if hi - k <= k - lo else lo


def steps(groups: Sequence[Group], sizes: Mapping[str, tuple], multiple_of: int) -> dict:
    """{group name: units per block kept in multiples of it}: ``m / gcd(m, blocks)``, so that
    blocks x units is a multiple of ``multiple_of`` (8 KV heads need no per-head rounding for 8)."""
    m = check_multiple_of(multiple_of)
    return {g.name: m // math.gcd(m, sizes[g.name][0]) for g in groups}


def greedy(names: Sequence[str], cost: Mapping[str, float], value: Mapping[str, torch.Tensor],
           allowed: float, what: str = "", multiple_of=1) -> dict:
    """Keep the first chunk of every group, then further chunks by descending mean
    ``value[name]`` over the chunk (ties: group order, then position) while the kept ``cost``
    (per column) stays within ``allowed``; a group's chunks are only taken as a prefix. A chunk
    is ``multiple_of`` columns (an int, or {name: int}; the last chunk is what is left), so every
    count is a multiple of it or the whole group. ValueError if the first chunks alone cost more."""
    ms = {n: check_multiple_of(multiple_of[n] if isinstance(multiple_of, Mapping) else multiple_of)
          for n in names}
    first = {n: min(ms[n], value[n].numel()) for n in names}
    floor = sum(cost[n] * first[n] for n in names)
    if floor > allowed + 1e-9:
        total = sum(cost[n] * value[n].numel() for n in names)
        unit = "one unit" if set(ms.values()) == {1} else "the smallest aligned width (multiple_of)"
        raise ValueError(
            f"{what or f'keeping at most {allowed:.0f} of {total} parameters'}, but keeping {unit} per "
            f"block in every group already needs {floor}; it would empty a group. "
            f"Use a budget of at most {1 - floor / total:.4f}.")
    items = sorted((-float(value[n][c:c + ms[n]].mean()), gi, c, n) for gi, n in enumerate(names)
                   for c in range(first[n], value[n].numel(), ms[n]))
    counts = dict(first)
    used = floor
    for _, _, c, name in items:
        # Chunks of one group come in order (non-increasing mean value), so this keeps prefixes.
        width = min(ms[name], value[name].numel() - c)
        if used + cost[name] * width > allowed + 1e-9 or counts[name] != c:
            continue
        counts[name] += width
        used += cost[name] * width
    return counts


def _columns(s: torch.Tensor) -> torch.Tensor:
    """Sum over blocks of each block's c-th best score: the worth of column c."""
    return torch.sort(s, dim=1, descending=True).values.sum(0)


def counts(how: str, params: Params, groups: Sequence[Group], scores: Scores, max_params: float,
           multiple_of: int = 1) -> dict:
    """{group name: units kept} for allocation ``how`` (one of ``ALLOCATIONS``); every group's
    blocks x count a multiple of ``multiple_of``, or its whole width."""
    from ecospa.select import allocate, check_scores  # select builds on this module

    if how not in ALLOCATIONS:
        raise ValueError(f"allocation must be one of {', '.join(ALLOCATIONS)}, got {how!r}")
    if how == "global":
        return allocate(params, groups, scores, max_params, multiple_of=multiple_of)
    sizes = validate(params, groups)
    s = check_scores(scores, groups, sizes)
    m = steps(groups, sizes, multiple_of)
    names = [g.name for g in groups]
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    if how == "zscore":
        # rounded: the float noise of standardizing must not reorder units whose z-scores are equal
        z = {n: torch.round((s[n] - s[n].mean()) / (s[n].std(unbiased=False) + 1e-12), decimals=9) for n in names}
        return greedy(names, cost, {n: _columns(z[n]) / sizes[n][0] for n in names}, max_params, multiple_of=m)
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
        if left + 1e-9 < sum(cost[n] * min(m[n], sizes[n][1]) for n in rest):  # not even one chunk per block of the others
            raise ValueError(
                f"allocation 'protect' keeps the first {first} and last {last} of {n_layers} layers whole "
                f"({whole} parameters), which leaves {left:.0f} of the {max_params:.0f} the budget keeps "
                f"for the other {len(rest)} groups: too few. Use a smaller budget or allocation 'global'")
        out = {n: sizes[n][1] for n in kept}
        if rest:
            out.update(greedy(rest, cost, {n: _columns(s[n]) / cost[n] for n in rest}, left, multiple_of=m))
        return out
    ramp = {n: 0.5 + (layers[n] / (n_layers - 1) if n_layers > 1 else 0.5) for n in names}
    # the mean fraction m that removes the budget: m x sum(ramp x cost) = total - max_params (on
    # layers of equal cost, sum(ramp x cost) = total; a tree pruned in an earlier round has
    # cheaper later layers, and the unweighted mean would remove too little)
    weighted = sum(ramp[n] * cost[n] * sizes[n][1] for n in names)
    mean = max(0.0, total - max_params) / weighted if weighted else 0.0
    out = {}
    for n in names:
        frac = min(0.95, mean * ramp[n])
        out[n] = aligned(round((1.0 - frac) * sizes[n][1]), sizes[n][1], m[n])
    return out


__all__ = ["ALLOCATIONS", "counts", "greedy", "layer_of", "aligned", "check_multiple_of", "steps"]
