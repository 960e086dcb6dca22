"""Properties that kill realistic bugs the invariant tests let through (issue 15): the budget
allocation's ranking, the kept count's rounding, tie-breaking, and custom groups whose member
axes come in any order. Each test names the seeded bug it catches."""
from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ecospa
from ecospa._tree import get_path
from ecospa.importance import unit_dots
from ecospa.select import keep_top
from strategies import custom_groups, float_scores, models, random_scores, seeds

FAST = settings(max_examples=30, deadline=None)


def build(model, cfg, seed):
    return model.init(cfg, seed=seed, dtype=torch.float64), model.coupled_groups(cfg)


def columns(params, groups, scores):
    """Per group: (cost of one column in parameters, column values best first)."""
    out = {}
    for g in groups:
        n_blocks, _ = g.sizes(params)
        s = torch.as_tensor(scores[g.name], dtype=torch.float64).reshape(g.sizes(params))
        out[g.name] = (n_blocks * g.numel_per_unit(params),
                       torch.sort(s, dim=1, descending=True).values.sum(0).tolist())
    return out


# --- bug 1: the budget must rank columns by importance PER PARAMETER --------------------------

@FAST
@given(models(), seeds, st.floats(0.05, 0.9))
def test_budget_keeps_the_best_columns_per_parameter(model_cfg, seed, budget):
    """Exchange property of the global allocation: for every kept column k and every group's next
    (first dropped) column d, if swapping k for d would still fit the budget, then k is worth at
    least as much per parameter as d. And no dropped column fits on top of the kept ones."""
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    scores = float_scores(params, groups, seed)
    try:
        keep = ecospa.select(params, groups, scores, budget=budget)
    except ValueError as err:
        assert "empty a group" in str(err)
        assume(False)
    cols = columns(params, groups, scores)
    counts = {g.name: keep[g.name].shape[1] for g in groups}
    total = sum(cost * len(vals) for cost, vals in cols.values())
    allowed = total * (1 - budget)
    used = sum(cols[n][0] * counts[n] for n in counts)
    assert used <= allowed + 1e-6
    slack = 1e-9 * max(1.0, allowed)
    kept = [(cols[n][1][c] / cols[n][0], cols[n][0]) for n in counts for c in range(1, counts[n])]
    for name, (cost, vals) in cols.items():
        if counts[name] == len(vals):
            continue
        nxt = vals[counts[name]] / cost
        assert used + cost > allowed - slack, f"{name}: a dropped column still fits the budget"
        for value, kcost in kept:
            if used - kcost + cost <= allowed - slack:
                assert value >= nxt - 1e-12 * max(1.0, abs(nxt)), (
                    f"kept a column worth {value}/param while {name}'s next one is worth {nxt}/param")


def test_budget_ranking_golden():
    """A hand-checked case where raw scores and scores per parameter disagree."""
    from ecospa.groups import Group, Member
    params = {"cheap": torch.ones(1, 4), "dear": torch.ones(10, 4)}  # 1 vs 10 params per unit
    groups = [Group("cheap", "mlp", (Member(("cheap",), 1, None, "b"),)),
              Group("dear", "mlp", (Member(("dear",), 1, None, "b"),))]
    scores = {"cheap": torch.tensor([[4.0, 3.0, 2.0, 1.0]]), "dear": torch.tensor([[40.0, 15.0, 10.0, 5.0]])}
    # 44 params, keep 22; the columns 0 (11 params) are forced. Per parameter the others are worth
    # cheap 3, 2, 1 and dear 1.5, 1, .5: cheap 1, cheap 2, (dear 1 does not fit), cheap 3.
    # By raw score dear 1 (15) would come first and leave room for one cheap column only.
    keep = ecospa.select(params, groups, scores, budget=0.5)
    assert {k: v.tolist() for k, v in keep.items()} == {"cheap": [[0, 1, 2, 3]], "dear": [[0]]}


