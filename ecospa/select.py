"""Choosing the kept units from per-unit scores and a target.

Two targets:
- ``sparsity``: a fraction of units to remove in every group (a float, or one per group kind,
  e.g. {"qk": 0.25, "vo": 0.25, "mlp": 0.5}); every block keeps ``max(1, round((1-s) * n))``.
- ``budget``: a fraction of all the groups' parameters to remove, allocated globally by
  importance per parameter, so layers and group kinds end up with different widths.
Either way all blocks of one group keep the same number of units (one batched attention).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch

from ecospa.groups import Group, validate
from ecospa._types import Keep, Params, Scores

Sparsity = Union[float, Mapping[str, float]]

#: The group kinds of the built-in models (``llama`` / ``gpt2`` ``coupled_groups``).
KINDS = ("qk", "vo", "mlp")


def _check_fraction(value: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{what} must be a number in [0, 1), got {value!r}")
    return float(value)


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
        return _check_fraction(out, "--sparsity")
    unknown = [k for k in out if k not in kinds]
    if unknown:
        raise ValueError(f"--sparsity names unknown group kinds {unknown}; use {', '.join(kinds)}")
    for kind, value in out.items():
        _check_fraction(value, f"--sparsity {kind}")
    return out


def check_target(groups: Sequence[Group], sparsity: Optional[Sparsity] = None,
                 budget: Optional[float] = None) -> None:
    """ValueError unless exactly one valid target is given for ``groups``.

    ``budget`` and a float ``sparsity`` must lie in [0, 1). A per-kind ``sparsity`` dict may
    only name kinds present in ``groups`` (a typo such as {"mpl": 0.5} would otherwise prune
    nothing), each with a fraction in [0, 1).
    """
    if (sparsity is None) == (budget is None):
        raise ValueError("give exactly one of sparsity= (fraction of units per group) "
                         "or budget= (fraction of parameters, allocated globally)")
    if budget is not None:
        _check_fraction(budget, "budget")
        return
    if not isinstance(sparsity, Mapping):
        _check_fraction(sparsity, "sparsity")
        return
    known = list(dict.fromkeys(g.kind for g in groups))
    unknown = [k for k in sparsity if k not in known]
    if unknown:
        raise ValueError(f"sparsity names group kinds {unknown} that none of the groups has; "
                         f"known kinds: {known}")
    for g in groups:
        if g.kind in sparsity:
            _check_fraction(sparsity[g.kind], f"sparsity for group {g.name!r}")


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
    n = s.shape[1]
    # Stable sort on -score keeps index order among ties.
    return torch.sort(-s, dim=1, stable=True).indices[:, :n]


def keep_top(s: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` best units of each block ([n_blocks, k], int64)."""
    return torch.sort(_ranked(s)[:, :k], dim=1).values


def _by_fraction(groups, s, sizes, sparsity) -> dict:
    counts = {}
    for g in groups:
        frac = sparsity.get(g.kind, 0.0) if isinstance(sparsity, Mapping) else sparsity
        frac = _check_fraction(frac, f"sparsity for group {g.name!r}")
        n = sizes[g.name][1]
        counts[g.name] = max(1, min(n, round((1.0 - frac) * n)))
    return counts


def _by_budget(groups, s, sizes, params, budget) -> dict:
    """Global allocation: keep the columns with the most importance per parameter.

    Column c of a group is the c-th best unit of every block (uniform widths), so it costs
    n_blocks * numel_per_unit parameters and is worth the sum of the blocks' c-th best scores.
    Column 0 is always kept: a group never empties.
    """
    budget = _check_fraction(budget, "budget")
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    total = sum(cost[g.name] * sizes[g.name][1] for g in groups)
    allowed = total * (1.0 - budget)
    floor = sum(cost.values())
    if floor > allowed + 1e-9:
        raise ValueError(
            f"budget {budget} keeps {allowed:.0f} of {total} parameters, but keeping one unit "
            f"per block in every group already needs {floor}; it would empty a group. "
            f"Use a budget of at most {1 - floor / total:.4f}.")
    items = []  # (value per parameter, group order, column, name)
    for gi, g in enumerate(groups):
        col = torch.sort(s[g.name], dim=1, descending=True).values.sum(0)  # [n_units]
        for c in range(1, col.numel()):
            items.append((-float(col[c]) / cost[g.name], gi, c, g.name))
    items.sort()
    counts = {g.name: 1 for g in groups}
    used = floor
    for _, _, c, name in items:
        # Columns of one group come in order (non-increasing value), so this keeps prefixes.
        if used + cost[name] > allowed + 1e-9 or counts[name] != c:
            continue
        counts[name] += 1
        used += cost[name]
    return counts


def select(params: Params, groups: Sequence[Group], scores: Scores, *,
           sparsity: Optional[Sparsity] = None, budget: Optional[float] = None) -> Keep:
    """Choose the kept units of every group.

    Args:
      params: the tree the groups address (sizes are read from it).
      groups: coupled groups, e.g. ``llama.coupled_groups(cfg)``.
      scores: {group name: importance per unit}, higher is more important.
      sparsity: fraction of units to remove per group (float or {kind: float}).
      budget: fraction of the groups' parameters to remove, allocated globally.
    Returns:
      {group name: sorted int64 indices [n_blocks, k]}.
    Example:
      keep = select(params, groups, scores, sparsity=0.5)
    """
    check_target(groups, sparsity, budget)
    sizes = validate(params, groups)
    s = check_scores(scores, groups, sizes)
    if sparsity is not None:
        counts = _by_fraction(groups, s, sizes, sparsity)
    else:
        counts = _by_budget(groups, s, sizes, params, budget)
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


__all__ = ["select", "keep_all", "compose", "kept_fraction", "keep_top", "check_scores",
           "check_target", "parse_sparsity", "KINDS"]
