"""Padded layout: pad(pruned) has the family's dense shapes and computes the same logits;
compact(pad(x)) == x; compact of a masked dense tree == the sliced tree."""
from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import given, settings

import ecospa
from ecospa.func import gpt2, llama
from ecospa.func.padding import compact, pad
from strategies import models, random_scores, seeds, targets, tokens
from tolerances import EXACT, close


def _pruned(module, cfg, seed, target):
    params = module.init(cfg, seed=seed, dtype=torch.float64)
    groups = module.coupled_groups(cfg)
    scores = random_scores(params, groups, seed)
    try:
        keep = ecospa.select(params, groups, scores, **target)
    except ValueError:
        keep = ecospa.select(params, groups, scores, sparsity=0.0)
    return params, groups, keep


@settings(max_examples=30, deadline=None)
@given(models(), seeds, targets)
def test_padded_is_dense_shaped_and_exact(model, seed, target):
    module, cfg = model
    dense, groups, keep = _pruned(module, cfg, seed, target)
    small = ecospa.slice_units(dense, groups, keep)
    before = optree.tree_map(torch.clone, small, namespace="")
    padded, pcfg = pad(small, cfg)
    ref = module.init(pcfg, dtype=torch.float64)
    assert optree.tree_map(lambda x: x.shape, padded, namespace="") == \
        optree.tree_map(lambda x: x.shape, ref, namespace="")
    x = tokens(cfg, seed)
    close(module.forward(padded, x, pcfg), module.forward(small, x, cfg), EXACT)
    back = compact(padded, pcfg)
    assert optree.tree_structure(back, namespace="") == optree.tree_structure(small, namespace="")
    for a, b in zip(optree.tree_leaves(back, namespace=""), optree.tree_leaves(small, namespace="")):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(optree.tree_leaves(small, namespace=""), optree.tree_leaves(before, namespace="")):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(models(), seeds, targets)
def test_compact_of_masked_equals_sliced(model, seed, target):
    module, cfg = model
    dense, groups, keep = _pruned(module, cfg, seed, target)
    small = ecospa.slice_units(dense, groups, keep)
    back = compact(ecospa.mask(dense, groups, keep), cfg)
    x = tokens(cfg, seed)
    close(module.forward(back, x, cfg), module.forward(small, x, cfg), EXACT)
    assert [x.shape for x in optree.tree_leaves(back, namespace="")] == \
        [x.shape for x in optree.tree_leaves(small, namespace="")]


def test_foreign_frequencies_are_rejected():
    cfg = llama.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2, head_dim=4, ffn_dim=5)
    params = llama.init(cfg)
    other = llama.Config(**{**cfg.__dict__, "rope_theta": 500.0})
    with pytest.raises(ValueError, match="not in the model's RoPE table"):
        pad(params, other)
