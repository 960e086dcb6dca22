"""Bad input gets a clear ValueError naming what is wrong, and the input is left untouched."""
from __future__ import annotations

import optree
import pytest
import torch

import ecospa
from ecospa._tree import map_paths
from ecospa.func import gpt2, llama

CFG = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=6)


@pytest.fixture
def setup():
    params = llama.init(CFG, seed=0)
    groups = llama.coupled_groups(CFG)
    scores = {g.name: torch.rand(g.sizes(params)) for g in groups}
    before = optree.tree_map(lambda x: x.clone(), params)
    yield params, groups, scores
    for a, b in zip(optree.tree_leaves(params), optree.tree_leaves(before)):
        assert torch.equal(a, b), "the input tree was modified"


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan"), True, "0.5", None])
def test_invalid_sparsity(setup, bad):
    params, groups, scores = setup
    with pytest.raises(ValueError, match=r"sparsity|exactly one"):
        ecospa.pruner(groups, sparsity=bad)
    if bad is not None:
        with pytest.raises(ValueError, match=r"sparsity.*\[0, 1\)"):
            ecospa.select(params, groups, scores, sparsity=bad)


def test_invalid_sparsity_per_kind_names_the_group(setup):
    params, groups, scores = setup
    with pytest.raises(ValueError, match=r"layers\.0\.mlp"):
        ecospa.select(params, groups, scores, sparsity={"mlp": 1.0})


@pytest.mark.parametrize("bad", [{"mpl": 0.5}, {"mlp": 0.5, "attn": 0.2}, {"MLP": 0.5}])
def test_unknown_sparsity_kind_is_rejected_everywhere(setup, bad):
    """issue 9 B5: a typo'd kind used to prune nothing (pruner) or be ignored (select)."""
    params, groups, scores = setup
    with pytest.raises(ValueError, match=r"known kinds: \['qk', 'vo', 'mlp'\]"):
        ecospa.pruner(groups, sparsity=bad)
    with pytest.raises(ValueError, match=r"group kinds \[.*that none of the groups has"):
        ecospa.select(params, groups, scores, sparsity=bad)
    with pytest.raises(ValueError, match="known kinds"):
        ecospa.check_target(groups, sparsity=bad)


