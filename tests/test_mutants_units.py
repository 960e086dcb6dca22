"""Direct reference checks of the core building blocks, written to kill the mutants that the
model-level properties cannot see (mutation testing, issue 15): the layers against naive
formulas, AdamW's argument ranges and helpers, every estimator against its definition, and the
small public helpers of select/prune/groups."""
from __future__ import annotations

import math

import optree
import pytest
import torch
from hypothesis import given, settings

import ecospa
from ecospa import optim
from ecospa._tree import get_path
from ecospa.func import gpt2, llama
from ecospa.func._layers import attention, rms_norm, rope_tables, rotate_pairs
from ecospa.groups import Group, Member
from ecospa.select import _ranked, check_scores, keep_top
from strategies import custom_groups, float_scores, seeds

FAST = settings(max_examples=15, deadline=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --- func/_layers.py ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_reference(dtype):
    x = torch.randn(2, 3, 5, generator=gen(), dtype=dtype) * 3 + 1
    w = torch.randn(5, generator=gen(1), dtype=dtype)
    for eps in (1e-5, 0.7):
        want = w * (x / torch.sqrt((x * x).sum(-1, keepdim=True) / 5 + eps))
        tol = 1e-13 if dtype == torch.float64 else 1e-6  # float64 is computed in float64
        torch.testing.assert_close(rms_norm(x, w, eps), want, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rms_norm_half_computes_in_float32(dtype):
    x = (torch.randn(4, 64, generator=gen(2)) * 30).to(dtype)
    w = torch.randn(64, generator=gen(3)).to(dtype)
    xf = x.float()
    want = w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
    out = rms_norm(x, w, 1e-5)
    assert out.dtype == dtype and torch.equal(out, want)
    naive = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))  # in half precision
    assert not torch.equal(out, naive)  # the float32 path is observable


@pytest.mark.parametrize("freq_dtype, dtype, angle_dtype", [
    (torch.float32, torch.float32, torch.float32), (torch.float64, torch.float64, torch.float64),
    (torch.bfloat16, torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16, torch.float32)])
def test_rope_tables_reference(freq_dtype, dtype, angle_dtype):
    inv = (1.0 / (10.0 ** (torch.arange(3, dtype=torch.float64) / 3))).repeat(2, 1)
    inv[1] *= 0.5
    inv = inv.to(freq_dtype)
    T = 37  # large angles: float32 vs bfloat16 angles differ
    cos, sin = rope_tables(inv, T, dtype)
    ang = torch.arange(T, dtype=angle_dtype)[None, :, None] * inv.to(angle_dtype)[:, None, :]
    assert cos.shape == sin.shape == (2, T, 3) and cos.dtype == sin.dtype == dtype
    assert torch.equal(cos, ang.cos().to(dtype)) and torch.equal(sin, ang.sin().to(dtype))


def test_rotate_pairs_is_complex_multiplication():
    x = torch.randn(2, 4, 2, 3, generator=gen(4), dtype=torch.float64)  # [B, T, 2, P]
    ang = torch.randn(4, 3, generator=gen(5), dtype=torch.float64)
    out = rotate_pairs(x, ang.cos(), ang.sin())
    z = torch.complex(x[..., 0, :], x[..., 1, :]) * torch.polar(torch.ones_like(ang), ang)
    assert out.shape == x.shape
    torch.testing.assert_close(out[..., 0, :], z.real, rtol=0, atol=1e-12)
    torch.testing.assert_close(out[..., 1, :], z.imag, rtol=0, atol=1e-12)


@pytest.mark.parametrize("G", [1, 3])
def test_attention_reference(G):
    B, H, T, dk, dv = 2, 2, 5, 4, 3
    q = torch.randn(B, H, G, T, dk, generator=gen(6), dtype=torch.float64)
    k = torch.randn(B, H, T, dk, generator=gen(7), dtype=torch.float64)
    v = torch.randn(B, H, T, dv, generator=gen(8), dtype=torch.float64)
    scale = 0.37
    s = torch.einsum("bhgtd,bhsd->bhgts", q, k) * scale
    s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.einsum("bhgts,bhsd->bhgtd", s.softmax(-1), v)
    out = attention(q, k, v, scale)
    assert out.shape == (B, H, G, T, dv)
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)


# --- optim.py ------------------------------------------------------------------------------------

