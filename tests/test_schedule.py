"""Learning-rate and sparsity schedules; cumulative targets relative to the dense model."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import ecospa
from ecospa.func import llama
from ecospa.schedule import PruneSchedule, dense_sizes, round_target, warmup_cosine
from strategies import float_scores, models, seeds


def test_warmup_cosine_shape():
    lr = warmup_cosine(1.0, 10, 110, min_ratio=0.1)
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    vals = [lr(s) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    with pytest.raises(ValueError):
        warmup_cosine(1.0, 20, 10)


def test_rounds_follow_the_ramp():
    s = PruneSchedule(warmup_steps=100, window=10, rounds=4, every=50, ramp="cubic", sparsity=0.8)
    rounds = s.rounds_at()
    assert [r for r, _ in rounds] == [110, 160, 210, 260]
    for i, (_, t) in enumerate(rounds):
        assert t == pytest.approx(0.8 * (1 - (1 - (i + 1) / 4) ** 3))
    assert rounds[-1][1] == pytest.approx(0.8)
    lin = PruneSchedule(warmup_steps=0, window=5, rounds=2, ramp="linear", sparsity={"mlp": 0.5, "qk": 0.2})
    assert lin.rounds_at() == [(5, {"mlp": 0.25, "qk": 0.1}), (10, {"mlp": 0.5, "qk": 0.2})]
    assert s.target_at(109) == 0.0 and s.target_at(170) == rounds[1][1]
    assert s.in_window(100) and s.in_window(109) and not s.in_window(110) and not s.in_window(99)
    assert PruneSchedule(sparsity=0.0).rounds_at() == []


def test_bad_schedules():
    with pytest.raises(ValueError, match="exactly one"):
        PruneSchedule(sparsity=0.5, budget=0.5)
    with pytest.raises(ValueError, match="ramp"):
        PruneSchedule(ramp="exp")
    with pytest.raises(ValueError, match="every"):
        PruneSchedule(window=10, every=5, rounds=2)
    with pytest.raises(ValueError, match="sparsity"):
        PruneSchedule(sparsity=1.0)


CFG = llama.Config(vocab_size=11, dim=8, n_layers=2, n_heads=2, head_dim=8, ffn_dim=30)


def _prune(params, groups, target_kwargs):
    scores = {g.name: torch.rand(*g.sizes(params), generator=torch.Generator().manual_seed(3),
                                 dtype=torch.float64) for g in groups}
    return ecospa.slice_units(params, groups, ecospa.select(params, groups, scores, **target_kwargs))


@pytest.mark.parametrize("ramp", ["cubic", "linear"])
def test_cumulative_sparsity_relative_to_dense(ramp):
    params = llama.init(CFG)
    groups = llama.coupled_groups(CFG)
    dense = dense_sizes(params, groups)
    sched = PruneSchedule(warmup_steps=0, window=1, rounds=3, ramp=ramp, sparsity={"mlp": 0.7, "qk": 0.5})
    for _, target in sched.rounds_at():
        params = _prune(params, groups, round_target(target, groups, dense, params))
        sizes = ecospa.validate(params, groups)
        for g in groups:
            frac = target.get(g.kind, 0.0)
            assert sizes[g.name][1] == max(1, round((1 - frac) * dense[g.name][0])), (g.name, target)
    assert ecospa.validate(params, groups)["layers.0.mlp"][1] == 9  # 30 * 0.3
    assert ecospa.validate(params, groups)["layers.0.qk"][1] == 2  # 4 pairs * 0.5


def test_cumulative_budget_relative_to_dense():
    params = llama.init(CFG)
    groups = llama.coupled_groups(CFG)
    dense = dense_sizes(params, groups)
    total0 = sum(v[1] for v in dense.values())
    sched = PruneSchedule(warmup_steps=0, window=1, rounds=3, budget=0.6)
    for _, target in sched.rounds_at():
        params = _prune(params, groups, round_target(target, groups, dense, params, by="budget"))
        now = sum(v[1] for v in dense_sizes(params, groups).values())
        # Whole columns only: the kept total is at most the target and within one column of it.
        assert now <= total0 * (1 - target) + 1e-9
        assert now > total0 * (1 - target) - max(g.numel_per_unit(params) * 2 for g in groups)
    assert math.isclose(1 - now / total0, 0.6, abs_tol=0.05)


# --- round_target gives counts: honoured exactly, reaching each cumulative target -------------

ramps = st.lists(st.floats(0.0, 0.95), min_size=1, max_size=4).map(sorted)


@given(models(), seeds, ramps, st.booleans())
def test_round_counts_reach_the_cumulative_sparsity(model_cfg, seed, ramp, per_kind):
    """Every round keeps exactly max(1, round((1 - t) * dense units)) units in every group,
    whatever the earlier rounds left (no dependence on how select rounds a fraction)."""
    model, cfg = model_cfg
    params, groups = model.init(cfg, seed=seed, dtype=torch.float64), model.coupled_groups(cfg)
    dense = dense_sizes(params, groups)
    for t in ramp:
        target = {"mlp": t, "qk": t / 2} if per_kind else t
        counts = round_target(target, groups, dense, params)["counts"]
        before = ecospa.validate(params, groups)
        assert all(1 <= counts[g.name] <= before[g.name][1] for g in groups)
        params = ecospa.slice_units(params, groups, ecospa.select(
            params, groups, float_scores(params, groups, seed), counts=counts))
        after = ecospa.validate(params, groups)
        for g in groups:
            frac = target.get(g.kind, 0.0) if per_kind else target
            assert after[g.name][1] == counts[g.name] == max(1, round((1 - frac) * dense[g.name][0]))


@given(models(), seeds, ramps.map(lambda r: [0.6 * t for t in r]))
def test_round_counts_reach_the_cumulative_budget(model_cfg, seed, ramp):
    """A budget's counts keep at most (1 - t) of the dense group parameters, and no group that
    lost units this round could take one more column without passing it."""
    model, cfg = model_cfg
    params, groups = model.init(cfg, seed=seed, dtype=torch.float64), model.coupled_groups(cfg)
    dense = dense_sizes(params, groups)
    total0 = sum(v[1] for v in dense.values())
    column = {g.name: g.sizes(params)[0] * g.numel_per_unit(params) for g in groups}
    assume(sum(column.values()) <= total0 * (1 - ramp[-1]))  # one unit per block must fit
    for t in ramp:
        scores, before = float_scores(params, groups, seed), ecospa.validate(params, groups)
        counts = round_target(t, groups, dense, params, by="budget", scores=scores)["counts"]
        params = ecospa.slice_units(params, groups, ecospa.select(params, groups, scores, counts=counts))
        now = ecospa.validate(params, groups)
        kept = sum(column[g.name] * now[g.name][1] for g in groups)
        assert kept <= total0 * (1 - t) + 1e-9
        for g in groups:
            assert now[g.name][1] == counts[g.name]
            if counts[g.name] < before[g.name][1]:  # (units removed earlier stay removed)
                assert kept + column[g.name] > total0 * (1 - t) - 1e-9


def test_round_target_budget_without_scores_is_a_fraction_of_the_current_tree():
    params = llama.init(CFG)
    groups = llama.coupled_groups(CFG)
    dense = dense_sizes(params, groups)
    assert round_target(0.0, groups, dense, params, by="budget") == {"budget": 0.0}
    assert round_target(0.4, groups, dense, params, by="budget")["budget"] == pytest.approx(0.4)
    with pytest.raises(ValueError, match="one global fraction"):
        round_target({"mlp": 0.4}, groups, dense, params, by="budget")
    with pytest.raises(ValueError, match="by must be"):
        round_target(0.4, groups, dense, params, by="units")


def test_rewarm_factor_ramps_after_each_round():
    s = PruneSchedule(warmup_steps=10, window=5, rounds=2, every=10, sparsity=0.5, rewarm=4)
    assert [r for r, _ in s.rounds_at()] == [15, 25]
    assert [s.lr_factor(t) for t in (0, 14)] == [1.0, 1.0]  # dense phase untouched
    assert [s.lr_factor(t) for t in range(15, 20)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert [s.lr_factor(t) for t in (24, 25, 26)] == [1.0, 0.25, 0.5]  # again after round 2
    assert PruneSchedule(sparsity=0.5).lr_factor(10_000) == 1.0
    for bad in (dict(rewarm=-1), dict(rewarm=1.5), dict(rewarm=True), dict(moments="zero")):
        with pytest.raises(ValueError):
            PruneSchedule(sparsity=0.5, **bad)


# --- soft removal (decay_steps) and gradual shrinking (issue 27) -----------------------------

def test_soft_removal_ramp_reaches_exactly_zero():
    s = PruneSchedule(warmup_steps=10, window=5, rounds=2, every=10, sparsity=0.5, decay_steps=4)
    assert [r for r, _ in s.rounds_at()] == [15, 25] and s.slice_step(15) == 19
    assert [s.decaying(t) for t in (14, 15, 18, 19, 24, 25, 28, 29)] == [None, 15, 15, None, None, 25, 25, None]
    assert [s.decay_level(t) for t in range(14, 20)] == [1.0, 0.75, 0.5, 0.25, 0.0, 1.0]
    mult = [s.decay_multiplier(t) for t in range(14, 20)]
    assert mult[0] == 1.0 and mult[-1] == 1.0 and mult[4] == 0.0  # exactly zero at the ramp's last step
    assert mult[1:4] == pytest.approx([3 / 4, 2 / 3, 1 / 2])
    level = 1.0
    for t in range(15, 19):  # the product of the multipliers follows the ramp
        level *= mult[t - 14]
        assert level == pytest.approx(s.decay_level(t), abs=1e-15)
    plain = PruneSchedule(warmup_steps=10, window=5, rounds=2, every=10, sparsity=0.5)
    assert plain.slice_step(15) == 15 and plain.decaying(15) is None and plain.decay_multiplier(15) == 1.0
    assert plain.rounds_at() == s.rounds_at()  # the rounds (choices) are where they were
    with pytest.raises(ValueError, match="window \\+ decay_steps"):
        PruneSchedule(warmup_steps=10, window=5, rounds=2, every=8, sparsity=0.5, decay_steps=4)
    PruneSchedule(warmup_steps=10, window=5, rounds=2, every=9, sparsity=0.5, decay_steps=4)  # just fits
    PruneSchedule(warmup_steps=10, window=5, rounds=1, sparsity=0.5, decay_steps=40)  # one round: no next window
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="decay_steps"):
            PruneSchedule(sparsity=0.5, decay_steps=bad)


def test_scale_units_scales_only_the_removed_units():
    from ecospa.prune import scale_units
    params = llama.init(CFG, seed=1)
    groups = llama.coupled_groups(CFG)
    scores = {g.name: torch.rand(*g.sizes(params), generator=torch.Generator().manual_seed(5),
                                 dtype=torch.float64) for g in groups}
    keep = ecospa.select(params, groups, scores, sparsity=0.5)
    zero, masked = scale_units(params, groups, keep, 0.0), ecospa.mask(params, groups, keep)
    for a, b in zip(optree_leaves(zero), optree_leaves(masked)):
        assert torch.equal(a, b)
    third = scale_units(params, groups, keep, 0.3)
    for a, b, p in zip(optree_leaves(third), optree_leaves(params),
                          optree_leaves(ecospa.mask(optree_map(torch.ones_like, params), groups, keep))):
        kept = p.bool()
        assert torch.equal(a[kept], b[kept])  # kept units: multiplied by exactly 1
        assert torch.equal(a[~kept], b[~kept] * 0.3)
    assert any((~x.bool()).any() for x in optree_leaves(ecospa.mask(optree_map(torch.ones_like, params), groups, keep)))


def optree_leaves(tree):
    import optree
    return optree.tree_leaves(tree, namespace="")


def optree_map(fn, tree):
    import optree
    return optree.tree_map(fn, tree, namespace="")


def test_gradual_spreads_small_rounds_over_the_middle_of_training():
    from ecospa.schedule import gradual
    g = gradual(1800, 10, window=40, budget=0.5, ramp="linear")
    rounds = g.rounds_at()
    assert [s for s, _ in rounds] == list(range(450, 1351, 100))  # 25% .. 75% of 1800 steps
    assert [t for _, t in rounds] == pytest.approx([0.05 * (r + 1) for r in range(10)])
    assert (g.warmup_steps, g.window, g.every, g.budget) == (410, 40, 100, 0.5)
    soft = gradual(1800, 10, window=40, budget=0.5, ramp="linear", decay_steps=60)
    assert soft.rounds_at() == rounds and soft.decay_steps == 60
    other = gradual(1000, 5, start=0.3, end=0.7, window=20, sparsity=0.4)
    assert [s for s, _ in other.rounds_at()] == [300, 400, 500, 600, 700]
    assert other.rounds_at()[-1][1] == pytest.approx(0.4) and other.ramp == "cubic"
    cramped = gradual(1000, 5, start=0.3, end=0.7, window=60, sparsity=0.4, decay_steps=50)
    assert cramped.every == 110  # spaced so that each round is sliced before the next window
    assert gradual(1000, 1, start=0.5, window=20, sparsity=0.4).rounds_at() == [(500, 0.4)]
    for bad in (dict(start=0.8, end=0.7), dict(start=0.01), dict(rounds=0)):
        with pytest.raises(ValueError):
            gradual(1000, **{"rounds": 4, **bad})
