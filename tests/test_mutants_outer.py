"""Tests that kill mutants of the outer code (issue 24): allocation, func, io, train, jobs.

Each test names the behaviour it pins; `bash tools/mutation.sh <profile>` runs them with the
module's own tests (tools/mutation.sh lists which)."""
from __future__ import annotations

import pytest
import torch

from ecospa import allocation
from ecospa.groups import Group, Member


# ---- allocation (profile alloc) ----------------------------------------------------------------

def _toy(**scores):
    """A flat tree with one single-block group per name (one parameter per unit), in the given
    order, and the scores as given: {name: [units]}."""
    params = {n: torch.zeros(1, len(v)) for n, v in scores.items()}
    groups = [Group(n, "mlp", (Member((n,), 1, None, "b"),)) for n in scores]
    return params, groups, {n: torch.tensor([v], dtype=torch.float64) for n, v in scores.items()}


def _one_more(how, **scores):
    """Which group gets the single unit the budget allows beyond one unit per group."""
    params, groups, s = _toy(**scores)
    counts = allocation.counts(how, params, groups, s, max_params=len(groups) + 1)
    assert sorted(counts.values()) == [1] * (len(groups) - 1) + [2]
    return max(counts, key=counts.get)


def test_layer_of_reads_the_first_members_path():
    w = lambda *path: Member(path, 1, None, "b")  # noqa: E731
    assert allocation.layer_of(Group("g", "mlp", (w("layers", 3, "w"),))) == 3  # one member
    assert allocation.layer_of(Group("g", "mlp", (w("layers", 2),))) == 2      # a list of leaves
    assert allocation.layer_of(Group("g", "mlp", (w("layers",),))) is None     # no index
    assert allocation.layer_of(Group("g", "mlp", (w("embed", 0),))) is None


def test_zscore_columns_are_each_groups_best_units_first():
    # a's z-scores (one block) are [1.10, 0.89, -1.00, -1.00]; b is constant (z = 0): a's second
    # best unit (0.89) beats b's; with a's columns sorted worst first it would be -1.00
    assert _one_more("zscore", b=[1, 1, 1, 1], a=[10, 9, 0, 0]) == "a"


def test_zscore_is_not_rounded_to_whole_numbers():
    # a = [0, 0, 1]: z = [1.41, -0.71, -0.71]; b = [0, 1]: z = ±1. a's second column (-0.71)
    # beats b's (-1); rounded to whole numbers both are -1 and the tie would go to b (first)
    assert _one_more("zscore", b=[0, 1], a=[0, 0, 1]) == "a"


def test_zscore_ties_at_nine_decimals_go_to_group_order():
    # a's z-scores are ±1 (to 1e-12); b's are ±(1 - 1e-10) (the 1e-12 in the denominator over a
    # deviation of 0.01): equal to 9 decimals, so the tie on the second column goes to a (first)
    assert _one_more("zscore", a=[0, 1], b=[0, 0.02]) == "a"


def test_zscore_uses_the_population_deviation():
    # a = [0, 1]: z = ±1. b = [0, 0, 1, 2]: mean 0.75, deviation sqrt(2.75 / 4) = 0.829, so its
    # zeros have z = -0.905 > -1: the two extra units go to b. With the unbiased deviation
    # (sqrt(2.75 / 3)) a's -0.707 would beat b's -0.783
    params, groups, s = _toy(a=[0, 1], b=[0, 0, 1, 2])
    assert allocation.counts("zscore", params, groups, s, max_params=4) == {"a": 1, "b": 3}


def test_zscore_of_a_nearly_constant_group_is_small():
    # a's scores differ by 1e-12: z = ±0.5e-12 / (0.5e-12 + 1e-12) = ±1/3, not ±1 (a negative
    # epsilon would give ∓1): a's second column (-1/3) beats b's (-1) although b comes first
    assert _one_more("zscore", b=[0, 1], a=[0, 1e-12]) == "a"


def test_unknown_allocation_message_lists_the_choices():
    params, groups, s = _toy(a=[1, 2])
    with pytest.raises(ValueError) as err:
        allocation.counts("flap", params, groups, s, max_params=2)
    assert str(err.value) == "allocation must be one of global, zscore, protect, depth, got 'flap'"
