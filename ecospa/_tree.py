"""Path-addressed access to pytrees (never by flatten order)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optree
import torch

from ecospa._types import Path, TensorTree


def get_path(tree: TensorTree, path: Path) -> Any:
    """Return the node at ``path``; raises KeyError/IndexError with the path if absent."""
    node = tree
    for i, key in enumerate(path):
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError) as err:
            raise KeyError(f"no entry {path[: i + 1]!r} in the tree") from err
    return node


def has_path(tree: TensorTree, path: Path) -> bool:
    try:
        get_path(tree, path)
        return True
    except KeyError:
        return False


def map_paths(tree: TensorTree, updates: Mapping[Path, Callable[[Any], Any]]) -> TensorTree:
    """Return a new tree where the leaf at each path in ``updates`` is replaced by ``fn(leaf)``.

    The input tree is unchanged; untouched leaves are shared, not copied.
    """
    def fn(path, leaf):
        f = updates.get(tuple(path))
        return leaf if f is None else f(leaf)

    return optree.tree_map_with_path(fn, tree, none_is_leaf=False, namespace="")


def leaf_paths(tree: TensorTree) -> list:
    """Every leaf's path, as tuples."""
    paths, _, _ = optree.tree_flatten_with_path(tree)
    return [tuple(p) for p in paths]


def count_params(tree: TensorTree) -> int:
    """Number of floating-point values in a tree (weights and buffers): THE parameter count."""
    return sum(x.numel() for x in optree.tree_leaves(tree, namespace="")
               if torch.is_tensor(x) and x.is_floating_point())


# Leaves that are buffers, not weights: kept in at least float32 whatever the model dtype.
FP32_BUFFERS = frozenset({"inv_freq"})


def to(tree: TensorTree, device=None, dtype=None) -> TensorTree:
    """Move a tree to ``device`` and cast its floating leaves to ``dtype``; returns a new tree.

    Rotary frequencies (``inv_freq``) keep at least float32 so bf16 models rotate exactly.
    Example: ``params = ecospa.to(params, "cuda", torch.bfloat16)``.
    """
    def fn(path, leaf):
        dt = dtype if (dtype is not None and leaf.is_floating_point()) else leaf.dtype
        if path and path[-1] in FP32_BUFFERS and dt is not None:
            dt = torch.promote_types(dt, torch.float32)
        return leaf.to(device=device, dtype=dt)

    return optree.tree_map_with_path(fn, tree, namespace="")


def cast_weights(tree: TensorTree, dtype) -> TensorTree:
    """A new tree whose weight matrices (floating leaves of 2+ axes) are cast to ``dtype``.

    Norm gains and biases (1 axis) and the buffers (``FP32_BUFFERS``: rotary frequencies, which
    have 2 axes but are not weights) keep their dtype, so an f16 export or load rotates exactly
    like the source. The input tree is unchanged.
    Example: ``half = cast_weights(params, torch.float16)``.
    """
    def fn(path, leaf):
        weight = leaf.is_floating_point() and leaf.ndim > 1 and not (path and path[-1] in FP32_BUFFERS)
        return leaf.to(dtype) if weight else leaf

    return optree.tree_map_with_path(fn, tree, namespace="")
