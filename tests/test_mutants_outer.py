"""Tests that kill mutants of the outer code (issue 24): allocation, func, io, train, jobs.

Each test names the behaviour it pins; `bash tools/mutation.sh <profile>` runs them with the
module's own tests (tools/mutation.sh lists which)."""
from __future__ import annotations

import json

import pytest
import torch

from ecospa import allocation
from ecospa.errors import UsageError
from ecospa.func import gpt2, llama, padding, vit
from ecospa.func._block import run
from ecospa.func.decode import decode, init_cache
from ecospa.func.families import family_of
from ecospa.func.reconstruct import obs_scores, reconstruct, ridge_solve
from ecospa.groups import Group, Member
from ecospa.io import hf_compact, hf_write


# ---- allocation (profile alloc) ----------------------------------------------------------------

def _toy(**scores):
    """A flat tree with one single-block group per name (one parameter per unit), in the given
    order, and the scores as given: {name: [units]}."""
    params = {n: torch.zeros(1, len(v)) for n, v in scores.items()}
    groups = [Group(n, "mlp", (Member((n,), 1, None, "b"),)) for n in scores]
    return params, groups, {n: torch.tensor([v], dtype=torch.float64) for n, v in scores.items()}


def _one_more(how, **scores):
    """Which group gets the single unit the budget allows beyond one unit per group."""
    params, groups, s = _toy(**scores)
    counts = allocation.counts(how, params, groups, s, max_params=len(groups) + 1)
    assert sorted(counts.values()) == [1] * (len(groups) - 1) + [2]
    return max(counts, key=counts.get)


def test_layer_of_reads_the_first_members_path():
    w = lambda *path: Member(path, 1, None, "b")  # noqa: E731
    assert allocation.layer_of(Group("g", "mlp", (w("layers", 3, "w"),))) == 3  # one member
    assert allocation.layer_of(Group("g", "mlp", (w("layers", 2),))) == 2      # a list of leaves
    assert allocation.layer_of(Group("g", "mlp", (w("layers",),))) is None     # no index
    assert allocation.layer_of(Group("g", "mlp", (w("embed", 0),))) is None


def test_zscore_columns_are_each_groups_best_units_first():
    # a's z-scores (one block) are [1.10, 0.89, -1.00, -1.00]; b is constant (z = 0): a's second
    # best unit (0.89) beats b's; with a's columns sorted worst first it would be -1.00
    assert _one_more("zscore", b=[1, 1, 1, 1], a=[10, 9, 0, 0]) == "a"


def test_zscore_is_not_rounded_to_whole_numbers():
    # a = [0, 0, 1]: z = [1.41, -0.71, -0.71]; b = [0, 1]: z = ±1. a's second column (-0.71)
    # beats b's (-1); rounded to whole numbers both are -1 and the tie would go to b (first)
    assert _one_more("zscore", b=[0, 1], a=[0, 0, 1]) == "a"


def test_zscore_ties_at_nine_decimals_go_to_group_order():
    # a's z-scores are ±1 (to 1e-12); b's are ±(1 - 1e-10) (the 1e-12 in the denominator over a
    # deviation of 0.01): equal to 9 decimals, so the tie on the second column goes to a (first)
    assert _one_more("zscore", a=[0, 1], b=[0, 0.02]) == "a"


def test_zscore_uses_the_population_deviation():
    # a = [0, 1]: z = ±1. b = [0, 0, 1, 2]: mean 0.75, deviation sqrt(2.75 / 4) = 0.829, so its
    # zeros have z = -0.905 > -1: the two extra units go to b. With the unbiased deviation
    # (sqrt(2.75 / 3)) a's -0.707 would beat b's -0.783
    params, groups, s = _toy(a=[0, 1], b=[0, 0, 1, 2])
    assert allocation.counts("zscore", params, groups, s, max_params=4) == {"a": 1, "b": 3}


def test_zscore_of_a_nearly_constant_group_is_small():
    # a's scores differ by 1e-12: z = ±0.5e-12 / (0.5e-12 + 1e-12) = ±1/3, not ±1 (a negative
    # epsilon would give ∓1): a's second column (-1/3) beats b's (-1) although b comes first
    assert _one_more("zscore", b=[0, 1], a=[0, 1e-12]) == "a"


def test_unknown_allocation_message_lists_the_choices():
    params, groups, s = _toy(a=[1, 2])
    with pytest.raises(ValueError) as err:
        allocation.counts("flap", params, groups, s, max_params=2)
    assert str(err.value) == "allocation must be one of global, zscore, protect, depth, got 'flap'"


# ---- func: decoding with a cache, the block driver, obs scores (profile func) -------------------


def _llama(**kw):
    cfg = llama.Config(**{**dict(vocab_size=11, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4,
                                 ffn_dim=5, max_seq_len=8, init_std=0.3), **kw})
    return cfg, llama.init(cfg, seed=0, dtype=torch.float64)


def test_cache_in_another_dtype_is_kept_and_decodes():
    # a float64 cache for float32 weights: init_cache honours dtype=, decode writes the new keys
    # and values in the cache's dtype and attends in the weights' dtype
    cfg, params = _llama()
    params = {k: v if k == "layers" else v.float() for k, v in params.items()}
    params["layers"] = tuple({k: v.float() for k, v in p.items()} for p in params["layers"])
    seq = torch.tensor([[1, 2, 3, 4]])
    cache = init_cache(params, cfg, batch=1, max_len=4, dtype=torch.float64)
    assert {c[k].dtype for c in cache["layers"] for k in "kv"} == {torch.float64}
    got, cache = decode(params, cache, seq[:, :3], 0, cfg)
    last, cache = decode(params, cache, seq[:, 3:], 3, cfg)
    assert cache["layers"][0]["k"].dtype == torch.float64 and last.dtype == torch.float32
    torch.testing.assert_close(torch.cat([got, last], 1), llama.forward(params, seq, cfg), atol=1e-5, rtol=1e-5)
    # without dtype=: the embedding's
    assert init_cache(params, cfg, batch=1, max_len=2)["layers"][0]["v"].dtype == torch.float32


def test_two_tokens_at_a_time_and_the_whole_cache_path_equal_the_full_forward():
    cfg, params = _llama()
    seq = torch.tensor([[1, 2, 3, 4, 5, 6]])
    full = llama.forward(params, seq, cfg)
    cache = init_cache(params, cfg, batch=1, max_len=8)
    parts = []
    for t in range(0, 6, 2):  # eager decode, 2 tokens per call: causal within the pair
        logits, cache = decode(params, cache, seq[:, t:t + 2], t, cfg)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, 1), full)
    # end=None (what the compiled decoder runs): the whole cache, empty slots masked off, also for
    # a single new token
    fam = family_of(cfg)
    cache = init_cache(params, cfg, batch=1, max_len=8)
    pos = lambda a, b: torch.arange(a, b)  # noqa: E731
    first, cache = run(fam.embed, fam.layer, fam.head, params, seq[:, :5], cfg, pos(0, 5), cache)
    one, cache = run(fam.embed, fam.layer, fam.head, params, seq[:, 5:], cfg, pos(5, 6), cache)
    torch.testing.assert_close(torch.cat([first, one], 1), full)


def test_init_cache_bounds_and_messages():
    cfg, params = _llama()
    assert init_cache(params, cfg, batch=1, max_len=1)["layers"][0]["k"].shape[2] == 1
    assert init_cache(params, cfg, batch=1, max_len=8)["layers"][0]["k"].shape[2] == 8  # = max_seq_len
    for bad in (0, 9):
        with pytest.raises(ValueError) as err:
            init_cache(params, cfg, batch=1, max_len=bad)
        assert str(err.value) == (f"max_len={bad} must be in [1, max_seq_len=8]: shorten the prompt or "
                                  "ask for fewer new tokens")
    with pytest.raises(ValueError) as err:
        init_cache(params, cfg, batch=0, max_len=2)
    assert str(err.value) == "batch must be >= 1, got 0"


def test_an_encoder_has_no_cache_message():
    cfg = vit.Config(image_size=2, patch_size=1, n_channels=1, dim=2, n_layers=1, n_heads=1, ffn_dim=2,
                     n_classes=2)
    with pytest.raises(ValueError) as err:
        init_cache(vit.init(cfg, seed=0), cfg, batch=1, max_len=1)
    assert str(err.value) == ("the 'vit' family is an encoder (bidirectional attention over a whole input): "
                              "it has no key/value cache and no token-by-token decoding")


def _calib(cfg, n=2):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, cfg.vocab_size, (2, 5), generator=g) for _ in range(n)]


def test_obs_scores_have_the_groups_shapes_and_report_each_layer():
    cfg, dense = _llama()  # 2 KV heads x 2 value dims: vo scores are [blocks, units]
    groups = llama.coupled_groups(cfg)
    calls = []
    scores = obs_scores(dense, cfg, groups, _calib(cfg), on_layer=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2)]
    assert {n: tuple(s.shape) for n, s in scores.items()} == \
        {g.name: g.sizes(dense) for g in groups if g.kind != "qk"}
    # the default ridge is reconstruct's 1e-2
    again = obs_scores(dense, cfg, groups, _calib(cfg), ridge=1e-2)
    assert all(torch.equal(scores[n], again[n]) for n in scores)


def test_obs_scores_of_some_groups_only():
    # layer 1's groups alone (layer 0 has none); a group of only its output-projection member
    # scores as the whole group (the rows of W_out are all that count)
    cfg, dense = _llama()
    groups = [g for g in llama.coupled_groups(cfg) if g.members[0].path[1] == 1 and g.kind != "qk"]
    full = obs_scores(dense, cfg, groups, _calib(cfg))
    assert set(full) == {g.name for g in groups}
    outs = [Group(g.name, g.kind, tuple(m for m in g.members if m.path[-1] in ("wo", "w_down")))
            for g in groups]
    alone = obs_scores(dense, cfg, outs, _calib(cfg))
    assert all(torch.equal(full[n], alone[n]) for n in full)


def test_obs_scores_name_the_sublayer_with_non_finite_activations():
    cfg = gpt2.Config(vocab_size=11, dim=4, n_layers=2, n_heads=2, ffn_dim=3, max_seq_len=8)
    dense = gpt2.init(cfg, seed=0, dtype=torch.float64)
    layers = [dict(p) for p in dense["layers"]]
    layers[1]["w_in"] = layers[1]["w_in"].clone().fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite activations at layers.1.mlp"):
        obs_scores({**dense, "layers": tuple(layers)}, cfg, gpt2.coupled_groups(cfg), _calib(cfg))