def test_global_norm():
    assert optim.global_norm([]).item() == 0.0 and optim.global_norm([]).dtype == torch.float64
    xs = [torch.tensor([3.0, 4.0]), torch.tensor([[12.0]], dtype=torch.float64), torch.tensor([0.0], dtype=torch.bfloat16)]
    n = optim.global_norm(xs)
    assert n.dtype == torch.float64 and n.item() == 13.0
    # float32 leaves: the norms are combined in float64 (no overflow of the squares' sum)
    big = optim.global_norm([torch.tensor([3e38]), torch.tensor([-3e38])])
    assert big.dtype == torch.float64 and math.isclose(big.item(), 3e38 * math.sqrt(2), rel_tol=1e-6)


def test_default_trainable():
    f = torch.zeros(2)
    assert optim.default_trainable(("layers", 0, "wq"), f)
    assert optim.default_trainable(("inv_freq", "w"), f)
    assert not optim.default_trainable(("layers", 0, "inv_freq"), f)
    assert not optim.default_trainable((), f)
    assert not optim.default_trainable(("ids",), torch.zeros(2, dtype=torch.int64))


@pytest.mark.parametrize("kwargs, ok", [
    (dict(b1=0.0), True), (dict(b1=1 - 1e-12), True), (dict(b1=1.0), False), (dict(b1=-0.1), False),
    (dict(b2=0.0), True), (dict(b2=1 - 1e-12), True), (dict(b2=1.0), False), (dict(b2=-0.1), False),
    (dict(eps=0.0), True), (dict(eps=-1e-9), False), (dict(eps=float("inf")), True),
    (dict(weight_decay=0.0), True), (dict(weight_decay=-0.1), False), (dict(weight_decay=5.0), True),
    (dict(clip_norm=1e-12), True), (dict(clip_norm=0.0), False), (dict(clip_norm=1e9), True),
    (dict(clip_norm=None), True), (dict(b1=True), False), (dict(eps="1e-8"), False),
])
def test_adamw_argument_ranges(kwargs, ok):
    if ok:
        optim.adamw(1e-3, **kwargs)
        return
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"^{name} must be a number in \[-?[\d.e+-]+, [\w.e+-]+\], got "):
        optim.adamw(1e-3, **kwargs)


@pytest.mark.parametrize("lr, ok", [(0.0, True), (1e9, True), (-1e-9, False), (True, False), ("0.1", False)])
def test_adamw_lr_range(lr, ok):
    if ok:
        optim.adamw(lr)
    else:
        with pytest.raises(ValueError, match=r"^lr must be a number in \[0.0, inf\], got "):
            optim.adamw(lr)


def test_adamw_defaults_and_one_step_by_hand():
    """One step with every default (b1 .9, b2 .95, eps 1e-8, wd .1, clip 1.0) against the formula."""
    p = {"w": torch.tensor([[1.0, -2.0]], dtype=torch.float64), "b": torch.tensor([0.5], dtype=torch.float64),
         "n": torch.tensor([3], dtype=torch.int64)}
    g = {"w": torch.tensor([[0.3, 0.4]], dtype=torch.float64), "b": torch.tensor([0.0], dtype=torch.float64),
         "n": torch.tensor([7], dtype=torch.int64)}
    opt = optim.adamw(0.1)
    new, state = opt.update(g, opt.init(p), p)
    m = 0.1 * g["w"]
    v = 0.05 * g["w"] ** 2
    want = p["w"] * (1 - 0.1 * 0.1) - 0.1 * (m / 0.1) / (torch.sqrt(v / 0.05) + 1e-8)
    torch.testing.assert_close(new["w"], want, rtol=1e-12, atol=1e-12)
    assert torch.equal(new["b"], p["b"]) and torch.equal(new["n"], p["n"])  # zero grad, no decay on 1-D
    assert state.count == 1
    torch.testing.assert_close(state.mu["w"], m, rtol=1e-12, atol=0)
    torch.testing.assert_close(state.nu["w"], v, rtol=1e-12, atol=0)
    # clipping at 1.0: a gradient of norm 10 acts like one of norm 1 (Adam is scale-invariant, so
    # compare the moments, which are not)
    big = {"w": g["w"] * 20, "b": g["b"], "n": g["n"]}
    _, s2 = opt.update(big, opt.init(p), p)
    torch.testing.assert_close(s2.mu["w"], 0.1 * big["w"] * (1.0 / (10.0 + 1e-6)), rtol=1e-12, atol=0)
    _, s3 = optim.adamw(0.1, clip_norm=None).update(big, opt.init(p), p)
    torch.testing.assert_close(s3.mu["w"], 0.1 * big["w"], rtol=1e-12, atol=0)


