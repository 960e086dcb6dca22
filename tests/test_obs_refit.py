"""``obs_refit``: the obs scores, the choice of units, slicing and the refit in one pass over the
layers (issue 28's "one dense pass shared by the obs scores and the refit"), against the three
separate calls it replaces."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecospa.func._block import Sublayer
from ecospa.func.reconstruct import obs_refit, obs_scores, reconstruct
from ecospa.prune import slice_units
from ecospa.select import keep_top, select

from strategies import models, random_scores, seeds, tokens
from tolerances import close

SETTINGS = dict(max_examples=20, deadline=None)


def _setup(model, cfg, seed, sparsity=0.5):
    dense = model.init(cfg, seed, dtype=torch.float64)
    groups = model.coupled_groups(cfg)
    keep = select(dense, groups, random_scores(dense, groups, seed), sparsity=sparsity)
    calib = [tokens(cfg, seed + i, batch=2, length=6) for i in range(3)]
    return dense, groups, keep, calib


def _separate(source, dense, cfg, groups, calib, keep, *, ridge, obs_ridge, target="residual", bias=True):
    """The three calls ``obs_refit`` fuses, written out."""
    obs = obs_scores(source, cfg, groups, calib, ridge=obs_ridge)
    keep = {**keep, **{n: keep_top(s, keep[n].shape[1]) for n, s in obs.items()}}
    pruned = slice_units(source, groups, keep)
    return reconstruct(pruned, dense, cfg, calib, ridge=ridge, target=target, bias=bias), pruned, keep, obs


def _same_tree(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k == "layers":
            for pa, pb in zip(a[k], b[k], strict=True):
                assert pa.keys() == pb.keys()
                for leaf in pa:
                    close(pa[leaf], pb[leaf])
        else:
            close(a[k], b[k])


@settings(**SETTINGS)
@given(models(), seeds, st.sampled_from(["residual", "local"]), st.booleans(), st.booleans())
def test_one_pass_equals_the_obs_scores_slicing_and_refit_done_apart(model_cfg, seed, target, bias, keep_pruned):
    """Every family, both refit targets, with and without the output bias: the same kept units,
    scores, pruned model and refit model. The two ridges differ (0.3 and 0.02), so a fused pass
    that swapped them, or gave the obs scores the refit's, fails."""
    model, cfg = model_cfg
    dense, groups, keep, calib = _setup(model, cfg, seed)
    want, want_pruned, want_keep, want_obs = _separate(dense, dense, cfg, groups, calib, keep, ridge=0.3,
                                                       obs_ridge=0.02, target=target, bias=bias)
    before = copy.deepcopy(dense)
    got = obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.3, obs_ridge=0.02, target=target, bias=bias,
                    keep_pruned=keep_pruned)
    assert got.keep.keys() == want_keep.keys()
    assert all(torch.equal(got.keep[n], want_keep[n]) for n in want_keep)
    assert got.obs.keys() == want_obs.keys() == {g.name for g in groups if g.kind != "qk"}
    for n in want_obs:
        close(got.obs[n], want_obs[n])
    _same_tree(got.params, want)
    if keep_pruned:
        _same_tree(got.pruned, want_pruned)
    else:
        assert got.pruned is None
    _same_tree(dense, before)  # the input is untouched, donated or not


def test_the_obs_ridge_defaults_to_the_refit_ridge_and_a_wrong_ridge_shows():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12, max_seq_len=8)
    dense, groups, keep, calib = _setup(llama, cfg, 3)
    default = obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.3)
    same = obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.3, obs_ridge=0.3)
    other = obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.3, obs_ridge=1e-4)
    assert all(torch.equal(default.obs[n], same.obs[n]) for n in same.obs)
    assert any(not torch.allclose(other.obs[n], same.obs[n]) for n in same.obs)


