"""``select(..., counts=)``: explicit per-group widths, honoured exactly and validated."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ecospa
from ecospa.func import llama
from ecospa.select import allocate, keep_top, select
from strategies import custom_groups, float_scores, random_scores, seeds


@given(custom_groups(max_groups=3), seeds, st.data())
def test_counts_are_honoured_exactly(tree, seed, data):
    params, groups = tree
    sizes = ecospa.validate(params, groups)
    named = data.draw(st.lists(st.sampled_from([g.name for g in groups]), unique=True))
    counts = {name: data.draw(st.integers(1, sizes[name][1])) for name in named}
    scores = random_scores(params, groups, seed)  # ties are likely: tie-breaking included
    keep = select(params, groups, scores, counts=counts)
    for g in groups:
        blocks, units = sizes[g.name]
        k = counts.get(g.name, units)  # unnamed groups keep every unit
        assert tuple(keep[g.name].shape) == (blocks, k)
        assert torch.equal(keep[g.name], keep_top(scores[g.name].reshape(blocks, units), k))
    small = ecospa.slice_units(params, groups, keep)
    assert {n: u for n, (_, u) in ecospa.validate(small, groups).items()} == {
        g.name: counts.get(g.name, sizes[g.name][1]) for g in groups}


@given(custom_groups(max_groups=3), seeds, st.floats(0.0, 0.95))
def test_a_fraction_is_the_counts_it_rounds_to(tree, seed, frac):
    """sparsity=f and counts={name: max(1, round((1 - f) * n))} choose the same units."""
    params, groups = tree
    sizes = ecospa.validate(params, groups)
    scores = float_scores(params, groups, seed)
    counts = {g.name: max(1, round((1 - frac) * sizes[g.name][1])) for g in groups}
    a, b = select(params, groups, scores, sparsity=frac), select(params, groups, scores, counts=counts)
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)


@given(custom_groups(max_groups=3), seeds, st.floats(0.0, 0.9))
def test_a_budget_is_the_counts_allocate_gives(tree, seed, budget):
    params, groups = tree
    scores = float_scores(params, groups, seed)
    sizes = ecospa.validate(params, groups)
    total = sum(sizes[g.name][0] * sizes[g.name][1] * g.numel_per_unit(params) for g in groups)
    try:
        a = select(params, groups, scores, budget=budget)
    except ValueError as err:
        assert "empty a group" in str(err)
        return
    b = select(params, groups, scores, counts=allocate(params, groups, scores, total * (1 - budget)))
    assert all(torch.equal(a[g.name], b[g.name]) for g in groups)


CFG = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=6)


@pytest.fixture
def setup():
    params = llama.init(CFG, seed=0)
    groups = llama.coupled_groups(CFG)
    return params, groups, {g.name: torch.rand(g.sizes(params)) for g in groups}


@pytest.mark.parametrize("counts, match", [
    ({"layers.9.mlp": 2}, r"counts names groups \['layers\.9\.mlp'\] that are not among the groups"),
    ({"layers.0.mlp": 0}, r"counts for group 'layers\.0\.mlp' must be a whole number >= 1, at most 6"),
    ({"layers.0.mlp": 7}, r"'layers\.0\.mlp' must be a whole number >= 1, at most 6 \(its units\); got 7"),
    ({"layers.0.mlp": -1}, r"got -1 \(a group never empties\)"),
    ({"layers.0.mlp": 2.0}, r"whole number.*got 2\.0"),
    ({"layers.0.mlp": True}, r"whole number.*got True"),
    ({"layers.0.mlp": "2"}, r"whole number.*got '2'"),
    ([("layers.0.mlp", 2)], r"counts must be a dict"),
])
def test_bad_counts_name_what_is_wrong(setup, counts, match):
    params, groups, scores = setup
    with pytest.raises(ValueError, match=match):
        select(params, groups, scores, counts=counts)


def test_counts_is_a_target_on_its_own(setup):
    params, groups, scores = setup
    for other in ({"sparsity": 0.5}, {"budget": 0.5}):
        with pytest.raises(ValueError, match="exactly one target: counts="):
            select(params, groups, scores, counts={"layers.0.mlp": 2}, **other)
    ecospa.check_target(groups, counts={"layers.0.mlp": 2})
    with pytest.raises(ValueError, match="not among the groups"):
        ecospa.check_target(groups, counts={"mlp": 2})