# --- bug 5: sparsity keeps round((1 - s) * n) units, never floor -------------------------------

@FAST
@given(models(), seeds, st.one_of(st.floats(0.0, 0.99), st.sampled_from([0.3, 0.25, 0.7, 0.5, 0.1])),
       st.booleans())
def test_sparsity_kept_count_is_rounded(model_cfg, seed, s, per_kind):
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    sparsity = {"qk": s, "mlp": s / 2} if per_kind else s
    keep = ecospa.select(params, groups, random_scores(params, groups, seed), sparsity=sparsity)
    for g in groups:
        frac = (sparsity.get(g.kind, 0.0) if per_kind else s)
        n_blocks, n = g.sizes(params)
        assert keep[g.name].shape == (n_blocks, max(1, round((1 - frac) * n))), (g.name, frac, n)


@pytest.mark.parametrize("s, n, want", [(0.3, 5, 4), (0.5, 3, 2), (0.7, 5, 2), (0.99, 6, 1), (0.0, 6, 6),
                                        (0.5, 5, 2), (0.1, 6, 5)])
def test_sparsity_kept_count_golden(s, n, want):
    """round, not floor (0.7 * 5 = 3.5 -> 4) nor ceil; Python's round: 2.5 -> 2."""
    from ecospa.groups import Group, Member
    params = {"w": torch.ones(2, n)}
    groups = [Group("g", "mlp", (Member(("w",), 1, 0, "b"),))]
    keep = ecospa.select(params, groups, {"g": torch.arange(2.0 * n).reshape(2, n)}, sparsity=s)
    assert keep["g"].shape == (2, want)
    assert keep["g"].tolist() == [list(range(n - want, n))] * 2


# --- bug 7: ties go to the LOWER index ---------------------------------------------------------

@FAST
@given(models(), seeds, st.floats(0.0, 0.95))
def test_ties_go_to_the_lower_index(model_cfg, seed, s):
    """Every kept unit beats every dropped unit of its block: higher score, or equal score and
    lower index (random_scores draws integers 0..4, so ties are frequent)."""
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    scores = random_scores(params, groups, seed)
    keep = ecospa.select(params, groups, scores, sparsity=s)
    for g in groups:
        sc = scores[g.name]
        for h in range(sc.shape[0]):
            kept = set(keep[g.name][h].tolist())
            for i in kept:
                for j in set(range(sc.shape[1])) - kept:
                    assert sc[h, i] > sc[h, j] or (sc[h, i] == sc[h, j] and i < j), (g.name, h, i, j)


def test_ties_golden():
    from ecospa.groups import Group, Member
    params = {"w": torch.ones(2, 5)}
    groups = [Group("g", "mlp", (Member(("w",), 1, 0, "b"),))]
    scores = {"g": torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0], [3.0, 3.0, 3.0, 3.0, 3.0]])}
    assert ecospa.select(params, groups, scores, sparsity=0.4)["g"].tolist() == [[0, 1, 3], [0, 1, 2]]
    assert keep_top(scores["g"], 2).tolist() == [[1, 3], [0, 1]]


# --- bug 4: custom groups with permuted member axes (block axis after the unit axis) ----------

def _onto(table: torch.Tensor, leaf: torch.Tensor, m) -> torch.Tensor:
    """A [n_blocks, n_units] table placed on the member's axes, broadcastable to the leaf."""
    if m.block_axis is None:
        t = table[0].reshape(-1, *[1] * (leaf.ndim - 1))
        return t.movedim(0, m.unit_axis)
    t = table.reshape(*table.shape, *[1] * (leaf.ndim - 2))
    return t.movedim((0, 1), (m.block_axis, m.unit_axis))


def reference_mask(leaf, idx, m, n_units):
    table = torch.zeros(idx.shape[0], n_units, dtype=leaf.dtype)
    for h in range(idx.shape[0]):
        table[h, idx[h]] = 1.0
    return leaf * _onto(table, leaf, m)