def test_adamw_bias_correction_and_eps_over_steps():
    p = {"w": torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)}
    gs = [torch.tensor([[0.1, -0.2, 0.0]], dtype=torch.float64) * (i + 1) for i in range(3)]
    opt = optim.adamw(0.01, b1=0.8, b2=0.9, eps=1e-3, weight_decay=0.0, clip_norm=None)
    state, cur = opt.init(p), p
    m = v = torch.zeros_like(p["w"])
    w = p["w"].clone()
    for t, g in enumerate(gs, start=1):
        cur, state = opt.update({"w": g}, state, cur)
        m, v = 0.8 * m + 0.2 * g, 0.9 * v + 0.1 * g * g
        w = w - 0.01 * (m / (1 - 0.8 ** t)) / (torch.sqrt(v / (1 - 0.9 ** t)) + 1e-3)
        torch.testing.assert_close(cur["w"], w, rtol=1e-12, atol=1e-12)


def test_adamw_init_zeros_and_custom_trainable():
    p = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    opt = optim.adamw(0.5, trainable=lambda path, leaf: path[-1] == "b", clip_norm=None)
    st = opt.init(p)
    assert st.count == 0 and all(torch.equal(x, torch.zeros_like(x)) for x in optree.tree_leaves(st.mu))
    assert all(torch.equal(x, torch.zeros_like(x)) for x in optree.tree_leaves(st.nu))
    new, _ = opt.update({"a": torch.ones(2, 2), "b": torch.ones(3)}, st, p)
    assert torch.equal(new["a"], p["a"]) and not torch.equal(new["b"], p["b"])


def test_slice_state_count_and_moments():
    cfg = llama.Config(vocab_size=11, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=4)
    params = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)
    st = optim.AdamWState(5, optree.tree_map(lambda x: x + 1, params), optree.tree_map(lambda x: x * 2, params))
    keep = ecospa.select(params, groups, float_scores(params, groups, 0), sparsity=0.5)
    s2 = optim.slice_state(st, groups, keep)
    assert s2.count == 5
    small = ecospa.slice_units(params, groups, keep)
    for a, b in zip(optree.tree_leaves(s2.mu), optree.tree_leaves(small)):
        assert torch.equal(a, b + 1)
    for a, b in zip(optree.tree_leaves(s2.nu), optree.tree_leaves(small)):
        assert torch.equal(a, b * 2)


# --- importance.py -------------------------------------------------------------------------------

def _per_unit_ref(x, m, n_blocks):
    if m.block_axis is None:
        return x.movedim(m.unit_axis, 0).reshape(x.shape[m.unit_axis], -1).sum(1)[None]
    y = x.movedim((m.block_axis, m.unit_axis), (0, 1))
    return y.reshape(y.shape[0], y.shape[1], -1).sum(-1)


def _norms(params, g, side):
    members = g.side(side)
    return sum(_per_unit_ref(get_path(params, m.path) ** 2, m, 0) for m in members).sqrt()


def _grads(params, seed):
    return optree.tree_map(lambda x: torch.randn(x.shape, generator=gen(seed), dtype=x.dtype), params)


@FAST
@given(custom_groups(), seeds)
def test_static_estimators_reference(pg, seed):
    params, groups = pg
    later = optree.tree_map(lambda x: x * 2 + 1, params)
    for name, want in [
        ("magnitude", lambda p, g: _norms(p, g, "b")),
        ("norm_product", lambda p, g: _norms(p, g, "b") * (_norms(p, g, "a") if g.side("a") else 1.0)),
    ]:
        est = ecospa.ESTIMATORS[name](groups)
        st = est.update(est.update(est.init(params), params, None), later, None)
        assert st.count == 2
        sc = est.scores(st)
        assert set(sc) == {g.name for g in groups}
        for g in groups:  # from the params of the LAST update
            torch.testing.assert_close(sc[g.name], want(later, g), rtol=1e-10, atol=1e-12)
    if any(not g.side("a") for g in groups):
        with pytest.raises(ValueError, match=r"has no side-'a' member"):
            ecospa.magnitude(groups, side="a").scores(ecospa.magnitude(groups, side="a").init(params))