def test_inplace_decode_writes_the_given_cache_in_its_dtype():
    cfg, params = _llama()
    params = {k: v if k == "layers" else v.float() for k, v in params.items()}
    params["layers"] = tuple({k: v.float() for k, v in p.items()} for p in params["layers"])
    seq = torch.tensor([[1, 2, 3]])
    cache = init_cache(params, cfg, batch=1, max_len=3, dtype=torch.float64)
    logits, new = decode(params, cache, seq, 0, cfg, inplace=True)
    for c, n in zip(cache["layers"], new["layers"]):  # the same tensors, written
        assert c["k"] is n["k"] and c["v"] is n["v"] and float(c["k"].abs().sum()) > 0
    torch.testing.assert_close(logits, llama.forward(params, seq, cfg), atol=1e-5, rtol=1e-5)


def test_passthrough_keeps_the_functions_name():
    import functools
    from ecospa.func._block import passthrough

    def mlp(p, x, cfg):
        return x
    assert passthrough(mlp).__name__ == "mlp"
    part = passthrough(functools.partial(mlp))  # no __name__: "inner"
    assert part.__name__ == "inner" and part({}, 1, None, None, "c") == (1, "c")


# ---- func: padding and compacting (profile func) ------------------------------------------------


def _gpt2(ffn=5, layers=1):
    cfg = gpt2.Config(vocab_size=11, dim=4, n_layers=layers, n_heads=2, ffn_dim=ffn, max_seq_len=8)
    return cfg, gpt2.init(cfg, seed=0, dtype=torch.float64)


def _with_layer(params, i, **leaves):
    layers = [dict(p) for p in params["layers"]]
    layers[i].update(leaves)
    return {**params, "layers": tuple(layers)}


def test_compact_drops_a_unit_only_when_a_whole_factor_is_zero():
    # GPT-2 MLP: the side-less factor is w_in's column with b_in's entry (gelu(0) = 0), side b is
    # w_out's row. Unit 1: w_in column and b_in zero, w_out row not: dropped. Unit 2: w_in column
    # zero, b_in not: kept (gelu(b) != 0). Unit 3: b_in zero, w_in column not: kept.
    cfg, params = _gpt2()
    p = params["layers"][0]
    w_in, b_in = p["w_in"].clone(), p["b_in"].clone() + 0.5
    w_in[:, 1] = 0
    b_in[1] = 0
    w_in[:, 2] = 0
    b_in[3] = 0
    tree = _with_layer(params, 0, w_in=w_in, b_in=b_in)
    out = padding.compact(tree, cfg)
    q = out["layers"][0]
    assert torch.equal(q["w_in"], w_in[:, [0, 2, 3, 4]]) and torch.equal(q["b_in"], b_in[[0, 2, 3, 4]])
    assert torch.equal(q["w_out"], p["w_out"][[0, 2, 3, 4]])
    torch.testing.assert_close(gpt2.forward(out, torch.tensor([[1, 2, 3]]), cfg),
                               gpt2.forward(tree, torch.tensor([[1, 2, 3]]), cfg))


def test_compact_of_a_layer_with_no_live_unit_keeps_unit_zero():
    cfg, params = _gpt2()
    p = params["layers"][0]
    tree = _with_layer(params, 0, w_out=torch.zeros_like(p["w_out"]))
    q = padding.compact(tree, cfg)["layers"][0]
    assert torch.equal(q["w_in"], p["w_in"][:, [0]]) and torch.equal(q["b_in"], p["b_in"][[0]])
    assert torch.equal(q["w_out"], torch.zeros(1, 4, dtype=torch.float64))


def test_nonzero_puts_blocks_first_when_the_block_axis_comes_after_the_unit_axis():
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # [units=2, blocks=3]
    assert padding._nonzero(x, 0, 1).tolist() == [[True, False], [False, False], [False, True]]


def test_pad_messages_and_the_padded_ffn_width():
    cfg, params = _gpt2(ffn=5, layers=2)
    with pytest.raises(ValueError) as err:
        padding.pad({**params, "layers": params["layers"][:1]}, cfg)
    assert str(err.value) == "the tree has 1 layers but the config says n_layers=2"
    wide = gpt2.Config(vocab_size=11, dim=4, n_layers=2, n_heads=4, ffn_dim=5, max_seq_len=8)
    with pytest.raises(ValueError) as err:  # 2 heads of 2 value dims read as 4 heads of 1
        padding.pad(params, wide)
    assert str(err.value) == "layers.0.wq: a width of 2 exceeds the dense size 1"
    # a tree wider than its config's ffn_dim pads to its widest layer, and says so
    small = gpt2.Config(vocab_size=11, dim=4, n_layers=2, n_heads=2, ffn_dim=3, max_seq_len=8)
    padded, pcfg = padding.pad(params, small)
    assert pcfg.ffn_dim == 5 and padded["layers"][0]["w_in"].shape == (4, 5)


def test_by_layer_refuses_groups_outside_one_layer():
    m = lambda *path: Member(path, 1, None, "b")  # noqa: E731
    one = Group("one", "mlp", (m("layers", 1, "w"),))  # a single member is enough
    assert padding._by_layer([one], 2) == [[], [one]]
    for bad in [(m("layers", 0, "w"), m("layers", 1, "w")), (m("layers", 0, "mlp", "w"),),
                (m("blocks", 0, "w"),)]:
        with pytest.raises(ValueError) as err:
            padding._by_layer([Group("g", "mlp", bad)], 2)
        assert str(err.value) == "group 'g': padding needs members at ('layers', i, leaf)"


def test_reconstruct_defaults_are_ridge_1e_2_and_the_bias_refit():
    cfg, dense = _gpt2(ffn=5, layers=2)
    groups = gpt2.coupled_groups(cfg)
    from ecospa.prune import slice_units
    keep = {g.name: torch.arange(g.sizes(dense)[1] - 1)[None].expand(g.sizes(dense)[0], -1)
            for g in groups}
    pruned = slice_units(dense, groups, keep)
    calib = _calib(cfg)
    got = reconstruct(pruned, dense, cfg, calib)
    want = reconstruct(pruned, dense, cfg, calib, ridge=1e-2, bias=True)
    for a, b in zip(torch.utils._pytree.tree_leaves(got), torch.utils._pytree.tree_leaves(want)):
        assert torch.equal(a, b)
    assert not torch.equal(got["layers"][0]["b_out"], pruned["layers"][0]["b_out"])


def test_uniform_keep_fills_a_head_with_its_lowest_index_dead_units():
    alive = torch.zeros(2, 40, dtype=torch.bool)
    alive[0, ::2] = True      # 20 live units: every head keeps 20
    alive[1, 30:35] = True    # 5 live units, then its 15 lowest-index dead ones
    keep = padding._uniform_keep(alive)
    assert keep[0].tolist() == list(range(0, 40, 2))
    assert keep[1].tolist() == list(range(15)) + list(range(30, 35))


# ---- func: reconstruct's solve, checks and messages (profile func) ------------------------------


def test_ridge_solve_on_a_small_gram_and_an_indefinite_one():
    c = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)
    w = torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=torch.float64)
    # G = 0.01 I: lam = 0.5 x 0.01 (the 1e-12 floor does not apply): (C + lam W) / (0.01 + lam)
    got = ridge_solve(0.01 * torch.eye(2, dtype=torch.float64), c, w, 0.5)
    torch.testing.assert_close(got, (c + 0.005 * w) / 0.015)
    # numerically indefinite (Cholesky fails at the first or a later minor): least squares
    for diag, lam in (([-1.0, 3.0], 1e-2), ([1.0, -3.0], 1e-14)):  # mean diagonal -1: floored
        g = torch.diag(torch.tensor(diag, dtype=torch.float64))
        a = g + lam * torch.eye(2, dtype=torch.float64)
        torch.testing.assert_close(ridge_solve(g, c, w, 1e-2), torch.linalg.solve(a, c + lam * w))


def test_reconstruct_input_messages():
    cfg, dense = _gpt2(ffn=3, layers=2)
    calib = _calib(cfg)
    need = "reconstruct needs two parameter trees of the model family (dicts with 'layers')"
    for params, other in [((), dense), (dense, ()), (dense, {"embed": 1}), ({"embed": 1}, dense),
                          ("layers", dense), (dense, "layers")]:  # a str holds "layers" too
        with pytest.raises(ValueError) as err:
            reconstruct(params, other, cfg, calib)
        assert str(err.value) == need
    other_cfg, other = _gpt2(ffn=3, layers=2)
    other = {**other, "wte": torch.zeros(12, 4, dtype=torch.float64)}
    with pytest.raises(ValueError) as err:
        reconstruct(dense, other, cfg, calib)
    assert str(err.value) == "pruned and dense trees do not match: embedding (11, 4) vs (12, 4)"
    with pytest.raises(ValueError) as err:
        reconstruct(dense, dense, cfg, [])
    assert str(err.value) == "reconstruct needs at least one calibration batch of token ids [B, T]"


def test_reconstruct_names_a_non_finite_target_and_keeps_dtypes_and_reports_layers():
    cfg, dense = _gpt2(ffn=3, layers=2)
    bad = _with_layer(dense, 0, w_out=dense["layers"][0]["w_out"].clone().fill_(float("nan")))
    with pytest.raises(ValueError) as err:  # the pruned model is finite, the dense target is not
        reconstruct(dense, bad, cfg, _calib(cfg))
    assert str(err.value) == ("non-finite activations at layers.0.mlp during reconstruction; the model or "
                              "the calibration batch is broken (NaN/inf weights?)")
    f32 = {k: v if k == "layers" else v.float() for k, v in dense.items()}
    f32["layers"] = tuple({k: v.float() for k, v in p.items()} for p in dense["layers"])
    calls = []
    out = reconstruct(f32, f32, cfg, _calib(cfg), on_layer=lambda i, n: calls.append((i, n)))
    assert calls == [(0, 2), (1, 2)]
    assert {x.dtype for x in torch.utils._pytree.tree_leaves(out)} == {torch.float32}


def test_block_driver_honours_positions_and_leaves_the_given_cache_alone():
    cfg, params = _llama()
    fam = family_of(cfg)
    seq = torch.tensor([[1, 2]])
    pos = torch.tensor([0, 3])  # not contiguous: RoPE sees a distance of 3
    cache = init_cache(params, cfg, batch=1, max_len=4)
    run(fam.embed, fam.layer, fam.head, params, seq, cfg, pos, cache)  # no inplace=: a new cache
    assert all(float(c["k"].abs().sum()) == 0 == float(c["v"].abs().sum()) for c in cache["layers"])
    # without a cache the positions still reach RoPE: only their distances count
    plain, none = run(fam.embed, fam.layer, fam.head, params, seq, cfg, pos)
    assert none is None
    torch.testing.assert_close(plain, run(fam.embed, fam.layer, fam.head, params, seq, cfg, pos + 5)[0])
    assert not torch.allclose(plain, llama.forward(params, seq, cfg))  # positions 0, 1


