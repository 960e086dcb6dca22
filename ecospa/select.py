"""Choosing the kept units from per-unit scores and a target.

Three targets (give exactly one):
- ``sparsity``: a fraction of units to remove in every group (a float, or one per group kind,
  e.g. {"qk": 0.25, "vo": 0.25, "mlp": 0.5}); every block keeps ``max(1, round((1-s) * n))``.
- ``budget``: a fraction of all the groups' parameters to remove, allocated globally by
  importance per parameter, so layers and group kinds end up with different widths.
- ``counts``: the number of units every block of a group keeps, {group name: k} with
  1 <= k <= units (groups not named keep all their units). Schedules compute these
  (``ecospa.schedule.round_target``), so nothing depends on how a fraction is rounded.
Either way all blocks of one group keep the same number of units (one batched attention).
``multiple_of=m`` keeps every group's total width (blocks x units) a multiple of m, or all its
units: the widths matmul kernels run fastest (``ecospa.allocation.steps``); given ``counts``
must obey it.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from ecospa.allocation import _columns, aligned, greedy, steps
from ecospa.errors import check_fraction, whole
from ecospa.groups import Group, validate
from ecospa._types import Keep, Params, Scores

Sparsity = Union[float, Mapping[str, float]]
Counts = Mapping[str, int]  # group name -> units kept in every block of the group

#: The group kinds of the built-in models (``llama`` / ``gpt2`` ``coupled_groups``).
KINDS = ("qk", "vo", "mlp")


def parse_sparsity(text: str, kinds: Sequence[str] = KINDS) -> Sparsity:
    """Parse a ``--sparsity`` flag: '0.5' -> 0.5; 'qk=0.25,vo=0.25,mlp=0.5' -> {"qk": 0.25, ...}.

    Every fraction must lie in [0, 1) and every kind must be one of ``kinds`` (each at most
    once); anything else is a ValueError that names the flag's format or the unknown kinds.
    Example: ``parse_sparsity("mlp=0.5")`` -> ``{"mlp": 0.5}``; ``parse_sparsity("mpl=0.5")`` raises.
    """
    fmt = "write a fraction (0.5) or kind=fraction pairs ('qk=0.25,vo=0.25,mlp=0.5')"
    if not isinstance(text, str):
        raise ValueError(f"--sparsity {text!r}: {fmt}")
    try:
        if "=" not in text:
            out: Sparsity = float(text)
        else:
            out = {}
            for item in text.split(","):
                kind, value = item.split("=")
                kind = kind.strip()
                if not kind or kind in out:  # empty or repeated kind
                    raise ValueError
                out[kind] = float(value)
    except ValueError as err:
        raise ValueError(f"--sparsity {text!r}: {fmt}") from err
    if not isinstance(out, dict):
        return check_fraction(out, "--sparsity")
    unknown = [k for k in out if k not in kinds]
    if unknown:
        raise ValueError(f"--sparsity names unknown group kinds {unknown}; use {', '.join(kinds)}")
    for kind, value in out.items():
        check_fraction(value, f"--sparsity {kind}")
    return out


def check_target(groups: Sequence[Group], sparsity: Optional[Sparsity] = None,
                 budget: Optional[float] = None, counts: Optional[Counts] = None) -> None:
    """ValueError unless exactly one valid target is given for ``groups``.

    ``budget`` and a float ``sparsity`` must lie in [0, 1). A per-kind ``sparsity`` dict may
    only name kinds present in ``groups`` (a typo such as {"mpl": 0.5} would otherwise prune
    nothing), each with a fraction in [0, 1). ``counts`` may only name groups in ``groups``,
    each with a whole number >= 1 (``select`` also checks it against the group's units).
    """
    if counts is not None and (sparsity is not None or budget is not None):
        raise ValueError("give exactly one target: counts= (units kept per group) fixes the "
                         "widths itself, so it takes no sparsity= or budget=")
    if counts is None and (sparsity is None) == (budget is None):
        raise ValueError("give exactly one of sparsity= (fraction of units per group) "
                         "or budget= (fraction of parameters, allocated globally)")
    if budget is not None:
        check_fraction(budget, "budget")
        return
    if counts is not None:
        _check_counts(counts, groups)
        return
    if not isinstance(sparsity, Mapping):
        check_fraction(sparsity, "sparsity")
        return
    known = list(dict.fromkeys(g.kind for g in groups))
    unknown = [k for k in sparsity if k not in known]
    if unknown:
        raise ValueError(f"sparsity names group kinds {unknown} that none of the groups has; "
                         f"known kinds: {known}")
    for g in groups:
        if g.kind in sparsity:
            check_fraction(sparsity[g.kind], f"sparsity for group {g.name!r}")


def _check_counts(counts: Counts, groups: Sequence[Group], sizes: Optional[Mapping] = None) -> None:
    """Known group names, whole numbers in [1, units] (the units only when ``sizes`` is given)."""
    if not isinstance(counts, Mapping):
        raise ValueError(f"counts must be a dict {{group name: units to keep}}, got {counts!r}")
    names = [g.name for g in groups]
    unknown = [k for k in counts if k not in names]
    if unknown:
        raise ValueError(f"counts names groups {unknown[:4]} that are not among the groups "
                         f"({names[:4]}{'...' if len(names) > 4 else ''})")
    for name, k in counts.items():
        units = sizes[name][1] if sizes is not None else None
        if not whole(k) or k < 1 or (units is not None and k > units):
            most = f", at most {units} (its units)" if units is not None else ""
            raise ValueError(f"counts for group {name!r} must be a whole number >= 1{most}; "
                             f"got {k!r} (a group never empties)")


def check_scores(scores: Scores, groups: Sequence[Group], sizes: Mapping[str, tuple]) -> dict:
    """Return scores as float64 [n_blocks, n_units] tensors; ValueError naming the group if bad."""
    out = {}
    for g in groups:
        if g.name not in scores:
            raise ValueError(f"group {g.name!r}: no scores given (have {sorted(scores)[:4]}...)")
        s = torch.as_tensor(scores[g.name]).detach()
        shape = sizes[g.name]
        # exactly [blocks, units]; a 1-D vector only for a single block. Anything else (a transposed
        # matrix with the right number of values) is refused, never reshaped.
        if tuple(s.shape) != tuple(shape) and not (s.ndim == 1 and shape[0] == 1 and s.numel() == shape[1]):
            raise ValueError(
                f"group {g.name!r}: scores have {tuple(s.shape)} ({s.numel()} values), "
                f"the params have {shape[0]} blocks x {shape[1]} units; give [{shape[0]}, {shape[1]}] "
                "(a transposed matrix is not reshaped)")
        s = s.reshape(shape).to(torch.float64)
        if not torch.isfinite(s).all():
            raise ValueError(f"group {g.name!r}: scores contain NaN or inf; "
                             "check the loss and gradients that produced them")
        out[g.name] = s
    return out


def _ranked(s: torch.Tensor) -> torch.Tensor:
    """Unit indices per block by descending score; ties broken by lower index (deterministic)."""
    return torch.sort(-s, dim=1, stable=True).indices  # stable: index order among ties


def keep_top(s: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` best units of each block ([n_blocks, k], int64)."""
    return torch.sort(_ranked(s)[:, :k], dim=1).values


def _by_fraction(groups, sizes, sparsity, multiple_of: int = 1) -> dict:
    m = steps(groups, sizes, multiple_of)
    counts = {}
    for g in groups:
        frac = sparsity.get(g.kind, 0.0) if isinstance(sparsity, Mapping) else sparsity
        n = sizes[g.name][1]
        counts[g.name] = aligned(round((1.0 - frac) * n), n, m[g.name])
    return counts


def allocate(params: Params, groups: Sequence[Group], scores: Scores, max_params: float,
             multiple_of: int = 1) -> dict:
    """Global allocation: {group name: units kept} keeping at most ``max_params`` of the groups'
    parameters, the columns with the most importance per parameter first.

    Column c of a group is the c-th best unit of every block (uniform widths), so it costs
    n_blocks * numel_per_unit parameters and is worth the sum of the blocks' c-th best scores.
    Column 0 is always kept: a group never empties (ValueError if ``max_params`` is below that).
    With ``multiple_of=m`` columns are taken in aligned chunks (``ecospa.allocation.steps``).
    The other variants (z-scored, protected ends, depth ramp) are in ``ecospa.allocation``.
    """
    sizes = validate(params, groups)
    s = check_scores(scores, groups, sizes)
    return _allocate(groups, s, sizes, params, max_params, multiple_of=multiple_of)


def _allocate(groups, s, sizes, params, allowed: float, budget: Optional[float] = None,
              multiple_of: int = 1) -> dict:
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    total = sum(cost[g.name] * sizes[g.name][1] for g in groups)
    asked = f"budget {budget} keeps {allowed:.0f} of {total} parameters" if budget is not None else ""
    return greedy([g.name for g in groups], cost, {g.name: _columns(s[g.name]) / cost[g.name] for g in groups},
                  allowed, asked, multiple_of=steps(groups, sizes, multiple_of))


def select(params: Params, groups: Sequence[Group], scores: Scores, *,
           sparsity: Optional[Sparsity] = None, budget: Optional[float] = None,
           counts: Optional[Counts] = None, multiple_of: int = 1) -> Keep:
    """Choose the kept units of every group.

    Args:
      params: the tree the groups address (sizes are read from it).
      groups: coupled groups, e.g. ``llama.coupled_groups(cfg)``.
      scores: {group name: importance per unit}, higher is more important.
      sparsity: fraction of units to remove per group (float or {kind: float}).
      budget: fraction of the groups' parameters to remove, allocated globally.
      counts: {group name: units every block keeps}, each in [1, units]; unnamed groups keep all.
      multiple_of: every group keeps blocks x units a multiple of this, or all its units
        (kernel-friendly widths; 8 for fp32 CPU matmuls). 1: any count.
    Returns:
      {group name: sorted int64 indices [n_blocks, k]}.
    Example:
      keep = select(params, groups, scores, sparsity=0.5)
      keep = select(params, groups, scores, counts={"layers.0.mlp": 9})
    """
    if counts is None or sparsity is not None or budget is not None:
        check_target(groups, sparsity, budget, counts)
    sizes = validate(params, groups)
    if counts is not None:
        _check_counts(counts, groups, sizes)  # also against the units, which check_target lacks
    m = steps(groups, sizes, multiple_of)
    s = check_scores(scores, groups, sizes)
    if counts is not None:
        counts = {g.name: counts.get(g.name, sizes[g.name][1]) for g in groups}
        off = {k: v for k, v in counts.items() if v != aligned(v, sizes[k][1], m[k])}
        if off:
            raise ValueError(f"counts {dict(list(off.items())[:4])} break multiple_of={multiple_of} (blocks x "
                             "units must be a multiple of it, or the group whole); round them with "
                             "ecospa.allocation.aligned(k, units, ecospa.allocation.steps(...)[name])")
    elif sparsity is not None:
        counts = _by_fraction(groups, sizes, sparsity, multiple_of)
    else:
        total = sum(sizes[g.name][0] * sizes[g.name][1] * g.numel_per_unit(params) for g in groups)
        counts = _allocate(groups, s, sizes, params, total * (1.0 - budget), budget, multiple_of=multiple_of)
    return {g.name: keep_top(s[g.name], counts[g.name]) for g in groups}


def keep_all(params: Params, groups: Sequence[Group]) -> Keep:
    """The selection that keeps every unit (pruning with it is the identity)."""
    sizes = validate(params, groups)
    return {name: torch.arange(n).expand(b, n).clone() for name, (b, n) in sizes.items()}


def compose(first: Keep, second: Keep) -> Keep:
    """The selection equal to applying ``first`` then ``second`` (indices into the first's output)."""
    return {name: torch.gather(first[name], 1, second[name]) for name in second}


def kept_fraction(params: Params, groups: Sequence[Group], keep: Keep) -> float:
    """Fraction of the groups' parameters that ``keep`` retains."""
    sizes = validate(params, groups)
    kept = total = 0
    for g in groups:
        per = sizes[g.name][0] * g.numel_per_unit(params)
        kept += per * keep[g.name].shape[1]
        total += per * sizes[g.name][1]
    return kept / total if total else 1.0


__all__ = ["select", "allocate", "keep_all", "compose", "kept_fraction", "keep_top", "check_scores",
           "check_target", "parse_sparsity", "KINDS", "Counts", "Sparsity"]