def reference_slice(leaf, idx, m):
    if m.block_axis is None:
        return leaf.index_select(m.unit_axis, idx[0])
    x = leaf.movedim((m.block_axis, m.unit_axis), (0, 1))
    x = torch.stack([x[h][idx[h]] for h in range(idx.shape[0])])
    return x.movedim((0, 1), (m.block_axis, m.unit_axis))


@FAST
@given(custom_groups(), seeds, st.floats(0.0, 0.9))
def test_custom_groups_mask_and_slice_match_reference(pg, seed, s):
    """mask zeroes exactly unit (h, j) along (block_axis, unit_axis) of every masked member, and
    slice_units keeps exactly the kept entries, whatever the order of the member's axes."""
    params, groups = pg
    before = optree.tree_map(lambda x: x.clone(), params)
    keep = ecospa.select(params, groups, float_scores(params, groups, seed), sparsity=s)
    masked = ecospa.mask(params, groups, keep)
    small = ecospa.slice_units(params, groups, keep)
    for g in groups:
        n_units = g.sizes(params)[1]
        for m in g.members:
            leaf = get_path(params, m.path)
            want = reference_mask(leaf, keep[g.name], m, n_units) if m.masked else leaf
            assert torch.equal(get_path(masked, m.path), want), (g.name, m)
            assert torch.equal(get_path(small, m.path), reference_slice(leaf, keep[g.name], m)), (g.name, m)
    for a, b in zip(optree.tree_leaves(params), optree.tree_leaves(before)):
        assert torch.equal(a, b)


@FAST
@given(custom_groups(), seeds)
def test_custom_groups_unit_dots_match_reference(pg, seed):
    """v_j = sum of W * dL/dW over unit (h, j)'s entries, whatever the axis order."""
    params, groups = pg
    grads = optree.tree_map(lambda x: torch.randn(x.shape, dtype=x.dtype,
                                                  generator=torch.Generator().manual_seed(seed)), params)
    for side in ("a", "b"):
        for g in groups:
            members = g.side(side)
            if not members:
                with pytest.raises(ValueError, match=f"no side-'{side}' member"):
                    unit_dots(params, grads, [g], side)
                continue
            want = 0
            for m in members:
                prod = get_path(params, m.path) * get_path(grads, m.path)
                if m.block_axis is None:
                    want = want + prod.movedim(m.unit_axis, 0).reshape(prod.shape[m.unit_axis], -1).sum(1)[None]
                else:
                    x = prod.movedim((m.block_axis, m.unit_axis), (0, 1))
                    want = want + x.reshape(x.shape[0], x.shape[1], -1).sum(-1)
            torch.testing.assert_close(unit_dots(params, grads, [g], side)[g.name], want,
                                       rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("block_first", [True, False])
def test_mask_block_axis_after_unit_axis_golden(block_first):
    """A [n_units=3, n_blocks=2] leaf (block axis AFTER the unit axis) and its transpose."""
    from ecospa.groups import Group, Member
    w = torch.arange(1.0, 7.0).reshape(3, 2)  # w[j, h]
    m = Member(("w",), 0, 1, "b")
    if block_first:
        w, m = w.T.contiguous(), Member(("w",), 1, 0, "b")
    keep = {"g": torch.tensor([[0, 2], [1, 2]])}  # block 0 keeps units 0, 2; block 1 keeps 1, 2
    out = ecospa.mask({"w": w}, [Group("g", "mlp", (m,))], keep)["w"]
    want = torch.tensor([[1.0, 0.0], [0.0, 4.0], [5.0, 6.0]])
    assert torch.equal(out, want.T if block_first else want)
    small = ecospa.slice_units({"w": w}, [Group("g", "mlp", (m,))], keep)["w"]
    want = torch.tensor([[1.0, 4.0], [5.0, 6.0]])
    assert torch.equal(small, want.T if block_first else want)