def test_kinds_are_those_of_the_groups(setup):
    """A kind is known when the groups have it: custom kinds work, absent ones are rejected."""
    params, groups, scores = setup
    mlp_only = [g for g in groups if g.kind == "mlp"]
    with pytest.raises(ValueError, match=r"\['qk'\].*known kinds: \['mlp'\]"):
        ecospa.pruner(mlp_only, sparsity={"qk": 0.5})
    custom = [ecospa.Group(g.name, "ffn", g.members) for g in mlp_only]
    small = ecospa.pruner(custom, sparsity={"ffn": 0.5})(params, scores)
    assert small["layers"][0]["w_down"].shape[0] == 3
    ecospa.check_target(groups, sparsity={"qk": 0.0, "vo": 0.5, "mlp": 0.25})
    ecospa.check_target(groups, budget=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ecospa.check_target(groups)
    with pytest.raises(ValueError, match=r"budget must be a number in \[0, 1\)"):
        ecospa.check_target(groups, budget=-0.1)
    with pytest.raises(ValueError, match=r"group 'layers\.0\.vo'.*\[0, 1\)"):
        ecospa.pruner(groups, sparsity={"vo": 1.0})


@pytest.mark.parametrize("text, want", [
    ("0.5", 0.5), ("0", 0.0), ("qk=0.25,vo=0.25,mlp=0.5", {"qk": 0.25, "vo": 0.25, "mlp": 0.5}),
    (" mlp = 0.5 ", {"mlp": 0.5}),
])
def test_parse_sparsity(text, want):
    assert ecospa.parse_sparsity(text) == want


@pytest.mark.parametrize("text, match", [
    ("mpl=0.5", r"unknown group kinds \['mpl'\]; use qk, vo, mlp"),
    ("qk=0.3,attn=0.2", r"unknown group kinds \['attn'\]"),
    ("half", r"--sparsity 'half': write a fraction \(0\.5\) or kind=fraction pairs"),
    ("qk=0.1,", "kind=fraction pairs"), ("=0.3", "kind=fraction pairs"),
    ("qk=0.1,qk=0.2", "kind=fraction pairs"), ("qk:0.1", "kind=fraction pairs"),
    ("1.5", r"--sparsity must be a number in \[0, 1\)"), ("nan", r"\[0, 1\)"),
    ("mlp=1", r"--sparsity mlp must be a number in \[0, 1\)"), ("vo=-0.1", r"\[0, 1\)"),
])
def test_parse_sparsity_rejects(text, match):
    with pytest.raises(ValueError, match=match):
        ecospa.parse_sparsity(text)


@pytest.mark.parametrize("value", [0.5, None, {"mlp": 0.5}])
def test_parse_sparsity_wants_text(value):
    with pytest.raises(ValueError, match=r"^--sparsity .*: write a fraction \(0\.5\) or kind=fraction pairs"):
        ecospa.parse_sparsity(value)


def test_parse_sparsity_custom_kinds():
    assert ecospa.parse_sparsity("ffn=0.5", kinds=("ffn",)) == {"ffn": 0.5}
    with pytest.raises(ValueError, match="unknown group kinds"):
        ecospa.parse_sparsity("mlp=0.5", kinds=("ffn",))


def test_budget_that_would_empty_a_group(setup):
    params, groups, scores = setup
    with pytest.raises(ValueError, match=r"empty a group.*at most 0\.\d+"):
        ecospa.pruner(groups, budget=0.95)(params, scores)
    with pytest.raises(ValueError, match=r"budget must be a number in \[0, 1\)"):
        ecospa.pruner(groups, budget=1.0)


def test_both_or_neither_target(setup):
    params, groups, scores = setup
    with pytest.raises(ValueError, match="exactly one"):
        ecospa.pruner(groups, sparsity=0.5, budget=0.5)
    with pytest.raises(ValueError, match="exactly one"):
        ecospa.select(params, groups, scores)


@pytest.mark.parametrize("defect,match", [
    (lambda s: {**s, "layers.1.vo": s["layers.1.vo"].clone().fill_(float("nan"))}, r"'layers\.1\.vo'.*NaN"),
    (lambda s: {**s, "layers.0.mlp": torch.rand(5)}, r"'layers\.0\.mlp'.*1 blocks x 6 units"),
    (lambda s: {k: v for k, v in s.items() if k != "layers.1.qk"}, r"'layers\.1\.qk'.*no scores"),
])
def test_bad_scores_name_the_group(setup, defect, match):
    params, groups, scores = setup
    with pytest.raises(ValueError, match=match):
        ecospa.pruner(groups, sparsity=0.5)(params, defect(scores))


def test_groups_of_another_model(setup):
    params, _, scores = setup
    with pytest.raises(ValueError, match=r"group 'layers\.0\.qk'.*not in the params tree"):
        ecospa.select(params, gpt2.coupled_groups(gpt2.Config()), scores, sparsity=0.5)
    bigger = llama.coupled_groups(llama.Config(**{**CFG.__dict__, "n_layers": 3}))
    with pytest.raises(ValueError, match=r"group 'layers\.2\.qk'.*not in the params tree"):
        ecospa.select(params, bigger, scores, sparsity=0.5)


def test_members_that_disagree_on_sizes(setup):
    params, groups, scores = setup
    broken = map_paths(params, {("layers", 1, "wk"): lambda w: w[..., :1]})
    with pytest.raises(ValueError, match=r"group 'layers\.1\.qk': members disagree.*wk"):
        ecospa.pruner(groups, sparsity=0.5)(broken, scores)


def test_odd_rotary_size():
    with pytest.raises(ValueError, match=r"head_dim=5 must be even"):
        llama.Config(dim=10, n_heads=2, head_dim=5)
    with pytest.raises(ValueError, match=r"multiple of n_kv_heads"):
        llama.Config(n_heads=4, n_kv_heads=3)


@pytest.mark.parametrize("keep,match", [
    (lambda k: {**k, "layers.0.mlp": k["layers.0.mlp"].flip(1)}, r"'layers\.0\.mlp'.*sorted"),
    (lambda k: {**k, "layers.0.mlp": k["layers.0.mlp"] + 100}, r"'layers\.0\.mlp'.*\[0, 6\)"),
    (lambda k: {**k, "layers.1.vo": k["layers.1.vo"][:, :0]}, r"'layers\.1\.vo'.*zero units"),
    (lambda k: {**k, "layers.1.vo": k["layers.1.vo"].float()}, r"'layers\.1\.vo'.*int64"),
])
def test_bad_keep(setup, keep, match):
    params, groups, _ = setup
    good = ecospa.keep_all(params, groups)
    for transform in (ecospa.slice_units, ecospa.mask):
        with pytest.raises(ValueError, match=match):
            transform(params, groups, keep(good))


def test_group_definitions_are_validated_when_built():
    m = ecospa.Member(("w",), 1, None, "b")
    with pytest.raises(ValueError, match="no members"):
        ecospa.Group("g", "mlp", ())
    with pytest.raises(ValueError, match="twice"):
        ecospa.Group("g", "mlp", (m, m))
    with pytest.raises(ValueError, match="side='b'"):
        ecospa.Group("g", "mlp", (ecospa.Member(("w",), 1),))
    with pytest.raises(ValueError, match="must differ"):
        ecospa.Member(("w",), 1, 1)


def test_to_casts_weights_but_keeps_rotary_frequencies_fp32():
    params = llama.init(CFG, seed=0)
    half = ecospa.to(params, dtype=torch.bfloat16)
    assert half["layers"][0]["wq"].dtype == torch.bfloat16
    assert half["layers"][0]["inv_freq"].dtype == torch.float32
    assert torch.equal(half["layers"][0]["inv_freq"], params["layers"][0]["inv_freq"])
    assert params["layers"][0]["wq"].dtype == torch.float32  # input untouched


def test_transposed_scores_are_refused_not_reshaped(setup):
    params, groups, scores = setup
    vo = scores["layers.0.vo"]  # [2 KV heads, 4 value dims]
    assert vo.shape[0] > 1 and vo.shape[0] != vo.shape[1]
    with pytest.raises(ValueError, match=r"'layers\.0\.vo'.*\(4, 2\).*give \[2, 4\]"):
        ecospa.select(params, groups, {**scores, "layers.0.vo": vo.T.contiguous()}, sparsity=0.5)
    with pytest.raises(ValueError, match=r"'layers\.0\.vo'"):
        ecospa.select(params, groups, {**scores, "layers.0.vo": vo.flatten()}, sparsity=0.5)
