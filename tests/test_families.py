"""The family protocol: every registered family, through the drivers that never name one.

For each family in ``FAMILIES`` (a new family is covered by registering it and its config
strategy in ``strategies.FAMILY_CONFIGS``): the full forward, the cached decoder (prefill then
one token at a time) and the sublayer composition compute the same logits, dense and pruned;
pruned == masked (PAPER §6); ``pad`` keeps the logits and ``compact`` undoes it; the FLOP
counter and the cache read the family's ``kv_dims``.
"""
from __future__ import annotations

import ast
import pathlib

import optree
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ecospa
from ecospa.func import decode as dec
from ecospa.func.families import FAMILIES, Family, family, family_of
from ecospa.func.padding import compact, pad
from strategies import FAMILY_CONFIGS, FAMILY_INPUTS, random_scores, seeds, tokens
from tolerances import close

NAMES = sorted(FAMILIES)


def test_every_family_has_a_config_strategy_and_a_complete_record():
    assert set(FAMILY_CONFIGS) == set(FAMILIES) == set(FAMILY_INPUTS)
    for name, fam in FAMILIES.items():
        assert isinstance(fam, Family) and fam.name == name
        assert [s.name for s in fam.sublayers] == ["attn", "mlp"]
        assert family(name) is fam and family_of(fam.Config()) is fam


def test_an_unknown_family_is_an_error_not_a_fallback():
    class Other:  # a config of no registered family
        name = "llama"
    with pytest.raises(ValueError, match="unknown model config type Other"):
        family_of(Other())
    with pytest.raises(ValueError, match="unknown model family 'vit2'"):
        family("vit2")
    cfg = FAMILY_CONFIGS["llama"][0].Config()
    with pytest.raises(ValueError, match="unknown model config type"):
        dec.init_cache({"layers": ()}, Other(), 1, 4)
    del cfg


def _pruned(fam, params, cfg, seed):
    groups = fam.coupled_groups(cfg)
    try:
        keep = ecospa.select(params, groups, random_scores(params, groups, seed), sparsity=0.5)
    except ValueError:
        assume(False)
    return ecospa.slice_units(params, groups, keep), ecospa.mask(params, groups, keep)


def _by_sublayers(fam, params, toks, cfg):
    x = fam.embed(params, toks, None, cfg)
    for p in params["layers"]:
        for s in fam.sublayers:
            x = x + s.apply(p, s.inner(p, x, cfg))
    return fam.head(params, x, cfg)


def _decoded(fam, params, toks, cfg, prefill: int):
    cache = dec.init_cache(params, cfg, toks.shape[0], toks.shape[1])
    out, cache = dec.decode(params, cache, toks[:, :prefill], 0, cfg)
    outs = [out]
    for t in range(prefill, toks.shape[1]):
        out, cache = dec.decode(params, cache, toks[:, t:t + 1], torch.tensor(t), cfg)
        outs.append(out)
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), seed=seeds)
def test_forward_decode_and_sublayers_agree_dense_and_pruned(name, data, seed):
    fam = FAMILIES[name]
    cfg = data.draw(FAMILY_CONFIGS[name][1]())
    prefill = data.draw(st.integers(1, 5))
    params = fam.init(cfg, seed=seed, dtype=torch.float64)
    toks = tokens(cfg, seed, batch=2, length=6)
    small, masked = _pruned(fam, params, cfg, seed)
    for tree in (params, small):
        full = fam.forward(tree, toks, cfg)
        close(_by_sublayers(fam, tree, toks, cfg), full)
        if fam.decoder:  # an encoder has no causal decoding (init_cache refuses it)
            close(_decoded(fam, tree, toks, cfg, prefill), full)
    close(fam.forward(small, toks, cfg), fam.forward(masked, toks, cfg))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=15, deadline=None)
@given(data=st.data(), seed=seeds)
def test_pad_keeps_the_logits_and_compact_undoes_it(name, data, seed):
    fam = FAMILIES[name]
    cfg = data.draw(FAMILY_CONFIGS[name][1]())
    params = fam.init(cfg, seed=seed, dtype=torch.float64)
    small, _ = _pruned(fam, params, cfg, seed)
    toks = tokens(cfg, seed, batch=1, length=6)
    padded, pcfg = pad(small, cfg)
    assert optree.tree_map(lambda x: x.shape, padded) == optree.tree_map(lambda x: x.shape, params)
    close(fam.forward(padded, toks, pcfg), fam.forward(small, toks, cfg))
    back = compact(padded, pcfg)
    close(fam.forward(back, toks, cfg), fam.forward(small, toks, cfg))
    # compact never keeps more than the pruned tree had (it may keep a dead unit of a head
    # whose siblings kept more: heads share one width)
    for b, s in zip(back["layers"], small["layers"]):
        for k in s:
            assert all(x <= y for x, y in zip(b[k].shape, params["layers"][0][k].shape))


@pytest.mark.parametrize("name", NAMES)
def test_kv_dims_size_the_cache_and_the_flop_counter(name):
    from ecospa.train.flops import forward_flops
    fam = FAMILIES[name]
    cfg = fam.Config(dim=8, n_layers=2, n_heads=2)
    params = fam.init(cfg, seed=1)
    small, _ = _pruned(fam, params, cfg, 3)
    if fam.decoder:
        cache = dec.init_cache(small, cfg, batch=3, max_len=7)
        for p, c in zip(small["layers"], cache["layers"]):
            h, g, dk, dv = fam.kv_dims(p)
            assert c["k"].shape == (3, h, 7, dk) and c["v"].shape == (3, h, 7, dv)
    else:
        with pytest.raises(ValueError, match="encoder .* no key/value cache"):
            dec.init_cache(small, cfg, batch=3, max_len=7)
    # the attention FLOPs follow the kept dims: with T large they dominate, so shrinking q/k
    # lowers the count by exactly 2 * B * T^2 * heads * (removed dims) per layer
    T = 64
    dense, pruned = (forward_flops(t, name, 1, T) for t in (params, small))
    mat = sum(p[k].numel() for p in small["layers"] for k in fam.matmuls)
    head = small[fam.embed_leaf].numel() if "lm_head" not in small else small["lm_head"].numel()
    att = sum(2 * T * T * fam.kv_dims(p)[0] * fam.kv_dims(p)[1] * sum(fam.kv_dims(p)[2:])
              for p in small["layers"])
    assert pruned == 2 * T * (mat + head) + att < dense


DRIVERS = ["func/decode.py", "func/padding.py", "func/reconstruct.py", "func/_block.py", "train/flops.py"]


@pytest.mark.parametrize("path", DRIVERS)
def test_drivers_never_name_a_family(path):
    """No family name as a string constant in a driver: dispatch goes through ``Family``."""
    src = (pathlib.Path(ecospa.__file__).parent / path).read_text()
    names = {n.value for n in ast.walk(ast.parse(src))
             if isinstance(n, ast.Constant) and isinstance(n.value, str)}
    assert not names & set(FAMILIES), f"{path} names {sorted(names & set(FAMILIES))}"