@FAST
@given(custom_groups(), seeds)
def test_gradient_estimators_reference(pg, seed):
    params, groups = pg
    gs = [_grads(params, seed + i) for i in range(3)]

    def dots(g, grads, side):
        return sum(_per_unit_ref(get_path(params, m.path) * get_path(grads, m.path), m, 0) for m in g.side(side))

    def unc(g, grads):
        m = (g.side("a") or g.side("b"))[0]
        return _per_unit_ref((get_path(params, m.path) * get_path(grads, m.path)) ** 2, m, 0)

    cases = [(ecospa.coupled_fisher(groups), lambda g: sum(dots(g, x, "b") ** 2 for x in gs) / 3),
             (ecospa.taylor(groups), lambda g: (sum(dots(g, x, "b") for x in gs) / 3).abs()),
             (ecospa.uncoupled(groups), lambda g: sum(unc(g, x) for x in gs) / 3)]
    if all(g.side("a") for g in groups):
        cases += [(ecospa.coupled_fisher(groups, side="a"), lambda g: sum(dots(g, x, "a") ** 2 for x in gs) / 3),
                  (ecospa.taylor(groups, side="a"), lambda g: (sum(dots(g, x, "a") for x in gs) / 3).abs())]
    for est, want in cases:
        st = est.init(params)
        for x in gs:
            st = est.update(st, params, x)
        assert st.count == 3
        for g in groups:
            torch.testing.assert_close(est.scores(st)[g.name], want(g), rtol=1e-9, atol=1e-12)


def test_uncoupled_side_b_and_fallback():
    params = {"a": torch.tensor([[1.0, 2.0]]), "b": torch.tensor([[3.0], [5.0]])}
    grads = {"a": torch.tensor([[1.0, 1.0]]), "b": torch.tensor([[1.0], [-1.0]])}
    g = Group("g", "mlp", (Member(("a",), 1, None, "a"), Member(("b",), 0, None, "b")))
    for side, want in [("a", [[1.0, 4.0]]), ("b", [[9.0, 25.0]])]:
        est = ecospa.uncoupled([g], side=side)
        assert est.scores(est.update(est.init(params), params, grads))["g"].tolist() == want
    only_b = Group("h", "mlp", (Member(("b",), 0, None, "b"),))
    est = ecospa.uncoupled([only_b])  # no side-a member: falls back to side b
    assert est.scores(est.update(est.init(params), params, grads))["h"].tolist() == [[9.0, 25.0]]


def test_accumulating_restarts_after_pruning_and_ema():
    cfg = llama.Config(vocab_size=11, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=6)
    params = llama.init(cfg, seed=0, dtype=torch.float64)
    groups = llama.coupled_groups(cfg)
    est = ecospa.coupled_fisher(groups)
    st = est.update(est.update(est.init(params), params, _grads(params, 1)), params, _grads(params, 2))
    keep = ecospa.select(params, groups, est.scores(st), sparsity=0.5)
    small = ecospa.slice_units(params, groups, keep)
    g3 = _grads(small, 3)
    st2 = est.update(st, small, g3)
    fresh = est.update(est.init(small), small, g3)
    assert st2.count == 3
    pruned = [g for g in groups if g.sizes(small) != g.sizes(params)]
    assert pruned and len(pruned) < len(groups)
    for g in groups:  # a pruned group's statistic starts afresh (divided by the total count)
        if g in pruned:
            torch.testing.assert_close(est.scores(st2)[g.name] * 3, est.scores(fresh)[g.name])
        else:
            torch.testing.assert_close(est.scores(st2)[g.name] * 3,
                                       est.scores(st)[g.name] * 2 + est.scores(fresh)[g.name])
    ema = ecospa.coupled_fisher(groups, ema=0.9)
    s = ema.update(ema.update(ema.init(params), params, _grads(params, 1)), params, _grads(params, 2))
    v1 = ecospa.unit_dots(params, _grads(params, 1), groups)
    v2 = ecospa.unit_dots(params, _grads(params, 2), groups)
    for g in groups:
        torch.testing.assert_close(ema.scores(s)[g.name], 0.9 * v1[g.name] ** 2 + 0.1 * v2[g.name] ** 2)