def test_a_later_round_prunes_the_pruned_model_and_refits_to_the_dense_one():
    """Round 2 of a job: the obs scores read the already pruned model's stream, the refit's target
    is still the dense model's, so the three streams are all different."""
    from ecospa.func import gpt2
    cfg = gpt2.Config(vocab_size=17, dim=8, n_layers=2, n_heads=2, ffn_dim=10, max_seq_len=8)
    dense, groups, keep, calib = _setup(gpt2, cfg, 5, sparsity=0.25)
    first = reconstruct(slice_units(dense, groups, keep), dense, cfg, calib, ridge=0.1)
    keep2 = select(first, groups, random_scores(first, groups, 9), sparsity=0.4)
    want, want_pruned, want_keep, _ = _separate(first, dense, cfg, groups, calib, keep2, ridge=0.1, obs_ridge=0.05)
    before = copy.deepcopy(first)
    got = obs_refit(first, dense, cfg, groups, calib, keep2, ridge=0.1, obs_ridge=0.05, keep_pruned=True)
    assert all(torch.equal(got.keep[n], want_keep[n]) for n in want_keep)
    _same_tree(got.params, want)
    _same_tree(got.pruned, want_pruned)
    _same_tree(first, before)


def test_the_dense_model_runs_once_per_sublayer_and_batch_when_it_is_the_source(monkeypatch):
    """The point of the fusion: obs_scores + reconstruct run every dense sublayer twice per batch,
    the fused pass once."""
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=13, dim=8, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=12, max_seq_len=8)
    dense, groups, keep, calib = _setup(llama, cfg, 1)
    dense_layers = {id(p) for p in dense["layers"]}
    calls = {"dense": 0}
    real = Sublayer.inner

    def inner(self, p, x, cfg_):
        calls["dense"] += id(p) in dense_layers
        return real(self, p, x, cfg_)

    monkeypatch.setattr(Sublayer, "inner", inner)
    obs_refit(dense, dense, cfg, groups, calib, keep, ridge=0.1)
    fused = calls["dense"]
    calls["dense"] = 0
    _separate(dense, dense, cfg, groups, calib, keep, ridge=0.1, obs_ridge=0.1)
    n = cfg.n_layers * 2 * len(calib)
    assert (fused, calls["dense"]) == (n, 2 * n)


def test_progress_per_layer_and_bad_arguments():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=12, max_seq_len=8)
    dense, groups, keep, calib = _setup(llama, cfg, 2)
    calls = []
    obs_refit(dense, dense, cfg, groups, calib, keep, on_layer=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="obs_ridge must be a number > 0.*got 0"):
        obs_refit(dense, dense, cfg, groups, calib, keep, obs_ridge=0)
    with pytest.raises(ValueError, match="ridge must be a number > 0.*got -1"):
        obs_refit(dense, dense, cfg, groups, calib, keep, ridge=-1)
    with pytest.raises(ValueError, match="target must be one of"):
        obs_refit(dense, dense, cfg, groups, calib, keep, target="global")
    missing = {n: k for n, k in keep.items() if n != "layers.1.mlp"}
    with pytest.raises(ValueError, match="group 'layers.1.mlp': no kept indices given"):
        obs_refit(dense, dense, cfg, groups, calib, missing)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        obs_refit(dense, dense, cfg, groups, [], keep)


def test_an_output_projection_no_group_slices_is_refit_into_a_new_tensor():
    """Without the mlp groups, ``w_out`` is the source's own tensor when it is refit: a later
    round's source (not the dense model) must not be written through it."""
    from ecospa.func import gpt2
    cfg = gpt2.Config(vocab_size=17, dim=8, n_layers=2, n_heads=2, ffn_dim=10, max_seq_len=8)
    dense, groups, keep, calib = _setup(gpt2, cfg, 6, sparsity=0.25)
    source = reconstruct(slice_units(dense, groups, keep), dense, cfg, calib, ridge=0.1)
    attn = [g for g in groups if g.kind != "mlp"]
    keep2 = select(source, attn, random_scores(source, attn, 2), sparsity=0.3)
    before = copy.deepcopy(source)
    got = obs_refit(source, dense, cfg, attn, calib, keep2, ridge=0.1)
    want, *_ = _separate(source, dense, cfg, attn, calib, keep2, ridge=0.1, obs_ridge=0.1)
    _same_tree(got.params, want)
    _same_tree(source, before)
    assert not torch.equal(got.params["layers"][0]["w_out"], source["layers"][0]["w_out"])  # it was refit


