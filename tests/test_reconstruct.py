"""Layer-wise reconstruction (ecospa.func.reconstruct) and the sublayer view it runs on."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecospa.func._layers import rms_norm
from ecospa.func.families import family_of
from ecospa.func.reconstruct import reconstruct, ridge_solve
from ecospa.func.families import family_of
from ecospa.groups import validate
from ecospa.prune import mask, slice_units
from ecospa.select import select

from strategies import models, random_scores, seeds, tokens
from tolerances import EXACT, close

SETTINGS = dict(max_examples=25, deadline=None)


def _build(model, cfg, seed):
    params = model.init(cfg, seed, dtype=torch.float64)
    return params, model.coupled_groups(cfg)


def _pruned(params, groups, seed, sparsity=0.5):
    keep = select(params, groups, random_scores(params, groups, seed), sparsity=sparsity)
    return slice_units(params, groups, keep), keep


def _calib(cfg, seed, n=3):
    return [tokens(cfg, seed + i, batch=2, length=6) for i in range(n)]


def _run_sublayers(params, toks, cfg):
    name = family_of(cfg).name
    x = family_of(cfg).embed(params, toks, None, cfg)
    for p in params["layers"]:
        for s in family_of(cfg).sublayers:
            x = x + s.apply(p, s.inner(p, x, cfg))
    return x


@settings(**SETTINGS)
@given(models(), seeds)
def test_sublayers_in_order_are_the_forward(model_cfg, seed):
    model, cfg = model_cfg
    params, _ = _build(model, cfg, seed)
    toks = tokens(cfg, seed)
    x = _run_sublayers(params, toks, cfg)
    if family_of(cfg).name == "llama":
        final = rms_norm(x, params["norm"], cfg.norm_eps)
    else:
        final = torch.nn.functional.layer_norm(x, (x.shape[-1],), params["ln_f_w"], params["ln_f_b"],
                                               cfg.norm_eps)
    close(final, model.hidden(params, toks, cfg))


@settings(**SETTINGS)
@given(models(), seeds)
def test_keep_all_returns_the_dense_weights(model_cfg, seed):
    model, cfg = model_cfg
    params, _ = _build(model, cfg, seed)
    out = reconstruct(params, params, cfg, _calib(cfg, seed), ridge=1e-3)
    for i, (a, b) in enumerate(zip(out["layers"], params["layers"])):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-7, atol=1e-7)  # a solve, not a copy


def test_ridge_solve_is_the_least_squares_solution():
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(200, 7, generator=gen, dtype=torch.float64)
    w_true = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    y = h @ w_true + 0.1 * torch.randn(200, 3, generator=gen, dtype=torch.float64)
    lstsq = torch.linalg.lstsq(h, y).solution
    w0 = torch.randn(7, 3, generator=gen, dtype=torch.float64)
    close(ridge_solve(h.T @ h, h.T @ y, w0, 1e-13), lstsq)
    # a real ridge: the normal equations of ||HW - Y||^2 + lam ||W - W0||^2 hold
    g = h.T @ h
    lam = 0.5 * float(g.diagonal().mean())
    w = ridge_solve(g, h.T @ y, w0, 0.5)
    close((g + lam * torch.eye(7, dtype=torch.float64)) @ w, h.T @ y + lam * w0)


@settings(**SETTINGS)
@given(models(), seeds, st.sampled_from(["residual", "local"]), st.booleans())
def test_refit_never_increases_a_sublayers_calibration_error(model_cfg, seed, target, bias):
    model, cfg = model_cfg
    dense, groups = _build(model, cfg, seed)
    pruned, _ = _pruned(dense, groups, seed)
    calib = _calib(cfg, seed)
    out = reconstruct(pruned, dense, cfg, calib, target=target, bias=bias)
    name = family_of(cfg).name
    xp = [family_of(cfg).embed(out, b, None, cfg) for b in calib]
    xd = [family_of(cfg).embed(dense, b, None, cfg) for b in calib]
    for p_old, p_new, d in zip(pruned["layers"], out["layers"], dense["layers"]):
        for s in family_of(cfg).sublayers:
            err_old = err_new = 0.0
            for j in range(len(calib)):
                h = s.inner(p_new, xp[j], cfg)  # same inputs for both: the refit model's stream
                yd = xd[j] + s.apply(d, s.inner(d, xd[j], cfg))
                y = yd - xp[j] if target == "residual" else s.apply(d, s.inner(d, xp[j], cfg))
                old = dict(p_new, **{s.out: p_old[s.out]}, **({s.bias: p_old[s.bias]} if s.bias else {}))
                err_old += float((s.apply(old, h) - y).pow(2).sum())
                err_new += float((s.apply(p_new, h) - y).pow(2).sum())
                xd[j] = yd
            assert err_new <= err_old * (1 + 1e-9) + 1e-12
            xp = [x + s.apply(p_new, s.inner(p_new, x, cfg)) for x in xp]


@settings(**SETTINGS)
@given(models(), seeds)
def test_inputs_untouched_and_the_result_is_a_valid_pruned_tree(model_cfg, seed):
    model, cfg = model_cfg
    dense, groups = _build(model, cfg, seed)
    pruned, _ = _pruned(dense, groups, seed)
    before = (copy.deepcopy(dense), copy.deepcopy(pruned))
    out = reconstruct(pruned, dense, cfg, _calib(cfg, seed))
    for a, b in zip((dense, pruned), before):
        for x, y in zip(torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)):
            assert torch.equal(x, y)
    assert validate(out, groups) == validate(pruned, groups)  # same units, only weights refit
    for x, y in zip(torch.utils._pytree.tree_leaves(out), torch.utils._pytree.tree_leaves(pruned)):
        assert x.shape == y.shape and x.dtype == y.dtype
    # pruning the refit tree further still equals masking it (PAPER §6)
    keep = select(out, groups, random_scores(out, groups, seed + 1), sparsity=0.5)
    toks = tokens(cfg, seed)
    close(model.forward(slice_units(out, groups, keep), toks, cfg),
          model.forward(mask(out, groups, keep), toks, cfg))


@settings(max_examples=12, deadline=None)
@given(models(), seeds)
def test_donated_refit_equals_the_pure_one_and_never_writes_the_dense_model(model_cfg, seed):
    """``cache_inner=False`` gives the same tree bit for bit. ``donate=True`` writes the refit weights into the pruned tree's own output leaves: the same
    tree as the pure refit, bit for bit; the dense model is never written, even when the tree
    given shares every leaf with it."""
    model, cfg = model_cfg
    dense, groups = _build(model, cfg, seed)
    pruned, _ = _pruned(dense, groups, seed)
    dense_before = copy.deepcopy(dense)
    calib = _calib(cfg, seed)

    def same(x, y):
        a, b = torch.utils._pytree.tree_leaves(x), torch.utils._pytree.tree_leaves(y)
        return len(a) == len(b) and all(torch.equal(u, v) for u, v in zip(a, b))

    pure = reconstruct(copy.deepcopy(pruned), dense, cfg, calib)
    # the inner activations computed again after each solve instead of kept: the same tree
    assert same(reconstruct(copy.deepcopy(pruned), dense, cfg, calib, cache_inner=False), pure)
    donated = reconstruct(pruned, dense, cfg, calib, donate=True)
    assert same(pure, donated) and same(dense, dense_before)
    out = family_of(cfg).sublayers[-1].out  # a sliced output leaf was reused, not copied
    assert all(q[out] is p[out] for q, p in zip(donated["layers"], pruned["layers"]))
    # a tree whose leaves ARE the dense model's (nothing sliced): refit, dense untouched
    shared = {**dense, "layers": tuple(dict(p) for p in dense["layers"])}
    assert same(reconstruct(shared, dense, cfg, calib, donate=True), reconstruct(dense_before, dense_before, cfg, calib))
    assert same(dense, dense_before)


def test_reconstruction_lowers_the_error_to_the_dense_model():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
    dense = llama.init(cfg, 0, dtype=torch.float64)
    groups = llama.coupled_groups(cfg)
    pruned, _ = _pruned(dense, groups, 0, sparsity=0.5)
    calib = [tokens(cfg, i, batch=4, length=16) for i in range(8)]
    held = tokens(cfg, 99, batch=4, length=16)
    out = reconstruct(pruned, dense, cfg, calib)
    ref = llama.forward(dense, held, cfg)

    def err(p):
        return float((llama.forward(p, held, cfg) - ref).pow(2).mean())

    assert err(out) < 0.7 * err(pruned)


def test_refit_model_compiles_and_matches_eager():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=32, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
    dense = llama.init(cfg, 0)
    groups = llama.coupled_groups(cfg)
    out = reconstruct(_pruned(dense, groups, 0)[0], dense, cfg, _calib(cfg, 0))
    toks = tokens(cfg, 5)
    compiled = torch.compile(llama.forward, fullgraph=True, backend="eager")
    close(compiled(out, toks, cfg), llama.forward(out, toks, cfg))


def _small():
    from ecospa.func import gpt2
    cfg = gpt2.Config(vocab_size=32, dim=8, n_layers=2, n_heads=2, ffn_dim=12, max_seq_len=16)
    dense = gpt2.init(cfg, 0, dtype=torch.float64)
    return cfg, dense, gpt2.coupled_groups(cfg)


def test_mismatched_trees_are_refused():
    cfg, dense, groups = _small()
    pruned, _ = _pruned(dense, groups, 0)
    with pytest.raises(ValueError, match="not a pruned"):
        reconstruct(dense, pruned, cfg, _calib(cfg, 0))  # arguments swapped
    with pytest.raises(ValueError, match="layers"):
        reconstruct({**pruned, "layers": pruned["layers"][:1]}, dense, cfg, _calib(cfg, 0))
    with pytest.raises(ValueError, match="at least one"):
        reconstruct(pruned, dense, cfg, [])
    with pytest.raises(ValueError, match="token ids"):
        reconstruct(pruned, dense, cfg, [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="ridge"):
        reconstruct(pruned, dense, cfg, _calib(cfg, 0), ridge=0)
    with pytest.raises(ValueError, match="target"):
        reconstruct(pruned, dense, cfg, _calib(cfg, 0), target="global")


def test_nan_activations_are_refused():
    cfg, dense, groups = _small()
    pruned, _ = _pruned(dense, groups, 0)
    layers = [dict(p) for p in pruned["layers"]]
    layers[1]["w_in"] = layers[1]["w_in"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite activations at layers.1.mlp"):
        reconstruct({**pruned, "layers": tuple(layers)}, dense, cfg, _calib(cfg, 0))


def test_fewer_tokens_than_units_still_gives_a_finite_fit():
    cfg, dense, groups = _small()
    pruned, _ = _pruned(dense, groups, 0, sparsity=0.0)
    one = [tokens(cfg, 0, batch=1, length=2)]  # 2 tokens, up to 12 units: HᵀH is singular
    out = reconstruct(pruned, dense, cfg, one)
    assert all(torch.isfinite(x).all() for x in torch.utils._pytree.tree_leaves(out))


@settings(**SETTINGS)
@given(models(), seeds)
def test_obs_scores_are_the_refit_error_of_removing_one_unit(model_cfg, seed):
    """Brute force: the least error ||H (W' - W)||^2 + lam ||W' - W||^2 over W' whose unit-u rows
    are zero, by an explicit solve over the other rows, equals obs_scores' closed form."""
    from ecospa.func.reconstruct import _unit_rows, obs_scores
    model, cfg = model_cfg
    dense, groups = _build(model, cfg, seed)
    calib = _calib(cfg, seed)
    scores = obs_scores(dense, cfg, groups, calib, ridge=0.1)
    name = family_of(cfg).name
    x = [family_of(cfg).embed(dense, b, None, cfg) for b in calib]
    d = dense["layers"][0]
    for s in family_of(cfg).sublayers:
        hs = [s.inner(d, xi, cfg) for xi in x]
        h = torch.cat([hi.reshape(-1, hi.shape[-1]) for hi in hs])
        a = h.T @ h
        a = a + 0.1 * float(a.diagonal().mean()) * torch.eye(a.shape[0], dtype=a.dtype)
        w = s.weight(d)
        for g in groups[:3]:  # layer 0
            rows = _unit_rows(g, s, d)
            if rows is None:
                assert g.kind == "qk" or g.name in scores
                continue
            for b in range(rows.shape[0]):
                for u in range(rows.shape[1]):
                    r = rows[b, u]
                    rest = torch.tensor([k for k in range(w.shape[0]) if k not in set(r.tolist())],
                                        dtype=torch.long)
                    # delta_r = -W_r fixed; delta_rest minimises the quadratic form
                    dr = -w[r]
                    drest = -torch.linalg.solve(a[rest][:, rest], a[rest][:, r] @ dr) if len(rest) \
                        else torch.zeros(0, w.shape[1], dtype=w.dtype)
                    delta = torch.zeros_like(w)
                    delta[r], delta[rest] = dr, drest
                    brute = float((delta * (a @ delta)).sum())
                    assert abs(float(scores[g.name][b, u]) - brute) <= 1e-8 * max(1.0, brute)
        x = [xi + s.apply(d, hi) for xi, hi in zip(x, hs)]
    assert {g.name for g in groups if g.kind != "qk"} == set(scores)


def test_non_finite_dense_targets_are_refused_too():
    """A NaN only in the DENSE model reaches the refit through its targets (not the pruned
    model's activations): the cross products catch it, with the sublayer's name."""
    cfg, dense, groups = _small()
    pruned, _ = _pruned(dense, groups, 0)
    layers = [dict(p) for p in dense["layers"]]
    layers[1]["w_out"] = layers[1]["w_out"].clone().fill_(float("inf"))
    with pytest.raises(ValueError, match="non-finite activations at layers.1.mlp"):
        reconstruct(pruned, {**dense, "layers": tuple(layers)}, cfg, _calib(cfg, 0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_gram_equals_one_float64_product(dtype):
    """``_gram`` sums float32 products of GRAM_ROWS-row blocks into float64: over 2.5 blocks (the
    last one partial) it equals the float64 product hᵀh / hᵀy of every row, to float32 accuracy
    (a skipped or repeated block, or bfloat16 products, is off by far more)."""
    from ecospa.func.reconstruct import GRAM_ROWS, _gram
    g = torch.Generator().manual_seed(0)
    n = 2 * GRAM_ROWS + GRAM_ROWS // 2
    h = torch.randn(n, 24, generator=g).to(dtype)
    y = torch.randn(n, 5, generator=g).to(dtype)
    for got, want in ((_gram(h), h.double().T @ h.double()), (_gram(h, y), h.double().T @ y.double())):
        assert got.dtype == torch.float64
        close(got / n, want / n, {torch.float64: EXACT[torch.float32]})  # means of products: O(1)
    tail = h[2 * GRAM_ROWS:].double()  # the partial block alone moves the mean by far more
    assert (tail.T @ tail / n).abs().max() > 100 * EXACT[torch.float32]["atol"]


def test_spd_inverse_is_the_inverse_also_when_not_positive_definite():
    from ecospa.func.reconstruct import _spd_inverse
    g = torch.Generator().manual_seed(1)
    a = torch.randn(7, 7, generator=g, dtype=torch.float64)
    spd = a @ a.T + 0.5 * torch.eye(7, dtype=torch.float64)
    indefinite = spd - 20 * torch.eye(7, dtype=torch.float64)  # symmetric, negative eigenvalues
    assert torch.linalg.eigvalsh(indefinite).min() < 0
    for m in (spd, indefinite):
        close(_spd_inverse(m) @ m, torch.eye(7, dtype=torch.float64))


def test_obs_scores_refuse_non_finite_activations_with_the_sublayers_name():
    from ecospa.func.reconstruct import obs_scores
    cfg, dense, groups = _small()
    layers = [dict(p) for p in dense["layers"]]
    layers[1]["w_in"] = layers[1]["w_in"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite activations at layers.1.mlp during the obs scores; "):
        obs_scores({**dense, "layers": tuple(layers)}, cfg, groups, _calib(cfg, 0))
