"""Path-addressed access to pytrees (never by flatten order)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

import optree

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