def test_random_estimator():
    cfg = gpt2.Config(vocab_size=5, dim=4, n_layers=2, n_heads=2, ffn_dim=3, max_seq_len=4)
    params = gpt2.init(cfg)
    groups = gpt2.coupled_groups(cfg)

    def scores(est):
        return est.scores(est.update(est.init(params), params, None))
    a, b, c = scores(ecospa.random(groups)), scores(ecospa.random(groups, seed=0)), scores(ecospa.random(groups, seed=1))
    first = torch.rand(*groups[0].sizes(params), generator=gen(0), dtype=torch.float64)
    assert torch.equal(a[groups[0].name], first)
    for g in groups:
        assert torch.equal(a[g.name], b[g.name]) and not torch.equal(a[g.name], c[g.name])
        assert a[g.name].dtype == torch.float64 and a[g.name].shape == g.sizes(params)
        assert ((a[g.name] >= 0) & (a[g.name] < 1)).all()
    assert ecospa.ESTIMATORS["random"] is ecospa.random
    assert sorted(ecospa.ESTIMATORS) == ["fisher", "magnitude", "norm_product", "random", "taylor", "uncoupled"]


def test_fisher_helper_with_another_estimator():
    cfg = gpt2.Config(vocab_size=7, dim=4, n_layers=1, n_heads=2, ffn_dim=3, max_seq_len=4)
    params = gpt2.init(cfg, dtype=torch.float64)
    groups = gpt2.coupled_groups(cfg)

    def loss(p, batch):
        return gpt2.forward(p, batch, cfg).pow(2).mean()
    batches = [torch.randint(0, 7, (2, 3), generator=gen(i)) for i in range(2)]
    got = ecospa.fisher(loss, params, groups, batches, estimator=ecospa.taylor(groups))
    vs = [ecospa.unit_dots(params, torch.func.grad(loss)(params, b), groups) for b in batches]
    for g in groups:
        torch.testing.assert_close(got[g.name], ((vs[0][g.name] + vs[1][g.name]) / 2).abs())


# --- select.py / prune.py / groups.py ------------------------------------------------------------

def _two_groups():
    params = {"a": torch.ones(2, 3, 4), "b": torch.ones(5, 2)}
    groups = [Group("g", "qk", (Member(("a",), 1, 0, "b"),)),  # 2 blocks x 3 units, 4 params/unit
              Group("h", "mlp", (Member(("b",), 0, None, "b"),))]  # 1 block x 5 units, 2 params/unit
    return params, groups


def test_kept_fraction_and_keep_all():
    params, groups = _two_groups()
    keep = {"g": torch.tensor([[0], [2]]), "h": torch.tensor([[1, 2, 4]])}
    # kept: 2*1*4 + 3*2 = 14 of 2*3*4 + 5*2 = 34
    assert ecospa.kept_fraction(params, groups, keep) == pytest.approx(14 / 34)
    assert ecospa.kept_fraction(params, [], {}) == 1.0
    full = ecospa.keep_all(params, groups)
    assert full["g"].tolist() == [[0, 1, 2]] * 2 and full["h"].tolist() == [[0, 1, 2, 3, 4]]
    assert ecospa.kept_fraction(params, groups, full) == 1.0
    full["g"][0, 0] = 7  # a fresh tensor, not a view of another
    assert ecospa.keep_all(params, groups)["g"][1, 0] == 0


def test_pruner_mask_and_select_methods():
    params, groups = _two_groups()
    params = {"a": torch.arange(24.0).reshape(2, 3, 4), "b": torch.arange(10.0).reshape(5, 2)}
    scores = {"g": torch.tensor([[1.0, 3.0, 2.0], [5.0, 4.0, 6.0]]), "h": torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])}
    prune = ecospa.pruner(groups, sparsity=0.4)
    keep = prune.select(params, scores)
    assert keep["g"].tolist() == [[1, 2], [0, 2]] and keep["h"].tolist() == [[0, 2, 4]]
    masked = prune.mask(params, scores)
    assert torch.equal(masked["b"], params["b"] * torch.tensor([1.0, 0, 1, 0, 1])[:, None])
    assert torch.equal(masked["a"][0, 0], torch.zeros(4)) and torch.equal(masked["a"][1, 1], torch.zeros(4))
    assert torch.equal(masked["a"][0, 1], params["a"][0, 1])
    small = prune(params, scores)
    assert small["a"].shape == (2, 2, 4) and small["b"].shape == (3, 2)
    by_budget = ecospa.pruner(groups, budget=0.3)
    assert by_budget.budget == 0.3 and by_budget.sparsity is None
    assert isinstance(by_budget.groups, tuple)


