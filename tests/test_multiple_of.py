"""``multiple_of``: kept widths that matmul kernels run at full vector width.

Every group keeps a total width (blocks x units) that is a multiple of m, or all its units;
every target still holds (budgets are never exceeded); m=1 is the unaligned behaviour; and the
chunked greedy equals the plain greedy run on chunk-sized columns (the obviously-right reduction)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import ecospa
from ecospa import allocation
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.groups import validate
from ecospa.jobs.compress_job import Job
from ecospa.schedule import PruneSchedule, dense_sizes, round_target
from ecospa.select import select
from strategies import models, random_scores, seeds

EXAMPLES = settings(max_examples=30, deadline=None)
M = st.sampled_from([1, 2, 3, 4, 8])


def _ok(k: int, n: int, m: int) -> bool:
    return k == n or (k % m == 0 and m <= k <= n)


def _width_ok(sizes, counts, m: int) -> bool:
    """The definition: blocks x units a multiple of m, or the group whole."""
    return all(counts[n] == sizes[n][1] or (sizes[n][0] * counts[n]) % m == 0 for n in counts)


@settings(max_examples=300, deadline=None)
@given(st.integers(-3, 80), st.integers(1, 70), st.integers(1, 16))
def test_aligned_is_the_nearest_allowed_count(k, n, m):
    got = allocation.aligned(k, n, m)
    allowed = sorted({n} | {c for c in range(m, n + 1, m)})  # brute force: every allowed width
    assert got in allowed and _ok(got, n, m)
    want = min(allowed, key=lambda c: (abs(c - min(max(k, 1), n)), -c))  # nearest, ties: the larger
    assert got == want
    if m == 1:
        assert got == max(1, min(k, n))


@EXAMPLES
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 4), st.floats(0.0, 1.0), seeds)
def test_chunked_greedy_is_greedy_on_chunk_columns(chunks, m, keep_frac, seed):
    """With every width a multiple of m, greedy(multiple_of=m) == m * greedy on columns that are
    the chunks (cost m x, worth the chunk's mean): the same decisions, made by the plain code."""
    g = torch.Generator().manual_seed(seed)
    names = [f"g{i}" for i in range(len(chunks))]
    value = {n: torch.sort(torch.rand(c * m, generator=g, dtype=torch.float64), descending=True).values
             for n, c in zip(names, chunks)}
    cost = {n: float(i + 1) for i, n in enumerate(names)}
    total = sum(cost[n] * value[n].numel() for n in names)
    floor = sum(cost[n] * m for n in names)
    allowed = floor + keep_frac * (total - floor)
    got = allocation.greedy(names, cost, value, allowed, multiple_of=m)
    ref = allocation.greedy(names, {n: cost[n] * m for n in names},
                            {n: value[n].view(-1, m).mean(1) for n in names}, allowed)
    assert got == {n: m * ref[n] for n in names}
    assert sum(cost[n] * got[n] for n in names) <= allowed + 1e-9


@EXAMPLES
@given(models(), seeds, st.floats(0.0, 0.6), M, st.sampled_from(allocation.ALLOCATIONS))
def test_every_allocation_keeps_aligned_counts_within_the_budget(model_cfg, seed, budget, m, how):
    module, cfg = model_cfg
    params, groups = module.init(cfg, seed=seed), module.coupled_groups(cfg)
    scores = random_scores(params, groups, seed)
    sizes = validate(params, groups)
    cost = {g.name: sizes[g.name][0] * g.numel_per_unit(params) for g in groups}
    total = sum(cost[n] * sizes[n][1] for n in cost)
    allowed = total * (1 - budget)
    try:
        counts = allocation.counts(how, params, groups, scores, allowed, multiple_of=m)
    except ValueError as err:  # only when the smallest aligned widths alone break the budget
        assert "empty a group" in str(err) or "too few" in str(err)
        assert sum(cost[n] * min(m, sizes[n][1]) for n in cost) > allowed - 1e-6 or how == "protect"
        return
    assert _width_ok(sizes, counts, m), (counts, m)
    if how != "depth":  # depth rounds every group to its ramp's fraction
        assert sum(cost[n] * counts[n] for n in cost) <= allowed + 1e-6
    if m == 1:
        assert counts == allocation.counts(how, params, groups, scores, allowed)


@EXAMPLES
@given(models(), seeds, st.floats(0.0, 0.9), M)
def test_select_and_pruner_keep_aligned_widths(model_cfg, seed, sparsity, m):
    module, cfg = model_cfg
    params, groups = module.init(cfg, seed=seed), module.coupled_groups(cfg)
    scores = random_scores(params, groups, seed)
    sizes = validate(params, groups)
    keep = select(params, groups, scores, sparsity=sparsity, multiple_of=m)
    step = allocation.steps(groups, sizes, m)
    assert _width_ok(sizes, {n: k.shape[1] for n, k in keep.items()}, m)
    for g in groups:
        n, k = sizes[g.name][1], keep[g.name].shape[1]
        assert step[g.name] * sizes[g.name][0] % m == 0  # the per-block step gives whole multiples
        assert k == allocation.aligned(round((1 - sparsity) * n), n, step[g.name])
    pruned = ecospa.pruner(groups, sparsity=sparsity, multiple_of=m)(params, scores)
    assert {n: s[1] for n, s in validate(pruned, groups).items()} == {n: k.shape[1] for n, k in keep.items()}
    # the kept units are the best-scored ones of each block, as without alignment
    for g in groups:
        ranked = torch.argsort(-scores[g.name].reshape(sizes[g.name]).double(), dim=1, stable=True)
        top = torch.sort(ranked[:, :keep[g.name].shape[1]], dim=1).values
        assert torch.equal(keep[g.name], top)


def test_budget_is_met_with_aligned_widths_on_a_real_shape():
    cfg = llama.Config(vocab_size=64, dim=64, n_layers=2, n_heads=4, ffn_dim=172)
    params, groups = llama.init(cfg), llama.coupled_groups(cfg)
    scores = random_scores(params, groups, 0)
    keep = select(params, groups, scores, budget=0.5, multiple_of=8)
    sizes = validate(params, groups)
    assert _width_ok(sizes, {n: k.shape[1] for n, k in keep.items()}, 8)
    assert keep["layers.0.mlp"].shape[1] % 8 == 0  # one block: the width itself (172 unaligned)
    assert ecospa.kept_fraction(params, groups, keep) <= 0.5 + 1e-9


def test_counts_that_break_the_alignment_are_refused():
    cfg = llama.Config(vocab_size=64, dim=64, n_layers=1, n_heads=4, ffn_dim=172)
    params, groups = llama.init(cfg), llama.coupled_groups(cfg)
    scores = random_scores(params, groups, 0)
    with pytest.raises(ValueError, match="break multiple_of=8"):
        select(params, groups, scores, counts={"layers.0.mlp": 90}, multiple_of=8)
    select(params, groups, scores, counts={"layers.0.mlp": 88}, multiple_of=8)  # aligned: fine
    select(params, groups, scores, counts={"layers.0.mlp": 172}, multiple_of=8)  # whole width: fine
    for bad in (0, -8, 2.0, True):
        with pytest.raises(ValueError, match="multiple_of must be a whole number"):
            ecospa.pruner(groups, sparsity=0.5, multiple_of=bad)
        with pytest.raises(ValueError, match="multiple_of must be a whole number"):
            PruneSchedule(sparsity=0.5, multiple_of=bad)
    with pytest.raises(UsageError, match="--multiple-of"):
        Job("smollm2-135m", budget=0.5, multiple_of=0)


@EXAMPLES
@given(seeds, st.sampled_from([2, 4, 8]), st.sampled_from(["sparsity", "budget"]))
def test_rounds_from_a_pruned_tree_stay_aligned(seed, m, by):
    """Cumulative rounds (the training schedule): each round's counts, computed on the tree the
    previous round left, are aligned and never grow."""
    cfg = llama.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=86)
    params, groups = llama.init(cfg, seed=seed), llama.coupled_groups(cfg)
    dense = dense_sizes(params, groups)
    prev = {n: s[1] for n, s in validate(params, groups).items()}
    for target in (0.2, 0.4, 0.6):
        scores = random_scores(params, groups, seed)
        counts = round_target(target, groups, dense, params, by=by, scores=scores, multiple_of=m)["counts"]
        now = {n: s[1] for n, s in validate(params, groups).items()}
        sizes = validate(params, groups)
        assert all(counts[n] <= prev[n] for n in counts) and _width_ok(
            {n: (sizes[n][0], now[n]) for n in now}, counts, m), (counts, now)
        params = ecospa.slice_units(params, groups, select(params, groups, scores, counts=counts, multiple_of=m))
        prev = counts


def test_train_cli_passes_multiple_of_to_the_schedule():
    from ecospa.cli.train import add_arguments, config_from_args
    import argparse
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--multiple-of", "8"]))
    assert cfg.prune.multiple_of == 8
    assert dataclasses.replace(cfg.prune, multiple_of=1) != cfg.prune
    with pytest.raises(SystemExit):
        p.parse_args(["--multiple-of", "0"])
