"""Padded layout: pad(pruned) has the family's dense shapes and computes the same logits;
compact(pad(x)) == x; compact of a masked dense tree == the sliced tree."""
from __future__ import annotations

from typing import Any, NamedTuple

import optree
import pytest
import torch
from hypothesis import given, settings

import ecospa
from ecospa.func import llama
from ecospa.func.padding import compact, pad
from strategies import models, random_scores, seeds, targets, tokens
from tolerances import EXACT, close


class Case(NamedTuple):
    """One drawn case: the family, its config, the dense tree, its groups, the selection, the
    sliced tree and a token batch."""
    module: Any
    cfg: Any
    dense: Any
    groups: list
    keep: dict
    small: Any
    x: torch.Tensor


def _case(model, seed, target) -> Case:
    """The shared setup of the property tests: a dense float64 tree pruned to ``target``
    (a budget that would empty a group keeps everything instead)."""
    module, cfg = model
    params = module.init(cfg, seed=seed, dtype=torch.float64)
    groups = module.coupled_groups(cfg)
    scores = random_scores(params, groups, seed)
    try:
        keep = ecospa.select(params, groups, scores, **target)
    except ValueError:
        keep = ecospa.select(params, groups, scores, sparsity=0.0)
    return Case(module, cfg, params, groups, keep, ecospa.slice_units(params, groups, keep),
                tokens(cfg, seed))


def _shapes(tree) -> list:
    return [x.shape for x in optree.tree_leaves(tree, namespace="")]


@settings(max_examples=30, deadline=None)
@given(models(), seeds, targets)
def test_padded_is_dense_shaped_and_exact(model, seed, target):
    c = _case(model, seed, target)
    before = optree.tree_map(torch.clone, c.small, namespace="")
    padded, pcfg = pad(c.small, c.cfg)
    ref = c.module.init(pcfg, dtype=torch.float64)
    assert optree.tree_structure(padded, namespace="") == optree.tree_structure(ref, namespace="")
    assert _shapes(padded) == _shapes(ref)
    close(c.module.forward(padded, c.x, pcfg), c.module.forward(c.small, c.x, c.cfg), EXACT)
    back = compact(padded, pcfg)
    assert optree.tree_structure(back, namespace="") == optree.tree_structure(c.small, namespace="")
    for a, b in zip(optree.tree_leaves(back, namespace=""), optree.tree_leaves(c.small, namespace="")):
        assert a.shape == b.shape and torch.equal(a, b)
    for a, b in zip(optree.tree_leaves(c.small, namespace=""), optree.tree_leaves(before, namespace="")):
        assert torch.equal(a, b)


@settings(max_examples=20, deadline=None)
@given(models(), seeds, targets)
def test_compact_of_masked_equals_sliced(model, seed, target):
    c = _case(model, seed, target)
    back = compact(ecospa.mask(c.dense, c.groups, c.keep), c.cfg)
    close(c.module.forward(back, c.x, c.cfg), c.module.forward(c.small, c.x, c.cfg), EXACT)
    assert _shapes(back) == _shapes(c.small)


def test_foreign_frequencies_are_rejected():
    cfg = llama.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2, head_dim=4, ffn_dim=5)
    params = llama.init(cfg)
    other = llama.Config(**{**cfg.__dict__, "rope_theta": 500.0})
    with pytest.raises(ValueError, match="not in the model's RoPE table"):
        pad(params, other)