def test_check_scores_shapes_and_types():
    params, groups = _two_groups()
    sizes = ecospa.validate(params, groups)
    out = check_scores({"g": [[1, 2, 3], [4, 5, 6]], "h": torch.arange(5)}, groups, sizes)
    assert out["g"].dtype == torch.float64 and out["h"].shape == (1, 5)
    with pytest.raises(ValueError, match=r"group 'g': scores have \(3,\) \(3 values\), the params have 2 blocks x 3 units"):
        check_scores({"g": torch.ones(3), "h": torch.ones(5)}, groups, sizes)
    with pytest.raises(ValueError, match=r"group 'h': no scores given \(have \['g'\]"):
        check_scores({"g": torch.ones(2, 3)}, groups, sizes)
    with pytest.raises(ValueError, match=r"group 'h': scores contain NaN or inf"):
        check_scores({"g": torch.ones(2, 3), "h": torch.tensor([1.0, 2, 3, 4, float("inf")])}, groups, sizes)


def test_ranked_and_keep_top():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0]])
    assert _ranked(s).tolist() == [[0, 2, 3, 1]]
    assert keep_top(s, 3).tolist() == [[0, 2, 3]] and keep_top(s, 1).tolist() == [[0]]
    assert keep_top(s, 4).dtype == torch.int64


def test_budget_message_and_edges():
    params, groups = _two_groups()
    scores = {"g": torch.ones(2, 3), "h": torch.ones(1, 5)}
    # one unit per block needs 2*4 + 2 = 10 of 34 parameters: at most 1 - 10/34 = 0.7059
    with pytest.raises(ValueError, match=r"budget 0\.8 keeps 7 of 34 parameters.*already needs 10.*at most 0\.7059\.$"):
        ecospa.select(params, groups, scores, budget=0.8)
    keep = ecospa.select(params, groups, scores, budget=1 - 10 / 34)  # exactly the floor: fits
    assert keep["g"].shape == (2, 1) and keep["h"].shape == (1, 1)
    b = 0.7058823529705882  # leaves 9.999999999 parameters: within the 1e-9 tolerance of the floor
    assert 34 * (1 - b) + 1e-9 == 10.0
    keep = ecospa.select(params, groups, scores, budget=b)
    assert keep["g"].shape == (2, 1) and keep["h"].shape == (1, 1)
    keep = ecospa.select(params, groups, scores, budget=0.0)
    assert keep["g"].shape == (2, 3) and keep["h"].shape == (1, 5)


def test_member_and_group_validation_messages():
    with pytest.raises(ValueError, match=r"member \('w',\): axes must be non-negative"):
        Member(("w",), -1)
    with pytest.raises(ValueError, match=r"axes must be non-negative"):
        Member(("w",), 0, -1)
    Member(("w",), 0, None)
    with pytest.raises(ValueError, match=r"member \('w',\): side must be 'a', 'b' or None"):
        Member(("w",), 0, 1, "c")
    assert Member(("w",), 0).masked is True and Member(("w",), 0).side is None
    g = Group("g", "mlp", [Member(("w",), 0, None, "b"), Member(("v",), 1, None, "a")])
    assert isinstance(g.members, tuple)
    assert g.side("a") == (g.members[1],) and g.side("b") == (g.members[0],) and g.side(None) == ()


def test_group_sizes_messages():
    g = Group("g", "mlp", (Member(("w",), 1, 0, "b"), Member(("v",), 0, None, "a")))
    with pytest.raises(ValueError, match=r"group 'g': member \('v',\) is not in the params tree; were the groups"):
        g.sizes({"w": torch.ones(1, 3)})
    with pytest.raises(ValueError, match=r"group 'g': member \('w',\) has shape \(3,\), too few axes"):
        g.sizes({"w": torch.ones(3), "v": torch.ones(3)})
    with pytest.raises(ValueError, match=r"too few axes"):
        g.sizes({"w": 3.0, "v": torch.ones(3)})
    with pytest.raises(ValueError, match=r"member \('w',\) has shape \(1, 3\), too few axes"):
        Group("k", "mlp", (Member(("w",), 1, 2, "b"),)).sizes({"w": torch.ones(1, 3)})  # block axis 2
    with pytest.raises(ValueError, match=r"members disagree on sizes \(\('w',\): shape \(2, 3\) -> 2 blocks x 3 units; "
                                         r"\('v',\): shape \(3,\) -> 1 blocks x 3 units\)"):
        g.sizes({"w": torch.ones(2, 3), "v": torch.ones(3)})
    assert g.sizes({"w": torch.ones(1, 3), "v": torch.ones(3, 2)}) == (1, 3)
    assert g.numel_per_unit({"w": torch.ones(1, 3), "v": torch.ones(3, 2)}) == 3
    with pytest.raises(ValueError, match=r"group names must be unique, got duplicates in \['g', 'g'\]"):
        ecospa.validate({}, [g, g])
    h = Group("h", "qk", (Member(("w",), 1, 0, "b"),))
    with pytest.raises(ValueError, match=r"leaf \('w',\) belongs to both 'g' and 'h'"):
        ecospa.validate({"w": torch.ones(1, 3), "v": torch.ones(3)}, [g, h])


