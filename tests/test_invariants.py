"""Property tests of every invariant in PAPER.md §6, for both model families."""
from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import ecospa
from ecospa._tree import get_path
from ecospa.func import gpt2, llama
from ecospa.func._layers import rms_norm, rope_tables, rotate_pairs
from strategies import llama_configs, models, random_scores, seeds, targets, tokens
from tolerances import close


def build(model, cfg, seed):
    params = model.init(cfg, seed=seed, dtype=torch.float64)
    return params, model.coupled_groups(cfg)


def choose(params, groups, scores, target):
    """select(), discarding only budgets that provably cannot be met without emptying a group."""
    try:
        return ecospa.select(params, groups, scores, **target)
    except ValueError as err:
        assert "budget" in target and "empty a group" in str(err), err
        assume(False)


def snapshot(tree):
    return optree.tree_map(lambda x: x.clone(), tree)


def assert_same_tree(a, b):
    assert optree.tree_structure(a) == optree.tree_structure(b)
    for x, y in zip(optree.tree_leaves(a), optree.tree_leaves(b)):
        assert x.dtype == y.dtype and torch.equal(x, y)


@given(models(), seeds, targets)
def test_sliced_equals_masked(model_cfg, seed, target):
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    keep = choose(params, groups, random_scores(params, groups, seed), target)
    x = tokens(cfg, seed)
    small = ecospa.slice_units(params, groups, keep)
    masked = ecospa.mask(params, groups, keep)
    close(model.forward(small, x, cfg), model.forward(masked, x, cfg))


@given(models(), seeds, targets)
def test_structure_shapes_and_input_untouched(model_cfg, seed, target):
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    before = snapshot(params)
    keep = choose(params, groups, random_scores(params, groups, seed), target)
    small = ecospa.slice_units(params, groups, keep)
    ecospa.mask(params, groups, keep)
    assert_same_tree(params, before)  # the input is never modified
    assert optree.tree_structure(small) == optree.tree_structure(params)
    members = {m.path: (g, m) for g in groups for m in g.members}
    for path, leaf in zip(*optree.tree_flatten_with_path(small)[:2]):
        full = get_path(params, tuple(path))
        if tuple(path) not in members:
            assert leaf is full  # untouched leaves are shared, not copied
            continue
        g, m = members[tuple(path)]
        expect = list(full.shape)
        expect[m.unit_axis] = keep[g.name].shape[1]
        assert list(leaf.shape) == expect


@given(models(), seeds)
def test_keep_all_is_identity(model_cfg, seed):
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    keep = ecospa.keep_all(params, groups)
    assert_same_tree(ecospa.slice_units(params, groups, keep), params)
    assert_same_tree(ecospa.mask(params, groups, keep), params)
    assert_same_tree(ecospa.pruner(groups, sparsity=0.0)(params, random_scores(params, groups, seed)), params)


@given(models(), seeds, targets, targets)
def test_prune_twice_equals_composed(model_cfg, seed, first, second):
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    k1 = choose(params, groups, random_scores(params, groups, seed), first)
    mid = ecospa.slice_units(params, groups, k1)
    k2 = choose(mid, groups, random_scores(mid, groups, seed + 1), second)
    twice = ecospa.slice_units(mid, groups, k2)
    assert_same_tree(twice, ecospa.slice_units(params, groups, ecospa.compose(k1, k2)))


@given(models(), seeds, targets)
def test_same_call_slices_any_tree_shaped_like_params(model_cfg, seed, target):
    """Optimizer moments are sliced by the same transform with the same selection."""
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    scores = random_scores(params, groups, seed)
    moments = optree.tree_map(lambda x: 3.0 * x + 1.0, params)
    try:
        prune = ecospa.pruner(groups, **target)
        small, small_m = prune(params, scores), prune(moments, scores)
    except ValueError as err:
        assert "empty a group" in str(err)
        assume(False)
    expected = optree.tree_map(lambda x: 3.0 * x + 1.0, small)
    for a, b in zip(optree.tree_leaves(small_m), optree.tree_leaves(expected)):
        close(a, b)


