"""ecospa: coupled structured sparsity for transformers, functional style on torch.func."""
from ecospa._tree import to
from ecospa._types import Keep, Params, Scores, TensorTree
from ecospa.groups import Group, Member, validate
from ecospa.importance import (ESTIMATORS, Importance, ImportanceState, coupled_fisher, fisher,
                               magnitude, norm_product, random, taylor, uncoupled, unit_dots)
from ecospa.prune import Pruner, mask, pruner, slice_units
from ecospa.select import check_target, compose, keep_all, kept_fraction, parse_sparsity, select

__version__ = "0.1.0"

__all__ = [
    "to", "Keep", "Params", "Scores", "TensorTree", "Group", "Member", "validate",
    "ESTIMATORS", "Importance", "ImportanceState", "coupled_fisher", "fisher", "magnitude",
    "norm_product", "random", "taylor", "uncoupled", "unit_dots",
    "Pruner", "mask", "pruner", "slice_units", "check_target", "compose", "keep_all",
    "kept_fraction", "parse_sparsity", "select",
]
