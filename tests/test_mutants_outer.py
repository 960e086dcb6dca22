"""Tests that kill mutants of the outer code (issue 24): allocation, func, io, train, jobs.

Each test names the behaviour it pins; `bash tools/mutation.sh <profile>` runs them with the
module's own tests (tools/mutation.sh lists which)."""
from __future__ import annotations

import pytest
import torch

from ecospa import allocation
from ecospa.groups import Group, Member


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

from ecospa.func import gpt2, llama, vit  # noqa: E402
from ecospa.func._block import run  # noqa: E402
from ecospa.func.decode import decode, init_cache  # noqa: E402
from ecospa.func.families import family_of  # noqa: E402
from ecospa.func.reconstruct import obs_scores  # noqa: E402


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
    from ecospa.groups import Group
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
