"""Coupled index groups: which indices of which leaves form one shared inner unit.

A unit is addressed by (block, unit): a block is a KV head (1 for an MLP), and a unit is one
inner index of that head (one value dim, one rotary pair, one hidden neuron). Every member
leaf has one axis indexed by the unit and, optionally, one axis indexed by the block. Removing
unit (h, j) removes index j along ``unit_axis`` in block h from every member at once.

Sizes are read from the parameter tree, never stored, so the same groups describe a pruned tree.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Sequence

from ecospa._tree import get_path
from ecospa._types import Params, Path

Side = Optional[Literal["a", "b"]]


@dataclass(frozen=True)
class Member:
    """One leaf of a coupled group.

    path: the leaf's address in the params tree, e.g. ("layers", 0, "wq").
    unit_axis: the axis indexed by the unit (for RoPE layers: the rotary-pair axis).
    block_axis: the axis indexed by the block (KV head), or None for single-block groups.
    side: "a" / "b" if scaling this member's unit slice equals scaling the unit itself (the
        linear left / right factor of the coupled product); None otherwise (e.g. a SwiGLU gate).
    masked: whether ``mask`` zeroes this member (False for buffers such as rotary frequencies).
    """

    path: Path
    unit_axis: int
    block_axis: Optional[int] = None
    side: Side = None
    masked: bool = True

    def __post_init__(self):
        if self.unit_axis < 0 or (self.block_axis is not None and self.block_axis < 0):
            raise ValueError(f"member {self.path}: axes must be non-negative, got {self}")
        if self.unit_axis == self.block_axis:
            raise ValueError(f"member {self.path}: unit_axis and block_axis must differ")
        if self.side not in (None, "a", "b"):
            raise ValueError(f"member {self.path}: side must be 'a', 'b' or None")


@dataclass(frozen=True)
class Group:
    """A coupled group: its name (e.g. "layers.3.qk"), kind ("qk", "vo", "mlp") and members."""

    name: str
    kind: str
    members: tuple
    # Whether scaling a unit's side-"a" slice and its side-"b" slice are the same function of the
    # unit (both linear factors of one product). False when a normalization sits between a side
    # and the product (Qwen3's per-head q/k norms): each side's dot product is then still the
    # exact derivative of a mask on THAT side's pre-norm activations, but the two differ.
    sides_agree: bool = True

    def __post_init__(self):
        if not self.members:
            raise ValueError(f"group {self.name!r} has no members")
        paths = [m.path for m in self.members]
        if len(set(paths)) != len(paths):
            raise ValueError(f"group {self.name!r} lists a member twice: {paths}")
        if not any(m.side == "b" for m in self.members):
            raise ValueError(f"group {self.name!r} needs at least one side='b' member")
        object.__setattr__(self, "members", tuple(self.members))

    def side(self, side: str) -> tuple:
        return tuple(m for m in self.members if m.side == side)

    def sizes(self, params: Params) -> tuple:
        """(n_blocks, n_units) read from ``params``; ValueError naming the group on mismatch."""
        found = []
        for m in self.members:
            try:
                leaf = get_path(params, m.path)
            except KeyError as err:
                raise ValueError(
                    f"group {self.name!r}: member {m.path} is not in the params tree; "
                    f"were the groups built for another model or config?") from err
            nd = getattr(leaf, "ndim", None)
            axes = [m.unit_axis] + ([m.block_axis] if m.block_axis is not None else [])
            if nd is None or max(axes) >= nd:
                raise ValueError(
                    f"group {self.name!r}: member {m.path} has shape "
                    f"{tuple(getattr(leaf, 'shape', ()))}, too few axes for {m}")
            blocks = 1 if m.block_axis is None else leaf.shape[m.block_axis]
            found.append((m.path, blocks, leaf.shape[m.unit_axis], tuple(leaf.shape)))
        if len({(b, u) for _, b, u, _ in found}) != 1:
            detail = "; ".join(f"{p}: shape {s} -> {b} blocks x {u} units" for p, b, u, s in found)
            raise ValueError(f"group {self.name!r}: members disagree on sizes ({detail})")
        return found[0][1], found[0][2]

    def numel_per_unit(self, params: Params) -> int:
        """Parameters removed with one unit (one block's index j), summed over members."""
        n_blocks, n_units = self.sizes(params)
        total = sum(get_path(params, m.path).numel() for m in self.members)
        return total // (n_blocks * n_units)


def validate(params: Params, groups: Sequence[Group]) -> dict:
    """Check every group against ``params``; returns {name: (n_blocks, n_units)}."""
    names = [g.name for g in groups]
    if len(set(names)) != len(names):
        raise ValueError(f"group names must be unique, got duplicates in {names}")
    seen: dict = {}
    for g in groups:
        for m in g.members:
            if m.path in seen:
                raise ValueError(f"leaf {m.path} belongs to both {seen[m.path]!r} and {g.name!r}")
            seen[m.path] = g.name
    return {g.name: g.sizes(params) for g in groups}
