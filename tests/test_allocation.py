"""The allocation variants of ``ecospa.allocation``: every one keeps within the budget, never
empties a group, and has the property that defines it (FLAP's z-scores ignore each group's
scale; protected layers stay whole; the depth ramp removes more from later layers)."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ecospa import allocation
from ecospa.select import allocate, select
from ecospa.func import llama
from ecospa.groups import validate
from strategies import models, random_scores, seeds

EXAMPLES = settings(max_examples=30, deadline=None)


def _setup(module, cfg, seed):
    params = module.init(cfg, seed=seed)
    groups = module.coupled_groups(cfg)
    return params, groups, random_scores(params, groups, seed)


def _cost(params, groups, counts):
    sizes = validate(params, groups)
    return sum(sizes[g.name][0] * g.numel_per_unit(params) * counts[g.name] for g in groups)


def _total(params, groups):
    return _cost(params, groups, {n: s[1] for n, s in validate(params, groups).items()})


@EXAMPLES
@given(models(), seeds, st.floats(0.0, 0.6), st.sampled_from(allocation.ALLOCATIONS))
def test_every_variant_keeps_within_the_budget_and_every_group(model_cfg, seed, budget, how):
    module, cfg = model_cfg
    params, groups, scores = _setup(module, cfg, seed)
    sizes = validate(params, groups)
    total = _total(params, groups)
    floor = _cost(params, groups, {g.name: 1 for g in groups})
    allowed = total * (1 - budget)
    if how == "protect":  # whole first/last layers, then at least one unit per block elsewhere
        n = cfg.n_layers
        ends = {g.name for g in groups if allocation.layer_of(g) < -(-n // 8) or allocation.layer_of(g) >= n - -(-n // 16)}
        floor = sum(_cost(params, [g], {g.name: sizes[g.name][1] if g.name in ends else 1}) for g in groups)
    if how != "depth" and floor > allowed + 1e-9:  # the same slack as allocation.counts
        with pytest.raises(ValueError, match="empty a group|too few"):
            allocation.counts(how, params, groups, scores, allowed)
        return
    counts = allocation.counts(how, params, groups, scores, allowed)
    assert set(counts) == {g.name for g in groups}
    assert all(1 <= counts[n] <= sizes[n][1] for n in counts)
    if how != "depth":  # depth rounds per group: within one unit per group of the mean fraction
        assert _cost(params, groups, counts) <= allowed + 1e-6
    # the counts are a valid selection target
    keep = select(params, groups, scores, counts=counts)
    assert {n: k.shape[1] for n, k in keep.items()} == counts


@EXAMPLES
@given(models(), seeds, st.floats(0.05, 0.6))
def test_global_is_select_allocate(model_cfg, seed, budget):
    module, cfg = model_cfg
    params, groups, scores = _setup(module, cfg, seed)
    allowed = _total(params, groups) * (1 - budget)
    try:
        expected = allocate(params, groups, scores, allowed)
    except ValueError:
        return
    assert allocation.counts("global", params, groups, scores, allowed) == expected


@EXAMPLES
@given(models(), seeds, st.floats(0.05, 0.6), st.floats(0.01, 100.0), st.floats(-5.0, 5.0))
def test_zscore_ignores_each_groups_scale_and_offset(model_cfg, seed, budget, scale, shift):
    """Standardizing per group is what z-scoring is for: an affine change of ONE group's scores
    (a layer whose Fisher values are 100x larger) leaves the counts as they were."""
    module, cfg = model_cfg
    params, groups, scores = _setup(module, cfg, seed)
    allowed = _total(params, groups) * (1 - budget)
    try:
        before = allocation.counts("zscore", params, groups, scores, allowed)
    except ValueError:
        return
    name = groups[-1].name
    s = scores[name]
    if float(s.std(unbiased=False)) == 0.0:
        return  # constant scores stay constant: nothing to standardize
    moved = dict(scores, **{name: s * scale + shift})
    assert allocation.counts("zscore", params, groups, moved, allowed) == before


def _layered(n_layers, seed):
    cfg = llama.Config(vocab_size=11, dim=8, n_layers=n_layers, n_heads=2, n_kv_heads=1, head_dim=4,
                       ffn_dim=16, init_std=0.3)
    return (cfg,) + _setup(llama, cfg, seed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_protect_keeps_the_first_and_last_layers_whole(seed):
    cfg, params, groups, scores = _layered(17, seed)  # ceil(17/8) = 3 first, ceil(17/16) = 2 last
    sizes = validate(params, groups)
    counts = allocation.counts("protect", params, groups, scores, _total(params, groups) * 0.7)
    whole_layers = {allocation.layer_of(g) for g in groups if counts[g.name] == sizes[g.name][1]}
    assert {0, 1, 2, 15, 16} <= whole_layers
    pruned = [g for g in groups if counts[g.name] < sizes[g.name][1]]
    assert pruned and all(3 <= allocation.layer_of(g) <= 14 for g in pruned)


@pytest.mark.parametrize("budget", [0.2, 0.5])
def test_depth_removes_more_from_later_layers_and_meets_the_mean(budget):
    cfg, params, groups, scores = _layered(6, 0)
    counts = allocation.counts("depth", params, groups, scores, _total(params, groups) * (1 - budget))
    for kind in ("qk", "vo", "mlp"):
        per_layer = [counts[g.name] for g in groups if g.kind == kind]
        assert per_layer == sorted(per_layer, reverse=True) and per_layer[0] > per_layer[-1]
    removed = 1 - _cost(params, groups, counts) / _total(params, groups)
    assert abs(removed - budget) < 0.08  # rounding to whole units in small groups


def test_unknown_variant_and_unlayered_groups_are_refused():
    cfg, params, groups, scores = _layered(2, 0)
    with pytest.raises(ValueError, match="allocation must be one of"):
        allocation.counts("flap", params, groups, scores, 1e9)
    tree = {"blocks": params["layers"]}
    from ecospa.groups import Group, Member
    moved = [Group(g.name, g.kind, tuple(Member(("blocks",) + m.path[1:], m.unit_axis, m.block_axis, m.side,
                                                m.masked) for m in g.members)) for g in groups]
    with pytest.raises(ValueError, match="needs groups under"):
        allocation.counts("depth", tree, moved, scores, 1e9)
