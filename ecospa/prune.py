"""Pure tree transforms driven by coupled groups: physical slicing and masking.

``slice_units(tree, groups, keep)`` returns a new, smaller tree; ``mask(tree, groups, keep)``
returns a same-size tree with the removed units zeroed. Neither modifies its input. Both work on
any tree with the params' structure (grads, AdamW moments), which is what lets training continue
after a pruning step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ecospa._tree import map_paths
from ecospa._types import Keep, Params, Scores, TensorTree
from ecospa.groups import Group, Member, validate
from ecospa.allocation import check_multiple_of
from ecospa.select import Sparsity, check_target, select


def _index_view(idx: torch.Tensor, leaf: torch.Tensor, m: Member) -> torch.Tensor:
    """Place keep indices [n_blocks, k] on the member's (block, unit) axes, ones elsewhere."""
    shape = [1] * leaf.ndim
    shape[m.unit_axis] = idx.shape[1]
    if m.block_axis is None:
        return idx[0].reshape(shape)
    shape[m.block_axis] = idx.shape[0]
    if m.block_axis > m.unit_axis:
        idx = idx.T
    return idx.reshape(shape)


def _slice_leaf(leaf: torch.Tensor, idx: torch.Tensor, m: Member) -> torch.Tensor:
    if m.block_axis is None:
        return torch.index_select(leaf, m.unit_axis, idx[0].to(leaf.device))
    view = _index_view(idx.to(leaf.device), leaf, m)
    target = list(leaf.shape)
    target[m.unit_axis] = idx.shape[1]
    return torch.gather(leaf, m.unit_axis, view.expand(target))


def _mask_leaf(leaf: torch.Tensor, idx: torch.Tensor, m: Member, n_units: int) -> torch.Tensor:
    keep = torch.zeros(idx.shape[0], n_units, dtype=torch.bool)
    keep.scatter_(1, idx, True)
    shape = [1] * leaf.ndim
    shape[m.unit_axis] = n_units
    if m.block_axis is not None:
        shape[m.block_axis] = idx.shape[0]
        if m.block_axis > m.unit_axis:
            keep = keep.T
    return leaf * keep.reshape(shape).to(device=leaf.device, dtype=leaf.dtype)


def _check_keep(groups, keep: Keep, sizes) -> None:
    for g in groups:
        if g.name not in keep:
            raise ValueError(f"group {g.name!r}: no kept indices given")
        idx = keep[g.name]
        b, n = sizes[g.name]
        if idx.ndim != 2 or idx.shape[0] != b or idx.dtype != torch.int64:
            raise ValueError(f"group {g.name!r}: keep must be int64 [{b}, k], got "
                             f"{idx.dtype} {tuple(idx.shape)}")
        if idx.shape[1] < 1:
            raise ValueError(f"group {g.name!r}: keeping zero units would empty the group")
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"group {g.name!r}: kept indices must lie in [0, {n})")
        if idx.shape[1] > 1 and not (idx[:, 1:] > idx[:, :-1]).all():
            raise ValueError(f"group {g.name!r}: kept indices must be sorted and unique per block")


def slice_units(tree: TensorTree, groups: Sequence[Group], keep: Keep) -> TensorTree:
    """Physically remove every unit not in ``keep`` from all members of every group.

    Returns a new tree (same structure, shrunk leaves); the input is unchanged.
    Example: ``small = slice_units(params, groups, keep)``.
    """
    sizes = validate(tree, groups)
    _check_keep(groups, keep, sizes)
    updates = {}
    for g in groups:
        for m in g.members:
            updates[m.path] = (lambda leaf, i=keep[g.name], m=m: _slice_leaf(leaf, i, m))
    return map_paths(tree, updates)


def mask(tree: TensorTree, groups: Sequence[Group], keep: Keep) -> TensorTree:
    """Zero every unit not in ``keep`` (same shapes). Returns a new tree; the input is unchanged."""
    return _map_masked(tree, groups, keep, _mask_leaf)


def _map_masked(tree: TensorTree, groups: Sequence[Group], keep: Keep, fn) -> TensorTree:
    """``fn(leaf, kept indices, member, n_units)`` applied to every member ``mask`` zeroes."""
    sizes = validate(tree, groups)
    _check_keep(groups, keep, sizes)
    updates = {}
    for g in groups:
        for m in g.members:
            if m.masked:
                n = sizes[g.name][1]
                updates[m.path] = (lambda leaf, i=keep[g.name], m=m, n=n: fn(leaf, i, m, n))
    return map_paths(tree, updates)


def _scale_leaf(leaf: torch.Tensor, idx: torch.Tensor, m: Member, n_units: int, factor: float) -> torch.Tensor:
    scale = torch.full((idx.shape[0], n_units), float(factor), dtype=leaf.dtype)
    scale.scatter_(1, idx, 1.0)
    shape = [1] * leaf.ndim
    shape[m.unit_axis] = n_units
    if m.block_axis is not None:
        shape[m.block_axis] = idx.shape[0]
        if m.block_axis > m.unit_axis:
            scale = scale.T
    return leaf * scale.reshape(shape).to(device=leaf.device)


def scale_units(tree: TensorTree, groups: Sequence[Group], keep: Keep, factor: float) -> TensorTree:
    """Multiply every unit NOT in ``keep`` by ``factor`` in the members ``mask`` zeroes (same
    shapes; kept units are multiplied by exactly 1). ``factor=0`` equals ``mask``. Returns a new
    tree; the input is unchanged. Soft removal (``PruneSchedule.decay_steps``) ramps the units a
    round chose to zero with it before slicing them.
    """
    return _map_masked(tree, groups, keep, lambda leaf, i, m, n: _scale_leaf(leaf, i, m, n, factor))


@dataclass(frozen=True)
class Pruner:
    """``prune(params, scores) -> params`` with groups and target bound (see ``pruner``)."""

    groups: tuple
    sparsity: Optional[Sparsity] = None
    budget: Optional[float] = None
    multiple_of: int = 1

    def select(self, params: Params, scores: Scores) -> Keep:
        return select(params, self.groups, scores, sparsity=self.sparsity, budget=self.budget,
                      multiple_of=self.multiple_of)

    def __call__(self, params: TensorTree, scores: Scores) -> TensorTree:
        """Slice ``params`` (or any tree shaped like them) to the units the scores select."""
        return slice_units(params, self.groups, self.select(params, scores))

    def mask(self, params: TensorTree, scores: Scores) -> TensorTree:
        return mask(params, self.groups, self.select(params, scores))


def pruner(groups: Sequence[Group], sparsity: Optional[Sparsity] = None,
           budget: Optional[float] = None, multiple_of: int = 1) -> Pruner:
    """Bind coupled groups and a target; returns ``prune(params, scores) -> params``.

    Args:
      groups: coupled groups of the model.
      sparsity: fraction of units removed per group (float, or {"qk": .., "vo": .., "mlp": ..}).
      budget: fraction of the groups' parameters removed, allocated globally by importance.
      multiple_of: blocks x kept units a multiple of this (or all): kernel-friendly widths.
    Example:
      prune = ecospa.pruner(llama.coupled_groups(cfg), sparsity=0.5)
      small = prune(params, scores)
    """
    groups = tuple(groups)
    check_target(groups, sparsity, budget)
    check_multiple_of(multiple_of)
    return Pruner(groups, sparsity, budget, multiple_of)