@pytest.mark.parametrize("second_round", [False, True])
def test_released_layers_are_freed_as_the_pass_goes_and_the_result_is_the_same(second_round):
    """``release=True``: the handed-over trees' layer lists are emptied as the pass goes; dense
    layer i is garbage by the time layer i + 1 is done (weak references), and the results (the
    refit model, the model before the refit, the kept units) equal the pass that keeps its inputs."""
    import gc
    import weakref
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=13, dim=8, n_layers=3, n_heads=2, n_kv_heads=1, ffn_dim=12, max_seq_len=8)
    dense, groups, keep, calib = _setup(llama, cfg, 4)
    source = dense
    if second_round:  # a pruned source and the dense target: both handed over, both emptied
        source = reconstruct(slice_units(dense, groups, keep), dense, cfg, calib, ridge=0.1)
        keep = select(source, groups, random_scores(source, groups, 8), sparsity=0.3)
    want = obs_refit(source, dense, cfg, groups, calib, keep, ridge=0.1, obs_ridge=0.03, keep_pruned=True)
    handed_dense = {**copy.deepcopy(dense), "layers": list(copy.deepcopy(dense["layers"]))}
    handed = handed_dense if not second_round else {**source, "layers": list(copy.deepcopy(source["layers"]))}
    refs = [weakref.ref(p["w_up"]) for p in handed_dense["layers"]]
    alive = []

    def on_layer(i, n):
        gc.collect()
        alive.append([r() is not None for r in refs])

    got = obs_refit(handed, handed_dense, cfg, groups, calib, keep, ridge=0.1, obs_ridge=0.03, keep_pruned=True,
                    release=True, on_layer=on_layer)
    assert handed["layers"] == [None] * 3 and handed_dense["layers"] == [None] * 3
    # when layer i is done, dense layers <= i are gone
    assert alive == [[False, True, True], [False, False, True], [False, False, False]]
    assert all(torch.equal(got.keep[n], want.keep[n]) for n in want.keep)
    _same_tree(got.params, want.params)
    _same_tree(got.pruned, want.pruned)
    with pytest.raises(ValueError, match=r"hand them over as lists, e.g. \{\*\*tree, 'layers': list\(tree\['layers'\]\)\}"):
        obs_refit(dense, dense, cfg, groups, calib, keep, release=True)


@pytest.mark.parametrize("steps, distill, rounds, released", [(0, True, 1, [True]), (2, True, 1, [False]),
                                                              (2, False, 1, [True]), (2, False, 2, [False, True])])
def test_the_job_hands_the_dense_model_over_only_when_nothing_reads_it_after(monkeypatch, steps, distill, rounds,
                                                                             released):
    """``ecospa compress`` releases the dense layers in the pass only in the last round and without
    a distillation teacher for recovery; a model the caller passed (``loaded=``) is untouched."""
    import ecospa.jobs.compress as job_mod
    from ecospa.func import llama
    from ecospa.io.data import ByteTokenizer
    from ecospa.jobs.compress import Job, compress
    seen, real = [], job_mod.obs_refit
    monkeypatch.setattr(job_mod, "obs_refit", lambda *a, **k: (seen.append(k["release"]), real(*a, **k))[1])
    cfg = llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=32)
    dense = llama.init(cfg, seed=0)
    before = copy.deepcopy(dense)
    s = compress(Job("tiny", budget=0.4, steps=steps, distill=distill, rounds=rounds, batch_size=2, seq_len=16,
                     calib_batches=1, recon_batches=2, eval_seq_len=16, eval_windows=2, eval_extra=(), progress=False),
                 loaded=(cfg, dense, ByteTokenizer()))
    assert seen == released
    assert isinstance(dense["layers"], tuple) and len(dense["layers"]) == 2
    _same_tree(dense, before)
    assert math.isfinite(s["ppl_reconstructed"]) and s["ppl_reconstructed"] != s["ppl_pruned"]  # refit ran