def test_decode_out_of_range_message():
    cfg, params = _llama()
    cache = init_cache(params, cfg, batch=1, max_len=3)
    with pytest.raises(ValueError) as err:
        decode(params, cache, torch.tensor([[1, 2]]), 2, cfg)
    assert str(err.value) == ("positions 2..3 do not fit a cache of 3 tokens; make the cache longer "
                              "(init_cache max_len)")


# ---- io: the compact export's reader and writer (profile io2) ------------------------------------


def _compact_case(**kw):
    cfg = llama.Config(**{**dict(vocab_size=11, dim=8, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=6,
                                 ffn_dim=5, max_seq_len=16, rope_theta=500.0, norm_eps=1e-6), **kw})
    return cfg, llama.init(cfg, seed=0)


@pytest.mark.parametrize("kw", [
    dict(attention_bias=True, tie_embeddings=True),
    dict(qk_norm=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
])
def test_compact_round_trip_keeps_every_config_field(kw):
    cfg, params = _compact_case(**kw)
    sd, conf = hf_compact.to_hf_compact(params, cfg)
    back_cfg, back = hf_compact.from_hf_compact(sd, json.loads(json.dumps(conf)))
    assert back_cfg == cfg
    _same_tree(back, params)


def test_compact_reader_defaults_for_absent_keys():
    cfg, params = _compact_case(n_kv_heads=6, rope_theta=10000.0, norm_eps=1e-5, max_seq_len=2048,
                                tie_embeddings=False)
    sd, conf = hf_compact.to_hf_compact(params, cfg)
    for key in ("num_key_value_heads", "rope_theta", "rms_norm_eps", "max_position_embeddings",
                "attention_bias", "tie_word_embeddings", "torch_dtype"):
        del conf[key]
    assert hf_compact.from_hf_compact(sd, conf)[0] == cfg


def test_compact_reader_messages():
    cfg, params = _compact_case()
    sd, conf = hf_compact.to_hf_compact(params, cfg)
    with pytest.raises(ValueError) as err:
        hf_compact.from_hf_compact(sd, {**conf, "num_hidden_layers": 1})
    assert str(err.value) == (
        "the config declares num_hidden_layers = 1, but the weights hold 2 layers (model.layers.0 to "
        "model.layers.1); set num_hidden_layers (and layer_qk_pairs, layer_v_dims, layer_ffn_dims: one "
        "entry per layer) to 2 to match the weights, or use the config.json that was written with them")
    for bad in ([5], [5, True], [5, 0], [5, 2**31 + 1], (5, 5), [5, 5.0]):
        with pytest.raises(ValueError) as err:
            hf_compact.from_hf_compact(sd, {**conf, "layer_ffn_dims": bad})
        assert str(err.value) == (f"config 'layer_ffn_dims' must list 2 whole numbers >= 1 (one per layer), "
                                  f"got {bad!r}")
    with pytest.raises(ValueError, match="has shape"):  # 2**31 passes the list check, not the tensors'
        hf_compact.from_hf_compact(sd, {**conf, "layer_ffn_dims": [5, 2**31]})


# ---- io: what an export may replace (profile io2) ------------------------------------------------


def test_an_export_holding_the_working_directory_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "export"
    hf_write.write_hf({"w": torch.zeros(2)}, {"model_type": "x"}, str(out))
    (out / "sub").mkdir()
    monkeypatch.chdir(out / "sub")
    with pytest.raises(UsageError) as err:
        hf_write.check_export_target(str(out))
    assert str(err.value) == (f"the export directory {str(out)!r} holds the working directory; an export "
                              "replaces its whole directory, so choose a new or dedicated one")


def test_compact_export_is_llama_only_and_keeps_frequencies_float32():
    cfg, params = _gpt2()
    with pytest.raises(ValueError) as err:
        hf_compact.to_hf_compact(params, cfg)
    assert str(err.value) == "hf-compact supports the llama family only, got Config; use the hf-padded format"
    cfg, params = _llama()  # every leaf float64 (the frequencies too): they are written as float32
    params = torch.utils._pytree.tree_map(lambda x: x.double(), params)
    sd, _ = hf_compact.to_hf_compact(params, cfg)
    assert sd["model.layers.0.self_attn.inv_freq"].dtype == torch.float32
    assert sd["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float64


def _same_tree(a, b):
    pa, ta = torch.utils._pytree.tree_flatten_with_path(a)
    pb, tb = torch.utils._pytree.tree_flatten_with_path(b)
    assert ta == tb  # the same keys
    for (ka, x), (kb, y) in zip(pa, pb):
        assert ka == kb and x.dtype == y.dtype and torch.equal(x, y), ka


def test_compact_reader_ties_heads_and_refuses_what_the_config_does_not_describe():
    cfg, params = _compact_case(tie_embeddings=False)
    sd, conf = hf_compact.to_hf_compact(params, cfg)
    assert conf["architectures"] == ["EcospaLlamaForCausalLM"] and conf["model_type"] == "ecospa_llama"
    assert conf["torch_dtype"] == "float32"
    _same_tree(hf_compact.from_hf_compact(sd, conf)[1], params)  # an own head: params["lm_head"]
    # an untied config whose head equals the embedding: tied, no lm_head leaf
    same = {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()}
    tied_cfg, tied = hf_compact.from_hf_compact(same, conf)
    assert tied_cfg.tie_embeddings is True and "lm_head" not in tied
    # a tied config: a saved head equal to the embedding is accepted, another one is not
    tconf = {**conf, "tie_word_embeddings": True}
    assert "lm_head" not in hf_compact.from_hf_compact(same, tconf)[1]
    with pytest.raises(ValueError) as err:
        hf_compact.from_hf_compact(sd, tconf)
    assert str(err.value) == ("the weights hold 1 tensors the config does not describe, e.g. ['lm_head.weight']; "
                              "does config.json belong to these weights?")
    extra = {**sd, **{f"x.{i}": torch.zeros(1) for i in range(4)}}
    with pytest.raises(ValueError) as err:
        hf_compact.from_hf_compact(extra, conf)
    assert str(err.value) == ("the weights hold 4 tensors the config does not describe, e.g. ['x.0', 'x.1', "
                              "'x.2']; does config.json belong to these weights?")
    gone = dict(sd)
    del gone["model.norm.weight"]
    with pytest.raises(ValueError) as err:
        hf_compact.from_hf_compact(gone, conf)
    assert str(err.value) == "the compact export lacks the tensor 'model.norm.weight'"


def test_compact_reader_dtype_and_float32_frequencies_and_corrupt_slots():
    cfg, params = _compact_case(qk_norm=True)
    sd, conf = hf_compact.to_hf_compact(params, cfg)
    sd64 = {k: v.double() for k, v in sd.items() if k.endswith("inv_freq")}
    got = hf_compact.from_hf_compact({**sd, **sd64}, conf, dtype=torch.float64)[1]
    assert got["embed"].dtype == torch.float64 and got["layers"][0]["attn_norm"].dtype == torch.float64
    assert got["layers"][0]["inv_freq"].dtype == torch.float32
    slots = sd["model.layers.1.self_attn.qk_slots"].flip(-1)
    with pytest.raises(ValueError) as err:
        hf_compact.from_hf_compact({**sd, "model.layers.1.self_attn.qk_slots": slots}, conf)
    assert str(err.value) == ("model.layers.1.self_attn.qk_slots disagrees with the layer's inv_freq; the "
                              "export is corrupt")


def test_save_hf_compact_adds_config_extra(tmp_path):
    cfg, params = _compact_case()
    out = hf_compact.save_hf_compact(params, cfg, str(tmp_path / "c"), config_extra={"bos_token_id": 3})
    conf = json.loads((tmp_path / "c" / "config.json").read_text())
    assert out == str(tmp_path / "c") and conf["bos_token_id"] == 3 and conf["layer_ffn_dims"] == [5, 5]


# ---- train: the run directory, checkpoints and resume (profile train) --------------------------

def test_checkpointer_where_names_the_schedule_or_the_last_good_checkpoint():
    from pathlib import Path

    from ecospa.train.saving import Checkpointer
    ck = Path("runs") / "r" / "checkpoint"
    assert Checkpointer(ck, None, None, 5, None).where() == ("no checkpoint was written "
                                                             "(checkpoints every 5 steps)")
    assert Checkpointer(ck, None, None, 0, None).where() == ("no checkpoint was written "
                                                             "(--ckpt-every 0: only at the end)")
    assert Checkpointer(ck, None, None, 5, 10).where() == (f"the last good checkpoint (step 10) in {ck} "
                                                           "is intact")


def test_resume_without_a_checkpoint_message(tmp_path):
    from ecospa.train.saving import load_for_resume, stored_config
    ck = tmp_path / "checkpoint"
    want = (f"--resume: {ck}: no checkpoint directory here: there is no checkpoint to continue "
            "from; start a new run without --resume (with --overwrite if the directory holds an "
            "unfinished one)")
    for read in (stored_config, lambda p: load_for_resume(p, None)):
        with pytest.raises(UsageError) as err:
            read(ck)
        assert str(err.value) == want


def test_resuming_a_checkpoint_not_written_by_train_names_it(tmp_path):
    from ecospa.io import checkpoint
    from ecospa.train.saving import load_for_resume, stored_config
    from test_train import MICRO
    ck = tmp_path / "checkpoint"
    checkpoint.save(ck, llama.init(MICRO.model, seed=0), MICRO.model, extra={"tokenizer": None})
    for read in (stored_config, lambda p: load_for_resume(p, MICRO)):
        with pytest.raises(UsageError) as err:
            read(ck)
        assert str(err.value) == (f"--resume: {ck} was not written by `ecospa train` (it holds no "
                                  "training state; `ecospa compress` writes such checkpoints): "
                                  "evaluate or compress it instead, or start a new run in another "
                                  "--out")


def test_trim_metrics_keeps_the_checkpoints_steps_and_skips_what_is_not_a_record(tmp_path):
    from ecospa.train.rundir import trim_metrics
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n{"step": 2, "lo\xff\xfe\n[1, 2]\n{"step": "x"}\n'
                     b'{"loss": 3.0}\n{"step": 1.5}\n{"step": 2, "loss": 1.5}\n'
                     b'{"event": "prune", "step": 2}\n{"step": 3, "loss": 1.0}\n')
    trim_metrics(path, 2)
    # a prune event at the checkpoint's step happens after it: written again by the resumed run
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n'


def test_summary_json_is_indented_one_space_per_level(tmp_path):
    from ecospa.train.rundir import write_json
    write_json(tmp_path / "summary.json", {"a": 1, "b": [2]})
    assert (tmp_path / "summary.json").read_text() == '{\n "a": 1,\n "b": [\n  2\n ]\n}'


@pytest.fixture(scope="module")
def micro_checkpoint(tmp_path_factory):
    """A complete training checkpoint of the tests' micro run as ``checkpoint.load_full`` returns
    it (built in memory: the state ``train`` saves), its config and its path."""
    import dataclasses

    from ecospa import optim
    from ecospa._tree import count_params
    from ecospa.func.families import family
    from ecospa.io.checkpoint import Checkpoint
    from ecospa.schedule import dense_sizes
    from ecospa.train.config import config_json
    from test_train import MICRO
    cfg = dataclasses.replace(MICRO, out=str(tmp_path_factory.mktemp("run")))
    params = llama.init(cfg.model, seed=0)
    groups = family(cfg.model.name).coupled_groups(cfg.model)
    extra = {"train_config": config_json(cfg), "dense": dense_sizes(params, groups),
             "dense_params": count_params(params), "rounds_done": []}
    ck = Checkpoint(params, cfg.model, extra, optim.adamw(cfg.lr).init(params), (), 1)
    return cfg, tmp_path_factory.mktemp("out") / "checkpoint", ck


def test_resume_needs_every_piece_of_the_training_state(micro_checkpoint, monkeypatch):
    from ecospa.io import checkpoint
    from ecospa.train.saving import load_for_resume
    cfg, path, ck = micro_checkpoint
    loaded = []
    monkeypatch.setattr(checkpoint, "load_full", lambda p: loaded[-1])

    def resume(**change):
        extra = {**ck.extra, **change.pop("extra", {})}
        loaded.append(ck._replace(extra=extra, **change))
        return load_for_resume(path, cfg)

    assert resume().step == 1 and resume(step=0).step == 0  # a checkpoint at step 0 resumes too
    incomplete = (f"{path}: the training state in the checkpoint is incomplete (dense sizes, rounds, "
                  "optimizer or importance state, step)")
    for change in ({"extra": {"dense": None}}, {"extra": {"dense_params": None}},
                   {"extra": {"dense_params": 1.0}}, {"extra": {"rounds_done": None}},
                   {"opt_state": None}, {"state": None}, {"step": None}, {"step": True},
                   {"step": -1}):
        with pytest.raises(ValueError) as err:
            resume(**change)
        assert str(err.value) == incomplete, change
    with pytest.raises(UsageError) as err:
        resume(step=20)  # the run's own settings, but a checkpoint past its 13 steps
    assert str(err.value) == ("--steps 13 is below the checkpoint's step 20: a resumed run cannot go back; "
                              "give --steps 20 or more (or leave it out)")
    nan = ck.params | {"norm": ck.params["norm"] * float("nan")}
    with pytest.raises(ValueError) as err:
        resume(params=nan)
    assert str(err.value) == (f"{path} holds NaN or inf parameters (written after the loss diverged, "
                              "by an ecospa before issue 9's fix); start a new run (--overwrite) with "
                              "a lower learning rate")


def test_timer_skips_the_first_steps_after_each_change_and_counts_phases_apart():
    from ecospa.train.loop import _Timer
    t = _Timer()  # skips 3 steps at the start and after each change
    assert t.rate("dense") is None and t.rate("pruned") is None
    for tokens in (1, 2, 3):
        t.add("dense", 1.0, tokens)
    assert t.rate("dense") is None
    t.add("dense", 2.0, 10)
    t.add(None, 1.0, 100)  # between rounds: no phase
    assert t.rate("dense") == 5.0 and t.rate("pruned") is None
    t.changed()
    for _ in range(3):
        t.add("pruned", 1.0, 7)
    t.add("pruned", 4.0, 8)
    assert t.rate("pruned") == 2.0 and t.rate("dense") == 5.0
    t.add("pruned", 1.0, 7)  # summed over the phase: 15 tokens in 5 s
    assert t.rate("pruned") == 3.0
    t = _Timer(skip=1)
    t.add("dense", 1.0, 1)
    t.add("dense", 1.0, 3)
    assert t.rate("dense") == 3.0


def test_a_round_keeps_what_its_schedule_asks_a_budget_by_score_widths_aligned():
    from ecospa.func.families import family
    from ecospa.groups import validate
    from ecospa.schedule import PruneSchedule, dense_sizes
    from ecospa.train.loop import _choose
    from test_train import MICRO
    params = llama.init(MICRO.model, seed=0)
    groups = family("llama").coupled_groups(MICRO.model)
    dense, sizes = dense_sizes(params, groups), validate(params, groups)
    gen = torch.Generator().manual_seed(0)
    scores = {g.name: torch.rand(sizes[g.name], generator=gen) for g in groups}
    schedule = PruneSchedule(warmup_steps=0, window=1, rounds=1, every=1, budget=0.5)
    keep = _choose(params, groups, scores, 0.5, dense, schedule)
    kept = sum(keep[g.name].numel() * g.numel_per_unit(params) for g in groups)
    assert kept <= 0.5 * sum(d[1] for d in dense.values())
    # spread over the groups by score, not half of each group's units (sparsity 0.5)
    assert {keep[g.name].shape[1] / sizes[g.name][1] for g in groups} != {0.5}
    schedule = PruneSchedule(warmup_steps=0, window=1, rounds=1, every=1, sparsity=0.3, multiple_of=8)
    keep = _choose(params, groups, scores, 0.3, dense, schedule)
    mlp = [keep[g.name].shape[1] for g in groups if g.kind == "mlp"]
    assert mlp == [32, 32]  # round(0.7 * 48) = 34 units, a multiple of 8


def test_targets_requested_and_reached_of_a_dense_and_a_pruned_tree():
    import dataclasses

    from ecospa import select, slice_units
    from ecospa._tree import count_params
    from ecospa.func.families import family
    from ecospa.groups import validate
    from ecospa.schedule import PruneSchedule, dense_sizes
    from ecospa.train.loop import _targets
    from test_train import MICRO
    params = llama.init(MICRO.model, seed=0)
    groups = family("llama").coupled_groups(MICRO.model)
    dense, n = dense_sizes(params, groups), count_params(params)
    dense_cfg = dataclasses.replace(MICRO, prune=PruneSchedule(rounds=0))
    assert _targets(dense_cfg, params, groups, dense, [], n) == (
        {"sparsity": 0.0, "budget": None, "rounds": 0},
        {"sparsity": {"qk": 0.0, "vo": 0.0, "mlp": 0.0}, "budget": 0.0, "rounds": 0, "param_reduction": 0.0})
    counts = {"layers.0.qk": 1, "layers.1.qk": 2, "layers.0.vo": 2, "layers.1.vo": 2,
              "layers.0.mlp": 24, "layers.1.mlp": 12}
    scores = {g.name: torch.rand(validate(params, groups)[g.name]) for g in groups}
    pruned = slice_units(params, groups, select(params, groups, scores, counts=counts))
    kept = count_params(pruned)
    requested, reached = _targets(MICRO, pruned, groups, dense, [[3, 0.25, 1], [7, 0.5, kept]], n)
    assert requested == {"sparsity": 0.5, "budget": None, "rounds": 2}
    assert reached == {"sparsity": {"qk": 1 - 3 / 4, "vo": 1 - 4 / 8, "mlp": 1 - 36 / 96},
                       "budget": (n - kept) / sum(d[1] for d in dense.values()), "rounds": 2,
                       "param_reduction": 1 - kept / n}
    assert _targets(MICRO, params, [], {}, [], n)[1] == {"sparsity": {}, "budget": 0.0, "rounds": 0,
                                                        "param_reduction": 0.0}  # no groups at all
    budget_cfg = dataclasses.replace(MICRO, prune=dataclasses.replace(MICRO.prune, sparsity=None, budget=0.4))
    assert _targets(budget_cfg, pruned, groups, dense, [], n)[0] == {"sparsity": None, "budget": 0.4, "rounds": 2}


# ---- io: the GGUF writer (profile io2, 'ecospa.io.gguf_export.*') ------------------------------

def _gguf_case(budget=0.5, **kw):
    import ecospa
    from strategies import random_scores
    cfg = llama.Config(vocab_size=37, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=24,
                       rope_theta=500.0, init_std=0.3, max_seq_len=64, **kw)
    params = llama.init(cfg, seed=1)
    if budget:
        groups = llama.coupled_groups(cfg)
        params = ecospa.pruner(groups, budget=budget)(params, random_scores(params, groups, 1))
    return cfg, params


def _gguf_fields(path) -> dict:
    import gguf
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()
            if not k.startswith("GGUF.")}


def test_save_gguf_messages(tmp_path, monkeypatch):
    import dataclasses
    import os
    import sys

    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case()

    def message(*args, **kw):
        with pytest.raises(ValueError) as err:
            save_gguf(*args, **kw)
        return str(err.value)
    assert message(params, cfg, tmp_path / "m.gguf", layout="tiny") == \
        "layout must be one of ['compact', 'padded'], got 'tiny'"
    assert message(gpt2.init(gpt2.Config()), gpt2.Config(), tmp_path / "g.gguf") == \
        "GGUF export supports the llama family only, got Config"
    biased = dataclasses.replace(cfg, attention_bias=True)
    assert message(llama.init(biased), biased, tmp_path / "b.gguf") == (
        "GGUF export of models with q/k/v biases (Qwen2-style) is not supported: llama.cpp's llama "
        "and deci architectures have no attention biases")
    normed = dataclasses.replace(cfg, qk_norm=True)
    assert message(llama.init(normed), normed, tmp_path / "n.gguf") == (
        "GGUF export of Qwen3 (q/k norms) is not supported: llama.cpp's llama and deci "
        "architectures have no q/k norms; use --format hf-padded")
    assert message(params, cfg, tmp_path / "m.gguf", dtype="bf16") == "dtype must be 'f32' or 'f16', got 'bf16'"
    path = str(tmp_path / "m.bin")
    assert message(params, cfg, path) == f"{path!r}: a GGUF file name must end in .gguf"
    (tmp_path / "d.gguf").mkdir()
    path = str(tmp_path / "d.gguf")
    assert message(params, cfg, path, overwrite=True) == f"{path!r} is a directory; give a file name ending in .gguf"
    (tmp_path / "e.gguf").write_bytes(b"user data")
    path = str(tmp_path / "e.gguf")
    assert message(params, cfg, path) == f"{path!r} exists; choose another name or pass overwrite=True (--overwrite)"
    layers = list(params["layers"])
    layers[1] = {**layers[1], "w_gate": layers[1]["w_gate"][:, :0], "w_up": layers[1]["w_up"][:, :0],
                 "w_down": layers[1]["w_down"][:0]}
    assert message({**params, "layers": tuple(layers)}, cfg, tmp_path / "c.gguf", layout="compact") == (
        "layer 1 has no MLP neuron left; the gguf-compact layout needs at least one per layer (export "
        "it with --format gguf, which pads)")
    monkeypatch.setitem(sys.modules, "gguf", None)
    assert message(params, cfg, tmp_path / "m.gguf") == "writing GGUF files needs the 'gguf' package: pip install gguf"
    assert sorted(os.listdir(tmp_path)) == ["d.gguf", "e.gguf"]


def test_save_gguf_reports_what_it_wrote(tmp_path):
    import os

    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case()
    attention = ("pruned attention written padded (zero Q/K pairs and V/O dims): exact, but llama.cpp "
                 "computes the full head size")
    path = os.path.join(str(tmp_path), "sub", "p.gguf")  # the directory is made
    assert save_gguf(params, cfg, path) == {
        "path": path, "layout": "padded", "architecture": "llama", "ffn_width": 24, "mlp_widths": [13, 14, 7],
        "notes": ["MLP widths 7..14 padded with zeros to 24 (llama.cpp's llama architecture has one "
                  "feed_forward_length; --format gguf-compact writes the kept neurons only)", attention]}
    assert save_gguf(params, cfg, tmp_path / "c.gguf", layout="compact")["notes"] == [
        "llama.cpp 'deci' architecture: per-layer MLP widths 7..14 (dense 24)", attention]
    dense = llama.init(cfg, seed=1)
    assert save_gguf(dense, cfg, tmp_path / "d.gguf")["notes"] == []
    # every MLP pruned to the same width, attention whole; then only the V/O dims pruned
    even = {**dense, "layers": tuple({**p, "w_gate": p["w_gate"][:, :12], "w_up": p["w_up"][:, :12],
                                      "w_down": p["w_down"][:12]} for p in dense["layers"])}
    assert save_gguf(even, cfg, tmp_path / "e.gguf")["notes"] == [
        "MLP widths 12..12 padded with zeros to 24 (llama.cpp's llama architecture has one "
        "feed_forward_length; --format gguf-compact writes the kept neurons only)"]
    vo = {**dense, "layers": tuple({**p, "wv": p["wv"][..., :2], "wo": p["wo"][:, :, :2]}
                                   if i == 2 else p for i, p in enumerate(dense["layers"]))}
    assert save_gguf(vo, cfg, tmp_path / "v.gguf")["notes"] == [attention]


def test_size_labels():
    from ecospa.io.gguf_export import _size_label
    got = [_size_label(n) for n in (999, 1000, 1500, 9500, 10_000, 10_400, 12_345, 1_000_000, 135_000_000,
                                    10**9, 1_700_000_000, 10**12, 3 * 10**12, 25 * 10**12)]
    assert got == ["999", "1K", "1.5K", "9.5K", "10K", "10K", "12K", "1M", "135M", "1B", "1.7B", "1T", "3T",
                   "25T"]


def test_general_metadata_of_a_dense_and_a_pruned_model():
    from ecospa.io.gguf_export import general_metadata

    def text(value):
        return {"value": value, "type": 8, "sub_type": None}
    assert general_metadata(None, "tiny", 200, 200, "padded") == {"general.name": text("tiny")}
    assert general_metadata({"general.name": text("")}, "tiny", 200, 200, "padded") == {"general.name": text("tiny")}
    assert general_metadata({"general.name": text("Src")}, "tiny", 200, 200, "padded") == {"general.name": text("Src")}
    assert general_metadata(None, "tiny", 50, 200, "padded") == {
        "general.name": text("tiny (pruned by ecospa, 25% of weights)"),
        "general.size_label": text("50"),
        "general.description": text("model structurally pruned by ecospa: 50 of 200 weights kept (25.0%); "
                                    "GGUF layout 'padded' (pruned units padded with zeros to the dense shapes)")}
    source = {"general.name": text("Src"), "general.organization": text("Org"), "general.version": text("v2"),
              "general.repo_url": text("https://x"), "general.license": text("mit")}
    assert general_metadata(source, "tiny", 1500, 2000, "compact") == {
        **source,
        "general.name": text("Src (pruned by ecospa, 75% of weights)"),
        "general.size_label": text("1.5K"),
        "general.description": text("Src structurally pruned by ecospa: 1,500 of 2,000 weights kept (75.0%); "
                                    "GGUF layout 'compact' (per-layer MLP widths in deci.feed_forward_length, "
                                    "attention padded)"),
        "general.base_model.count": {"value": 1, "type": 4, "sub_type": None},
        "general.base_model.0.name": text("Src"),
        "general.base_model.0.organization": text("Org"),
        "general.base_model.0.version": text("v2"),
        "general.base_model.0.repo_url": text("https://x")}
    empty = general_metadata({"general.name": text("Src"), "general.organization": text("")}, "tiny", 1, 2, "padded")
    assert "general.base_model.0.organization" not in empty and empty["general.base_model.0.name"] == text("Src")
    based = {"general.name": text("Src"), "general.base_model.count": {"value": 1, "type": 4, "sub_type": None},
             "general.base_model.0.name": text("Base")}
    got = general_metadata(based, "tiny", 1, 2, "padded")
    assert got["general.base_model.0.name"] == text("Base") and got["general.base_model.count"]["value"] == 1
    assert source["general.name"] == text("Src")  # the caller's dict is not changed


def test_gguf_leftovers_are_the_temporary_files_of_this_path_only(tmp_path):
    import os

    from ecospa.io.gguf_export import gguf_leftovers
    assert gguf_leftovers(str(tmp_path / "none" / "m.gguf")) == []
    for name in (".tmp-m.gguf-b", ".tmp-m.gguf-a", ".tmp-n.gguf-a", "m.gguf", ".tmp-m.gguf"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / ".tmp-m.gguf-dir").mkdir()
    os.symlink(tmp_path / "m.gguf", tmp_path / ".tmp-m.gguf-link")
    assert gguf_leftovers(str(tmp_path / "m.gguf")) == [str(tmp_path / ".tmp-m.gguf-a"), str(tmp_path / ".tmp-m.gguf-b")]


def test_gguf_header_tokenizer_metadata_and_f16_weights(tmp_path):
    import gguf

    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case(budget=0)
    tok = {"model": "llama", "pre": "", "tokens": [f"t{i}" for i in range(37)], "scores": [float(-i) for i in range(37)],
           "token_type": [1] * 37, "merges": [], "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": -1,
           "pad_token_id": True, "add_bos_token": True, "add_eos_token": 0, "chat_template": ""}
    save_gguf(params, cfg, tmp_path / "h.gguf", tokenizer_info=tok, dtype="f16")
    f = _gguf_fields(tmp_path / "h.gguf")
    assert {k: v for k, v in f.items() if k.startswith("llama.")} == {
        "llama.block_count": 3, "llama.context_length": 64, "llama.embedding_length": 16,
        "llama.feed_forward_length": 24, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.rope.dimension_count": 4, "llama.rope.freq_base": 500.0,
        "llama.attention.layer_norm_rms_epsilon": pytest.approx(cfg.norm_eps), "llama.vocab_size": 37}
    assert f["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_F16)
    assert f["general.name"] == "ecospa model"  # no name and no source metadata given
    tokenizer = {k: v for k, v in f.items() if k.startswith("tokenizer.")}
    assert tokenizer.pop("tokenizer.ggml.scores") == pytest.approx(tok["scores"])
    assert tokenizer == {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tok["tokens"],
                         "tokenizer.ggml.token_type": [1] * 37, "tokenizer.ggml.bos_token_id": 1,
                         "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.add_bos_token": True}
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "h.gguf")).tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.F16
    assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32  # norms stay f32
    assert types["output_norm.weight"] == gguf.GGMLQuantizationType.F32
    save_gguf(params, cfg, tmp_path / "h.gguf", dtype="f32", overwrite=True)
    f = _gguf_fields(tmp_path / "h.gguf")
    assert f["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert not any(k.startswith("tokenizer.") for k in f)


# ---- io: the export directory's writer, swap and recovery (profile io2, hf_write) --------------

def _export(out, **kw):
    return hf_write.write_hf({"w": torch.arange(3.0)}, {"model_type": "x"}, str(out), **kw)


def test_write_hf_under_a_dangling_link_names_the_parent_it_cannot_create(tmp_path):
    import os
    os.symlink(tmp_path / "nowhere", tmp_path / "link")
    with pytest.raises(UsageError) as err:
        _export(tmp_path / "link" / "exp")
    assert str(err.value) == f"cannot create {str(tmp_path / 'link')!r}: File exists"


def test_write_hf_writes_pt_safetensors_and_its_temporary_directory_is_a_findable_sibling(tmp_path, monkeypatch):
    import os

    from safetensors import safe_open
    out, seen = tmp_path / "exp", []
    real = hf_write.save_file

    def save_file(sd, path, **kw):  # a kill here leaves the temporary directory beside the export
        seen.append((os.path.dirname(path), hf_write.export_leftovers(str(out))))
        return real(sd, path, **kw)
    monkeypatch.setattr(hf_write, "save_file", save_file)
    assert _export(out, extra_files={"tokenizer.json": b"{}"}, config_extra={"bos_token_id": 1}) == str(out)
    (tmp, (tmps, olds)), = seen
    assert tmps == [tmp] and olds == [] and os.path.basename(tmp).startswith(".tmp-exp-")
    assert sorted(os.listdir(tmp_path)) == ["exp"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    conf = json.loads((out / "config.json").read_text())
    assert conf["bos_token_id"] == 1 and conf["model_type"] == "x"
    assert sorted(conf[hf_write.EXPORT_MARKER]["files"]) == ["model.safetensors", "tokenizer.json"]
    assert (out / "tokenizer.json").read_bytes() == b"{}"
    _export(out)  # an intact earlier export is replaced, leaving nothing beside it
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    assert sorted(os.listdir(tmp_path)) == ["exp"]


@pytest.mark.parametrize("name", ["", "a/b", ".hidden", "config.json", "model.safetensors"])
def test_write_hf_refuses_extra_file_names_and_keeps_the_previous_export(tmp_path, name):
    import os
    out = tmp_path / "exp"
    with pytest.raises(ValueError) as err:  # a first export: nothing is left
        _export(out, extra_files={name: b"x"})
    assert str(err.value) == f"extra file name {name!r} is not allowed in an export"
    assert os.listdir(tmp_path) == []
    _export(out)
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    with pytest.raises(ValueError) as err:
        _export(out, extra_files={"ok.txt": b"x", name: b"x"})
    assert str(err.value) == f"extra file name {name!r} is not allowed in an export"
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def _not_ours(tmp_path, out):
    raw = str(out)
    entries = sorted(p.name for p in out.iterdir())
    with pytest.raises(UsageError) as err:
        hf_write.check_export_target(raw)
    assert str(err.value) == (f"the export directory {raw!r} is not an ecospa export (it holds {entries[:3]}"
                              f"{'...' if len(entries) > 3 else ''}, and no config.json with an intact "
                              "'ecospa_export' record); an export replaces its directory, so choose a new "
                              "or empty one")


def test_only_an_intact_export_of_ours_may_be_replaced(tmp_path):
    import os
    out = tmp_path / "exp"
    _export(out, extra_files={"tokenizer.json": b"{}"})
    assert hf_write.check_export_target(str(out)) == str(out)
    conf = json.loads((out / "config.json").read_text())
    marker = conf[hf_write.EXPORT_MARKER]
    files = marker["files"]

    def with_config(text):
        (out / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        _not_ours(tmp_path, out)
    # files a bad record could name: they exist with the listed size and sha256, so only the
    # name rules (no separator, no leading dot) keep them from counting as the export's
    (out / ".tokenizer.json").write_bytes(b"{}")
    (out / "sub").mkdir()
    (out / "sub" / "x").write_bytes(b"{}")
    for changed in ({"kind": "other"}, {"files": None}, {"files": [1]},
                    {"files": {**files, "": files["tokenizer.json"]}},
                    {"files": {**files, "sub/x": files["tokenizer.json"]}},
                    {"files": {**files, ".tokenizer.json": files["tokenizer.json"]}},
                    {"files": {**files, "tokenizer.json": "x"}},
                    {"files": {**files, "tokenizer.json": {**files["tokenizer.json"], "bytes": 3}}},
                    {"files": {**files, "tokenizer.json": {**files["tokenizer.json"], "sha256": "0" * 64}}},
                    {"files": {**files, "missing.bin": files["tokenizer.json"]}}):
        with_config(json.dumps({**conf, hf_write.EXPORT_MARKER: {**marker, **changed}}))
    with_config(json.dumps({**conf, hf_write.EXPORT_MARKER: None}))
    with_config(json.dumps([conf]))
    with_config("{not json")
    with_config(b'{"a": "\xff\xfe"}')  # not UTF-8
    with_config("[" * 100000)  # deeper than json's recursion limit
    os.symlink(out / ".tokenizer.json", out / "link")
    with_config(json.dumps({**conf, hf_write.EXPORT_MARKER: {**marker, "files": {**files, "link": files["tokenizer.json"]}}}))
    (out / "config.json").unlink()
    (out / "config.json").mkdir()
    _not_ours(tmp_path, out)
    (out / "config.json").rmdir()
    (tmp_path / "c.json").write_text(json.dumps(conf))
    os.symlink(tmp_path / "c.json", out / "config.json")
    _not_ours(tmp_path, out)
    assert sorted(p.name for p in out.iterdir()) == [".tokenizer.json", "config.json", "link",
                                                       "model.safetensors", "sub", "tokenizer.json"]


def test_export_leftovers_and_the_recovery_of_an_interrupted_swap(tmp_path):
    import os
    import time
    out = tmp_path / "exp"
    assert hf_write.export_leftovers(str(tmp_path / "none" / "exp")) == ([], [])
    assert hf_write.interrupted_export(str(out)) is None and hf_write.recover_export(str(out)) is None
    _export(tmp_path / "exp.old-a")
    _export(tmp_path / "exp.old-b", extra_files={"x.txt": b"newer"})
    os.utime(tmp_path / "exp.old-a", (time.time() - 100, time.time() - 100))
    (tmp_path / "exp.old-c").mkdir()  # not an intact export: removed, never restored
    (tmp_path / ".tmp-exp-1").mkdir()
    (tmp_path / ".tmp-exp-2").write_bytes(b"")  # a file, not a directory of ours
    (tmp_path / ".tmp-other-1").mkdir()
    (tmp_path / "exp.old-link").symlink_to(tmp_path / "exp.old-a")
    want = ([str(tmp_path / ".tmp-exp-1")],
            [str(tmp_path / f"exp.old-{k}") for k in "abc"])
    assert hf_write.export_leftovers(str(out)) == want
    assert hf_write.export_leftovers(str(out) + os.sep) == want
    assert hf_write.interrupted_export(str(out)) == str(tmp_path / "exp.old-b")  # the newest intact
    assert hf_write.recover_export(str(out)) == str(tmp_path / "exp.old-b")
    assert (out / "x.txt").read_bytes() == b"newer"
    assert sorted(os.listdir(tmp_path)) == [".tmp-exp-2", ".tmp-other-1", "exp", "exp.old-link"]
    assert hf_write.interrupted_export(str(out)) is None  # something is at the path now


def test_check_export_target_messages_name_the_flag_and_the_link_rule(tmp_path):
    """An empty path and a symbolic link are refused with whole messages naming the flag."""
    import os
    with pytest.raises(UsageError) as err:
        _export("")
    assert str(err.value) == "the export directory is empty; give a directory path"
    with pytest.raises(UsageError) as err:
        hf_write.check_export_target("", "--export-hf")
    assert str(err.value) == "--export-hf is empty; give a directory path"
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    os.symlink(tmp_path / "nowhere", tmp_path / "dangling")
    for name in ("link", "dangling"):
        raw = str(tmp_path / name)
        for args, flag in (((), "the export directory"), (("--export-hf",), "--export-hf")):
            with pytest.raises(UsageError) as err:
                hf_write.check_export_target(raw, *args)
            assert str(err.value) == (f"{flag} {raw!r} is a symbolic link; give the real directory path "
                                      "(an export never follows or replaces a link)")
    with pytest.raises(UsageError) as err:
        _export(tmp_path / "link")
    assert str(err.value).startswith(f"the export directory {str(tmp_path / 'link')!r} is a symbolic link")
    (tmp_path / "real" / "file").write_bytes(b"x")
    with pytest.raises(UsageError) as err:
        _export(tmp_path / "real" / "file")
    assert str(err.value) == (f"the export directory {str(tmp_path / 'real' / 'file')!r} is a file; give a "
                              "directory path (it will hold config.json and model.safetensors)")
    (tmp_path / "real" / "file").unlink()
    assert sorted(os.listdir(tmp_path)) == ["dangling", "link", "real"] and os.listdir(tmp_path / "real") == []


def test_an_empty_directory_takes_an_export_and_a_foreign_one_is_named_by_its_first_entries(tmp_path):
    """An existing empty directory is a fine target; a foreign one is refused naming its first
    three entries, with "..." only when there are more."""
    import os
    (tmp_path / "empty").mkdir()
    assert _export(tmp_path / "empty") == str(tmp_path / "empty")
    assert sorted(os.listdir(tmp_path / "empty")) == ["config.json", "model.safetensors"]
    for n, shown in ((1, "['a']"), (3, "['a', 'b', 'c']"), (4, "['a', 'b', 'c']..."), (5, "['a', 'b', 'c']...")):
        raw = str(tmp_path / f"foreign{n}")
        os.mkdir(raw)
        for name in "abcde"[:n]:
            (tmp_path / f"foreign{n}" / name).write_bytes(b"mine")
        with pytest.raises(UsageError) as err:
            _export(raw)
        assert str(err.value) == (f"the export directory {raw!r} is not an ecospa export (it holds {shown}, and "
                                  "no config.json with an intact 'ecospa_export' record); an export replaces "
                                  "its directory, so choose a new or empty one")
        assert sorted(os.listdir(raw)) == list("abcde"[:n])


def test_an_export_with_files_of_others_is_refused_naming_three(tmp_path, monkeypatch):
    """An earlier export that also holds files ecospa did not write is refused, naming the first
    three; what the working directory holds does not matter."""
    import os
    out = tmp_path / "exp"
    _export(out)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    for name in ("config.json", "model.safetensors"):  # links in the working directory, not in out
        os.symlink(out / name, cwd / name)
    monkeypatch.chdir(cwd)
    assert _export(out) == str(out)
    for name in ("a", "b", "c", "d"):
        (out / name).write_bytes(b"mine")
    with pytest.raises(UsageError) as err:
        _export(out)
    assert str(err.value) == (f"the export directory {str(out)!r} is an earlier ecospa export, but also holds "
                              "['a', 'b', 'c'], which ecospa did not write; move them out or choose another "
                              "directory")
    assert sorted(os.listdir(out)) == ["a", "b", "c", "config.json", "d", "model.safetensors"]


def test_the_newest_set_aside_export_is_restored_whatever_its_name(tmp_path):
    """Set-aside names end in a random temporary suffix: the newest by modification time is
    restored, not the last by name."""
    import os
    import time
    out = tmp_path / "exp"
    _export(tmp_path / "exp.old-a", extra_files={"x.txt": b"newer"})
    _export(tmp_path / "exp.old-b", extra_files={"x.txt": b"older"})
    os.utime(tmp_path / "exp.old-b", (time.time() - 100, time.time() - 100))
    assert hf_write.interrupted_export(str(out)) == str(tmp_path / "exp.old-a")
    assert hf_write.recover_export(str(out)) == str(tmp_path / "exp.old-a")
    assert (out / "x.txt").read_bytes() == b"newer"
    assert sorted(os.listdir(tmp_path)) == ["exp"]


def test_leftovers_belong_to_the_exact_directory_name(tmp_path):
    """A name with a trailing space is another directory: the leftovers of "exp" are not its."""
    import os
    _export(tmp_path / "exp.old-a")
    (tmp_path / ".tmp-exp-1").mkdir()
    spaced = str(tmp_path / "exp ")
    assert hf_write.export_leftovers(spaced) == ([], [])
    assert hf_write.interrupted_export(spaced) is None and hf_write.recover_export(spaced) is None
    assert sorted(os.listdir(tmp_path)) == [".tmp-exp-1", "exp.old-a"]
    assert hf_write.export_leftovers(str(tmp_path / "exp")) == ([str(tmp_path / ".tmp-exp-1")],
                                                                 [str(tmp_path / "exp.old-a")])


def test_checkpointer_saves_finite_state_and_says_what_is_intact_when_it_cannot(tmp_path, monkeypatch, capsys):
    import dataclasses

    from ecospa.io import checkpoint
    from ecospa.train.config import config_json
    from ecospa.train.runtime import LOCAL
    from ecospa.train.saving import CheckpointNotSaved, Checkpointer, TrainingDiverged
    from test_train import MICRO
    cfg, path = dataclasses.replace(MICRO, out=str(tmp_path)), tmp_path / "checkpoint"
    params = llama.init(cfg.model, seed=0)
    saver = Checkpointer(path, cfg, LOCAL, 5, None)
    nan = params | {"norm": params["norm"] * float("nan")}
    with pytest.raises(TrainingDiverged) as err:
        saver.save(3, False, nan, None, (), {})
    assert str(err.value) == ("the parameters are NaN or inf at step 3; not saved; no checkpoint was written "
                              "(checkpoints every 5 steps). Try a lower learning rate (now 0.01).")
    real = checkpoint.save

    def full_disk(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save", full_disk)
    saver.save(3, False, params, None, (), {})
    assert capsys.readouterr().err == ("warning: could not save the checkpoint at step 3 (OSError: disk full); "
                                       "no checkpoint has been written yet; training goes on and saves again "
                                       "at the next checkpoint\n")
    with pytest.raises(CheckpointNotSaved) as err:
        saver.save(4, True, params, None, (), {})
    assert str(err.value) == ("could not save the checkpoint at step 4 (OSError: disk full); no checkpoint "
                              "has been written yet. Fix the cause and run again")
    assert saver.last_saved is None and not path.exists()
    monkeypatch.setattr(checkpoint, "save", real)
    saver.save(5, False, params, None, (), {"dense_params": 7})
    assert saver.last_saved == 5 and checkpoint.load_extra(path) == {"train_config": config_json(cfg),
                                                                     "dense_params": 7}
    monkeypatch.setattr(checkpoint, "save", full_disk)
    with pytest.raises(CheckpointNotSaved) as err:
        saver.save(6, True, params, None, (), {})
    assert str(err.value) == (f"could not save the checkpoint at step 6 (OSError: disk full); the previous "
                              f"checkpoint (step 5) in {path} is intact. Fix the cause and run again with "
                              "--resume")

    class Rank1:
        is_main, barriers = False, 0

        def barrier(self):
            self.barriers += 1
    rank1 = Rank1()
    Checkpointer(tmp_path / "other", cfg, rank1, 5, None).save(5, True, params, None, (), {})
    assert rank1.barriers == 1 and not (tmp_path / "other").exists()  # only rank 0 writes


@pytest.mark.parametrize("fused", [True, False])
def test_all_finite_reads_only_floating_point_tensors(fused, monkeypatch):
    from ecospa.train.saving import all_finite
    if not fused:  # the per-tensor check it falls back to (mixed devices, a torch without the fused norm)
        def unavailable(*a, **k):
            raise RuntimeError("no fused norm here")
        monkeypatch.setattr(torch, "_foreach_norm", unavailable)
    assert all_finite({}) and all_finite({"count": 3, "ids": torch.arange(4)})
    assert all_finite({"w": torch.ones(3)}) and not all_finite({"w": torch.tensor([float("nan")])})
    assert all_finite({"count": 3, "w": torch.ones(2), "h": torch.ones(3, dtype=torch.float16)})
    assert not all_finite({"count": 3, "w": torch.ones(2), "h": torch.tensor([1.0, float("inf")])})
    assert not all_finite([torch.tensor([float("nan")], dtype=torch.float16), torch.ones(2)])
    # finite half-precision values whose norm overflows (100 x sqrt(1e6) = 1e5 > 65504): finite,
    # not a false "diverged"; one NaN among them is still caught
    big = torch.full((1_000_000,), 100.0, dtype=torch.float16)
    assert all_finite({"w": big, "b": torch.full((10,), 3e4, dtype=torch.bfloat16)})
    big[123] = float("nan")
    assert not all_finite({"w": big})


def test_check_out_messages(tmp_path, monkeypatch):
    import os

    from ecospa.train.rundir import check_out
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub" / "run"):
        with pytest.raises(UsageError) as err:
            check_out(out)
        assert str(err.value) == f"--out {out}: {f} is a file, not a directory; choose another --out"
    long = tmp_path / ("a" * 300)
    with pytest.raises(UsageError) as err:
        check_out(long)
    assert str(err.value) == f"--out {str(long)[:80]}...{str(long)[-40:]}: File name too long; choose another --out"
    from pathlib import Path

    def failing(err):
        def exists(self):
            raise err
        return exists
    for n, shown in ((199, None), (200, "short")):
        out = tmp_path / ("b" * (n - len(str(tmp_path)) - 1))
        assert len(str(out)) == n
        shown = str(out) if shown is None else f"{str(out)[:80]}...{str(out)[-40:]}"
        with monkeypatch.context() as m:
            m.setattr(Path, "exists", failing(OSError(5, "Input/output error")))
            with pytest.raises(UsageError) as err:
                check_out(out)
        assert str(err.value) == f"--out {shown}: Input/output error; choose another --out"
    with monkeypatch.context() as m:
        m.setattr(Path, "exists", failing(OSError("no errno")))
        with pytest.raises(UsageError) as err:
            check_out(tmp_path / "x")
    assert str(err.value) == f"--out {tmp_path / 'x'}: no errno; choose another --out"
    assert check_out(tmp_path) is None and check_out(tmp_path / "new" / "run") is None
    asked = []

    def access(path, mode):  # root may write anywhere: a read-only directory, simulated
        asked.append((path, mode))
        return mode & os.W_OK == 0 or path != tmp_path
    monkeypatch.setattr(os, "access", access)
    with pytest.raises(UsageError) as err:
        check_out(tmp_path / "new" / "run")
    assert str(err.value) == f"--out {tmp_path / 'new' / 'run'}: {tmp_path} is not writable; choose another --out"
    assert asked[0][0] == tmp_path and asked[0][1] & os.X_OK


def test_run_files_are_ours_and_the_leftovers_of_interrupted_writes(tmp_path):
    import os

    from ecospa.train.rundir import run_files
    assert run_files(tmp_path / "none") == []
    (tmp_path / "summary.json").write_text("{}")
    os.symlink(tmp_path / "gone", tmp_path / "metrics.jsonl")  # a dangling link counts too
    for name in (".checkpoint.old-1", ".metrics.jsonl.tmp-2", ".summary.json.trash-3", ".checkpoint.tmp-0",
                 ".checkpoint.foo-1", ".checkpoint.old", ".other.old-1", "checkpoint.old-1", "notes.txt"):
        (tmp_path / name).write_text("")
    assert run_files(tmp_path) == [tmp_path / n for n in (
        "metrics.jsonl", "summary.json", ".checkpoint.old-1", ".checkpoint.tmp-0", ".metrics.jsonl.tmp-2",
        ".summary.json.trash-3")]


def test_check_fresh_messages_and_what_overwrite_replaces(tmp_path):
    import os

    from ecospa.train.rundir import check_fresh
    assert check_fresh(tmp_path, False) == [] and check_fresh(tmp_path / "new", False) == []
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(UsageError) as err:
        check_fresh(tmp_path, False)
    assert str(err.value) == (f"{tmp_path} already holds a training run (metrics.jsonl, summary.json); use "
                              "--resume to continue it, --overwrite to replace it, or another --out")
    for name in (".checkpoint.old-1", ".checkpoint.old-2"):
        (tmp_path / name).mkdir()
    with pytest.raises(UsageError) as err:
        check_fresh(tmp_path, False)
    assert str(err.value) == (f"{tmp_path} already holds a training run (metrics.jsonl, summary.json, "
                              ".checkpoint.old-1, .checkpoint.old-2); use --resume to continue it, "
                              "--overwrite to replace it, or another --out")
    (tmp_path / ".checkpoint.tmp-3").mkdir()
    with pytest.raises(UsageError) as err:
        check_fresh(tmp_path, False)
    assert str(err.value) == (f"{tmp_path} already holds a training run (metrics.jsonl, summary.json, "
                              ".checkpoint.old-1, .checkpoint.old-2, ...); use --resume to continue it, "
                              "--overwrite to replace it, or another --out")
    assert len(check_fresh(tmp_path, True)) == 5
    ck = tmp_path / "checkpoint"
    for make in (lambda: ck.write_text("x"), ck.mkdir, lambda: os.symlink(tmp_path / "real", ck)):
        make()
        with pytest.raises(UsageError) as err:
            check_fresh(tmp_path, True)
        assert str(err.value) == (f"{ck} is not an ecospa checkpoint; --overwrite replaces only ecospa's "
                                  "own files: move it away or choose another --out")
        os.rmdir(ck) if ck.is_dir() and not ck.is_symlink() else ck.unlink()
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "manifest.json").write_text("{}")
    os.symlink(tmp_path / "real", ck)  # a link to a checkpoint is not ours either
    with pytest.raises(UsageError):
        check_fresh(tmp_path, True)
    ck.unlink()
    ck.mkdir()
    (ck / "manifest.json").write_text("{}")
    assert check_fresh(tmp_path, True)[0] == ck
    for name in ("metrics.jsonl", "summary.json"):
        (tmp_path / name).unlink()
        (tmp_path / name).mkdir()
        with pytest.raises(UsageError) as err:
            check_fresh(tmp_path, True)
        assert str(err.value) == (f"{tmp_path / name} is not a file ecospa wrote; move it away or choose "
                                  "another --out")
        (tmp_path / name).rmdir()
        os.symlink(tmp_path / "real" / "manifest.json", tmp_path / name)
        with pytest.raises(UsageError):
            check_fresh(tmp_path, True)
        (tmp_path / name).unlink()
        (tmp_path / name).write_text("")


def test_remove_run_sets_each_file_aside_leftovers_and_checkpoint_first(tmp_path, monkeypatch):
    import os

    from ecospa.train.rundir import remove_run, run_files
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "manifest.json").write_text("{}")
    (tmp_path / "metrics.jsonl").write_text("")
    (tmp_path / "keep.txt").write_text("mine")
    os.symlink(tmp_path / "keep.txt", tmp_path / "summary.json")  # removed, its target kept
    (tmp_path / ".metrics.jsonl.tmp-1").write_text("")
    (tmp_path / ".checkpoint.old-2").mkdir()
    (tmp_path / ".summary.json.trash-3").write_text("")
    moved, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: moved.append((a.name, b.name)) or real(a, b))
    # given in any order (here reversed), one already gone (skipped)
    remove_run([tmp_path / ".checkpoint.tmp-9"] + run_files(tmp_path)[::-1])
    assert [a for a, _ in moved] == [".checkpoint.old-2", ".summary.json.trash-3", ".metrics.jsonl.tmp-1",
                                     "checkpoint", "summary.json", "metrics.jsonl"]
    for a, b in moved:
        base = next(n for n in ("checkpoint", "metrics.jsonl", "summary.json") if a == n or a.startswith(f".{n}."))
        assert b == a if ".trash-" in a else (b.startswith(f".{base}.trash-") and len(b) == len(base) + 16), (a, b)
    assert sorted(os.listdir(tmp_path)) == ["keep.txt"] and (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("tied", [True, False])
def test_gguf_description_counts_every_weight_but_the_rotary_tables(tmp_path, tied):
    import optree

    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case(tie_embeddings=tied)
    assert ("lm_head" in params) != tied

    def weights(tree):
        return sum(x.numel() for path, x in zip(*optree.tree_flatten_with_path(tree, namespace="")[:2])
                   if "inv_freq" not in path)
    kept, dense = weights(params), weights(llama.init(cfg, seed=1))
    save_gguf(params, cfg, tmp_path / "w.gguf", name="tiny")
    assert _gguf_fields(tmp_path / "w.gguf")["general.description"] == (
        f"model structurally pruned by ecospa: {kept:,} of {dense:,} weights kept ({kept / dense:.1%}); GGUF "
        "layout 'padded' (pruned units padded with zeros to the dense shapes)")


def test_compact_layout_holds_a_layer_with_one_neuron(tmp_path):
    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case()
    layers = list(params["layers"])
    layers[1] = {**layers[1], "w_gate": layers[1]["w_gate"][:, :1], "w_up": layers[1]["w_up"][:, :1],
                 "w_down": layers[1]["w_down"][:1]}
    info = save_gguf({**params, "layers": tuple(layers)}, cfg, tmp_path / "c.gguf", layout="compact")
    assert info["mlp_widths"] == [13, 1, 7]


def test_general_arrays_keep_their_element_type(tmp_path):
    import gguf

    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case(budget=0)
    A, U32, S = gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING
    general = {"general.name": {"value": "Src", "type": int(S), "sub_type": None},
               "general.x_ids": {"value": [1, 2], "type": int(A), "sub_type": int(U32)}}
    save_gguf(params, cfg, tmp_path / "a.gguf", general=general)
    field = gguf.GGUFReader(str(tmp_path / "a.gguf")).fields["general.x_ids"]
    assert field.types == [A, U32] and field.contents() == [1, 2]


def test_gguf_is_written_beside_its_path_then_renamed(tmp_path, monkeypatch):
    import os

    from ecospa.io import gguf_export
    cfg, params = _gguf_case(budget=0)
    path, seen = str(tmp_path / "m.gguf"), []
    real = gguf_export.publish_mode

    def publish_mode(tmp):  # a kill here leaves a temporary file the next export finds and removes
        seen.append((tmp, gguf_export.gguf_leftovers(path)))
        real(tmp)
    monkeypatch.setattr(gguf_export, "publish_mode", publish_mode)
    gguf_export.save_gguf(params, cfg, path)
    (tmp, left), = seen
    assert left == [tmp] and os.path.basename(tmp).startswith(".tmp-m.gguf-")
    assert os.listdir(tmp_path) == ["m.gguf"]


def test_rope_factors_are_a_float32_tensor(tmp_path):
    import gguf

    from ecospa.io.gguf_export import save_gguf
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    cfg, params = _gguf_case(budget=0, rope_scaling=scaling)
    save_gguf(params, cfg, tmp_path / "r.gguf")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(str(tmp_path / "r.gguf")).tensors}
    assert types["rope_freqs.weight"] == gguf.GGMLQuantizationType.F32


def test_a_failed_gguf_write_says_what_is_intact(tmp_path, monkeypatch):
    import os

    from ecospa.io import gguf_export
    from ecospa.io.files import WriteFailed
    cfg, params = _gguf_case(budget=0)
    path = str(tmp_path / "m.gguf")
    real = gguf_export.publish_mode

    def full_disk(tmp):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(gguf_export, "publish_mode", full_disk)
    with pytest.raises(WriteFailed) as err:
        gguf_export.save_gguf(params, cfg, path)
    assert str(err.value) == (f"could not write {path}: No space left on device (disk full: free space and "
                              "run again); nothing was written")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(gguf_export, "publish_mode", real)
    gguf_export.save_gguf(params, cfg, path)
    before = (tmp_path / "m.gguf").read_bytes()
    monkeypatch.setattr(gguf_export, "publish_mode", full_disk)
    with pytest.raises(WriteFailed) as err:
        gguf_export.save_gguf(params, cfg, path, overwrite=True)
    assert str(err.value) == (f"could not write {path}: No space left on device (disk full: free space and "
                              "run again); the previous file is unchanged")
    assert (tmp_path / "m.gguf").read_bytes() == before and os.listdir(tmp_path) == ["m.gguf"]


def test_padded_gguf_holds_a_layer_with_no_mlp_neuron(tmp_path):
    from ecospa.io.gguf_export import save_gguf
    cfg, params = _gguf_case()
    layers = list(params["layers"])
    layers[1] = {**layers[1], "w_gate": layers[1]["w_gate"][:, :0], "w_up": layers[1]["w_up"][:, :0],
                 "w_down": layers[1]["w_down"][:0]}
    assert save_gguf({**params, "layers": tuple(layers)}, cfg, tmp_path / "p.gguf")["mlp_widths"] == [13, 0, 7]


def test_padded_gguf_notes_one_pruned_mlp_and_writes_a_one_layer_model(tmp_path):
    import dataclasses

    from ecospa.io.gguf_export import save_gguf
    cfg, _ = _gguf_case(budget=0)
    dense = llama.init(cfg, seed=1)
    one = {**dense, "layers": tuple({**p, "w_gate": p["w_gate"][:, :12], "w_up": p["w_up"][:, :12],
                                     "w_down": p["w_down"][:12]} if i == 1 else p
                                    for i, p in enumerate(dense["layers"]))}
    assert save_gguf(one, cfg, tmp_path / "o.gguf")["notes"] == [
        "MLP widths 12..24 padded with zeros to 24 (llama.cpp's llama architecture has one "
        "feed_forward_length; --format gguf-compact writes the kept neurons only)"]
    cfg1 = dataclasses.replace(cfg, n_layers=1)
    info = save_gguf(llama.init(cfg1, seed=1), cfg1, tmp_path / "l.gguf")
    assert info["mlp_widths"] == [24] and info["notes"] == []


def test_attention_note_reads_the_rotary_pairs_and_value_dims(tmp_path):
    from ecospa.io.gguf_export import save_gguf
    cfg = llama.Config(vocab_size=37, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=64)
    dense = llama.init(cfg, seed=1)  # head_dim 8: wq [D, KV heads 2, group 2, 2, pairs 4]
    assert save_gguf(dense, cfg, tmp_path / "d.gguf")["notes"] == []
    qk = {**dense, "layers": (dense["layers"][0], {**dense["layers"][1], "wq": dense["layers"][1]["wq"][..., :3],
                                                   "wk": dense["layers"][1]["wk"][..., :3],
                                                   "inv_freq": dense["layers"][1]["inv_freq"][..., :3]})}
    assert save_gguf(qk, cfg, tmp_path / "q.gguf")["notes"] == [
        "pruned attention written padded (zero Q/K pairs and V/O dims): exact, but llama.cpp computes the "
        "full head size"]


def test_export_config_is_sorted_indented_and_its_marker_lists_each_file(tmp_path):
    import hashlib
    out = tmp_path / "exp"
    hf_write.write_hf({"w": torch.arange(3.0)}, {"model_type": "x", "hidden": 4}, str(out),
                      extra_files={"tokenizer.json": b"{}"}, config_extra={"bos_token_id": 1})
    text = (out / "config.json").read_text()
    conf = json.loads(text)
    assert text == json.dumps(conf, indent=2, sort_keys=True)  # diffable: sorted keys, 2 spaces
    assert list(conf) == ["bos_token_id", hf_write.EXPORT_MARKER, "hidden", "model_type"]

    def record(name):
        data = (out / name).read_bytes()
        return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert conf[hf_write.EXPORT_MARKER] == {
        "kind": "ecospa-hf-export",
        "files": {"model.safetensors": record("model.safetensors"), "tokenizer.json": record("tokenizer.json")},
        "note": "written by ecospa; a later export replaces this directory only while it holds just these "
                "files, unchanged"}


def test_a_swap_killed_between_its_renames_leaves_an_export_that_is_put_back(tmp_path, monkeypatch):
    import os
    out, seen = tmp_path / "exp", []
    _export(out, extra_files={"x.txt": b"first"})
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # an empty working directory
    real = os.replace

    def replace(a, b):
        if len(seen) == 1:  # a kill here: the old export set aside, the new one not yet in place
            seen.append(hf_write.interrupted_export(str(out)))
        seen.append(b)
        real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    _export(out, extra_files={"x.txt": b"second"})
    assert seen[1] == seen[0] and os.path.basename(seen[0]).startswith("exp.old-.tmp-exp-")
    assert (out / "x.txt").read_bytes() == b"second" and sorted(os.listdir(tmp_path)) == ["cwd", "exp"]


def test_a_swap_whose_second_rename_fails_puts_the_old_export_back(tmp_path, monkeypatch):
    import os

    from ecospa.io.files import WriteFailed
    out = tmp_path / "exp"
    _export(out, extra_files={"x.txt": b"first"})
    before = {p: (out / p).read_bytes() for p in os.listdir(out)}
    real, calls = os.replace, []

    def replace(a, b):
        calls.append(a)
        if len(calls) == 2:  # the new export into place
            raise OSError(28, "No space left on device")
        real(a, b)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteFailed) as err:
        _export(out, extra_files={"x.txt": b"second"})
    assert str(err.value) == (f"could not write {out}: No space left on device (disk full: free space and run "
                              "again); the previous export, if any, is unchanged")
    assert {p: (out / p).read_bytes() for p in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["exp"]