def test_fisher_helper_without_batches():
    """No batches: a gradient-free estimator scores the params as given; Fisher says why it cannot."""
    cfg = gpt2.Config(vocab_size=7, dim=4, n_layers=1, n_heads=2, ffn_dim=3, max_seq_len=4)
    params = gpt2.init(cfg, dtype=torch.float64)
    groups = gpt2.coupled_groups(cfg)
    got = ecospa.fisher(None, params, groups, [], estimator=ecospa.magnitude(groups))
    want = ecospa.magnitude(groups).scores(ecospa.magnitude(groups).init(params))
    assert all(torch.equal(got[g.name], want[g.name]) for g in groups)
    with pytest.raises(ValueError, match=r"^no batches were accumulated: call update\(\) at least once$"):
        ecospa.fisher(None, params, groups, [])


def test_uncoupled_takes_any_iterable_of_groups():
    params = {"w": torch.tensor([[1.0, 2.0]])}
    est = ecospa.uncoupled(g for g in [Group("g", "mlp", (Member(("w",), 1, None, "b"),))])
    grads = {"w": torch.ones(1, 2)}
    st = est.update(est.update(est.init(params), params, grads), params, grads)
    assert est.scores(st)["g"].tolist() == [[1.0, 4.0]]


def test_adamw_casts_grads_to_the_params_dtype():
    """Gradients in another dtype act as if cast to each leaf's dtype first."""
    p = {"w": torch.randn(8, 16, generator=gen(11)).to(torch.bfloat16), "v": torch.randn(5, generator=gen(12))}
    g = {"w": torch.randn(8, 16, generator=gen(13)) * 3, "v": torch.randn(5, generator=gen(14), dtype=torch.float64)}
    cast = {"w": g["w"].to(torch.bfloat16), "v": g["v"].float()}
    for clip in (None, 0.5):
        opt = optim.adamw(0.01, clip_norm=clip)
        (a, sa), (b, sb) = opt.update(g, opt.init(p), p), opt.update(cast, opt.init(p), p)
        for x, y in zip(optree.tree_leaves((a, sa.mu, sa.nu)), optree.tree_leaves((b, sb.mu, sb.nu))):
            assert x.dtype == y.dtype and torch.equal(x, y)


def test_adamw_with_nothing_trainable():
    p = {"inv_freq": torch.ones(3), "ids": torch.arange(3)}
    opt = optim.adamw(0.1)
    new, st = opt.update({"inv_freq": torch.ones(3), "ids": torch.zeros(3)}, opt.init(p), p)
    assert st.count == 1 and torch.equal(new["inv_freq"], p["inv_freq"]) and torch.equal(new["ids"], p["ids"])


def test_mask_and_slice_follow_the_leaves_device():
    """The kept indices live on the CPU; the masks and gathers move to each leaf's device (the
    meta device stands in for an accelerator here: mixing it with CPU tensors is an error)."""
    params = {"w": torch.ones(2, 3, 4, device="meta"), "v": torch.ones(3, 2, device="meta"),
              "u": torch.ones(4, 3, device="meta")}
    groups = [Group("g", "mlp", (Member(("w",), 1, 0, "b"), Member(("v",), 0, 1, "a"),
                                 Member(("u",), 1, None, None)))]
    keep = {"g": torch.tensor([[0, 2], [1, 2]])}
    with pytest.raises(ValueError, match="blocks"):  # u has no block axis but 2 blocks: sizes disagree
        ecospa.mask(params, groups, keep)
    groups = [Group("g", "mlp", groups[0].members[:2])]
    masked, small = ecospa.mask(params, groups, keep), ecospa.slice_units(params, groups, keep)
    assert masked["w"].device.type == "meta" and masked["w"].shape == (2, 3, 4)
    assert masked["v"].device.type == "meta" and masked["v"].shape == (3, 2)
    assert small["w"].device.type == "meta" and small["w"].shape == (2, 2, 4)
    assert small["v"].device.type == "meta" and small["v"].shape == (2, 2)
    one = [Group("h", "mlp", (Member(("u",), 1, None, "b"),))]
    k1 = {"h": torch.tensor([[0, 2]])}
    assert ecospa.mask(params, one, k1)["u"].device.type == "meta"
    assert ecospa.slice_units(params, one, k1)["u"].shape == (4, 2)


