"""ecospa: coupled structured sparsity for transformers, functional style on torch.func."""
from ecospa import _interrupt

# First of all, before torch: run as ``ecospa`` / ``python -m ecospa`` / ``python -m
# ecospa.cli.harness``, Ctrl-C during the seconds of imports prints one line and exits 130.
_interrupt.guard_entry_point()

from ecospa._tree import to  # noqa: E402
from ecospa._types import Keep, Params, Scores, TensorTree  # noqa: E402
from ecospa.groups import Group, Member, validate  # noqa: E402
from ecospa.importance import (ESTIMATORS, Importance, ImportanceState, coupled_fisher, fisher,  # noqa: E402
                               magnitude, norm_product, random, taylor, uncoupled, unit_dots)
from ecospa.prune import Pruner, mask, pruner, slice_units  # noqa: E402
from ecospa.select import check_target, compose, keep_all, kept_fraction, parse_sparsity, select  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "to", "Keep", "Params", "Scores", "TensorTree", "Group", "Member", "validate",
    "ESTIMATORS", "Importance", "ImportanceState", "coupled_fisher", "fisher", "magnitude",
    "norm_product", "random", "taylor", "uncoupled", "unit_dots",
    "Pruner", "mask", "pruner", "slice_units", "check_target", "compose", "keep_all",
    "kept_fraction", "parse_sparsity", "select",
]