def _products(p, h, g, is_llama):
    """Per (KV head h, query head g): W_Q W_K^T [D, D] and W_V W_O [D, D]."""
    if is_llama:
        wq = p["wq"][:, h, g].flatten(1)  # [D, 2P]
        wk = p["wk"][:, h].flatten(1)  # [D, 2P]
        return wq @ wk.T, p["wv"][:, h] @ p["wo"][h, g]
    return p["wq"][:, h] @ p["wk"][:, h].T, p["wv"][:, h] @ p["wo"][h]


@given(models(), seeds, targets)
def test_coupled_products_preserved_on_kept_units(model_cfg, seed, target):
    """W_Q W_K^T and W_V W_O of the small model equal those of the dense one restricted to kept units."""
    model, cfg = model_cfg
    params, groups = build(model, cfg, seed)
    keep = choose(params, groups, random_scores(params, groups, seed), target)
    small = ecospa.slice_units(params, groups, keep)
    masked = ecospa.mask(params, groups, keep)
    is_llama = model is llama
    n_kv = cfg.n_kv_heads if is_llama else cfg.n_heads
    for ps, pm in zip(small["layers"], masked["layers"]):
        for h in range(n_kv):
            for g in range(cfg.n_heads // n_kv):
                for a, b in zip(_products(ps, h, g, is_llama), _products(pm, h, g, is_llama)):
                    close(a, b)


@given(llama_configs(), seeds, targets)
def test_mlp_hidden_and_rope_scores_preserved(cfg, seed, target):
    """Kept MLP neurons' activations, and the RoPE score with kept pairs at their ORIGINAL frequencies."""
    params, groups = build(llama, cfg, seed)
    keep = choose(params, groups, random_scores(params, groups, seed), target)
    small = ecospa.slice_units(params, groups, keep)
    x = rms_norm(torch.randn(2, 6, cfg.dim, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(seed)), params["norm"], 1e-5)
    for i, (pf, ps) in enumerate(zip(params["layers"], small["layers"])):
        act = lambda p: torch.nn.functional.silu(x @ p["w_gate"]) * (x @ p["w_up"])  # noqa: E731
        close(act(ps), act(pf)[..., keep[f"layers.{i}.mlp"][0]])
        kq = keep[f"layers.{i}.qk"]  # [Hkv, k]

        def score(p, idx):  # sum over kept pairs of q_s^T R(t - s) k_t, head by head
            q = torch.einsum("btd,dhgrp->bhgtrp", x, p["wq"])
            k = torch.einsum("btd,dhrp->bhtrp", x, p["wk"])
            if "bq" in p:
                q, k = q + p["bq"][:, :, None], k + p["bk"][:, None]
            cos, sin = rope_tables(p["inv_freq"], x.shape[1], x.dtype)
            q, k = rotate_pairs(q, cos[:, None], sin[:, None]), rotate_pairs(k, cos, sin)
            if idx is not None:  # the slow path: select the kept pairs from the dense rotation
                q = torch.stack([q[:, h, ..., idx[h]] for h in range(idx.shape[0])], 1)
                k = torch.stack([k[:, h, ..., idx[h]] for h in range(idx.shape[0])], 1)
            return torch.einsum("bhgsrp,bhtrp->bhgst", q, k)
        close(score(ps, None), score(pf, kq))


@pytest.mark.parametrize("model,cfg", [
    (llama, llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=6)),
    (gpt2, gpt2.Config(vocab_size=13, dim=8, n_layers=2, n_heads=2, ffn_dim=6, max_seq_len=8)),
])
def test_golden_selection(model, cfg):
    """A tiny hand-checked case: scores rank units; ties go to the lower index; blocks keep equal counts."""
    params = model.init(cfg, seed=0)
    groups = model.coupled_groups(cfg)
    scores = {g.name: torch.tensor([[0.0, 5.0, 1.0, 5.0, 2.0, 9.0]])[:, : g.sizes(params)[1]]
              .expand(*g.sizes(params)) for g in groups}
    keep = ecospa.select(params, groups, scores, sparsity=0.5)
    assert keep["layers.0.mlp"].tolist() == [[1, 3, 5]]
    # qk units: llama has 2 rotary pairs per KV head (scores 0, 5), gpt2 4 dims (0, 5, 1, 5).
    expected_qk = [[1]] * 2 if model is llama else [[1, 3]] * 2
    assert keep["layers.1.qk"].tolist() == expected_qk