def test_bad_keep_shapes():
    params, groups = _two_groups()
    good = ecospa.keep_all(params, groups)
    for transform in (ecospa.mask, ecospa.slice_units):
        with pytest.raises(ValueError, match=r"^group 'h': no kept indices given$"):
            transform(params, groups, {"g": good["g"]})
        with pytest.raises(ValueError, match=r"^group 'g': keep must be int64 \[2, k\], got torch.int64 \(3,\)$"):
            transform(params, groups, {**good, "g": torch.tensor([0, 1, 2])})
        with pytest.raises(ValueError, match=r"^group 'g': keep must be int64 \[2, k\], got torch.int64 \(3, 3\)$"):
            transform(params, groups, {**good, "g": torch.arange(3).expand(3, 3)})
        with pytest.raises(ValueError, match=r"^group 'h': kept indices must lie in \[0, 5\)$"):
            transform(params, groups, {**good, "h": torch.tensor([[1, 5]])})  # one past the end
        with pytest.raises(ValueError, match=r"^group 'h': kept indices must lie in \[0, 5\)$"):
            transform(params, groups, {**good, "h": torch.tensor([[-1, 4]])})
        for bad in ([[1, 0]], [[1, 1, 2]], [[0, 2, 1]]):  # unsorted (k=2), repeated, unsorted after the first
            with pytest.raises(ValueError, match=r"^group 'h': kept indices must be sorted and unique per block$"):
                transform(params, groups, {**good, "h": torch.tensor(bad)})


def test_budget_column_that_exactly_fits():
    """A column that fills the budget up to the 1e-9 tolerance is kept."""
    params = {"a": torch.ones(2, 3, 3), "b": torch.ones(8, 2)}  # 18 + 16 = 34 parameters
    groups = [Group("g", "qk", (Member(("a",), 1, 0, "b"),)),  # columns of 6 parameters
              Group("h", "mlp", (Member(("b",), 0, None, "b"),))]  # columns of 2
    scores = {"g": torch.ones(2, 3), "h": torch.ones(1, 8)}  # per parameter: h 0.5, g 0.33
    b = 0.7058823529705882  # leaves 9.999999999: the floor (8) plus one h column, within 1e-9
    assert 34 * (1 - b) + 1e-9 == 10.0
    keep = ecospa.select(params, groups, scores, budget=b)
    assert keep["h"].shape == (1, 2) and keep["g"].shape == (2, 1)


def test_rope_tables_on_the_frequencies_device():
    cos, sin = rope_tables(torch.ones(2, 3, device="meta"), 5, torch.float32)
    assert cos.device.type == sin.device.type == "meta" and cos.shape == (2, 5, 3)


def test_ties_with_many_units_go_to_the_lower_index():
    """Past 16 elements torch's default (unstable) CPU sort reorders ties: the stable one is needed."""
    s = torch.zeros(2, 40, dtype=torch.float64)
    s[0, 30:] = 1.0
    assert keep_top(s, 12).tolist() == [[0, 1] + list(range(30, 40)), list(range(12))]
    assert _ranked(s)[1].tolist() == list(range(40))
    assert _ranked(s)[0].tolist() == list(range(30, 40)) + list(range(30))


def test_select_messages_in_full():
    params, groups = _two_groups()
    with pytest.raises(ValueError, match=r"^give exactly one of sparsity= \(fraction of units per group\) "
                                         r"or budget= \(fraction of parameters, allocated globally\)$"):
        ecospa.select(params, groups, {}, sparsity=None)
    with pytest.raises(ValueError, match=r"^sparsity must be a number in \[0, 1\), got 1\.5$"):
        ecospa.pruner(groups, sparsity=1.5)
    sizes = ecospa.validate(params, groups)
    extra = {f"x{i}": torch.ones(1) for i in range(6)}
    with pytest.raises(ValueError, match=r"^group 'g': no scores given \(have \['x0', 'x1', 'x2', 'x3'\]\.\.\.\)$"):
        check_scores(extra, groups, sizes)
    with pytest.raises(ValueError, match=r"^group 'g': scores contain NaN or inf; check the loss and gradients "
                                         r"that produced them$"):
        check_scores({"g": torch.full((2, 3), float("nan")), "h": torch.ones(5)}, groups, sizes)
