"""ecospa's functional forwards and converters against Hugging Face ``transformers``.

The reference is the library everyone trusts: tiny random HF models (MHA, GQA, MQA, tied and
untied, Qwen2 biases, GPT-2) must give the same logits as ``from_hf`` + the pure forward, and
trees exported with ``to_hf`` / ``save_hf`` must load back into ``transformers`` unchanged.
"""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ecospa  # noqa: E402
from ecospa.func import gpt2, llama  # noqa: E402
from ecospa.io import hf_gpt2 as io_gpt2, hf_llama as io_llama  # noqa: E402
from ecospa.io.hf import HF_FAMILIES, load_hf  # noqa: E402
from ecospa.io.hf_llama import config_from_hf  # noqa: E402
from tolerances import HF, close  # noqa: E402

DTYPES = [torch.float64, torch.float32]
V, D, L, T = 64, 32, 2, 11
LLAMA_VARIANTS = {  # name: (model class, kwargs)
    "mha_tied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mha_untied": ("Llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gqa_tied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "gqa_untied": ("Llama", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mqa_tied": ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mqa_untied_hd12": ("Llama", dict(num_key_value_heads=1, tie_word_embeddings=False,
                                      head_dim=12)),
    "qwen2_gqa": ("Qwen2", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "mistral_gqa": ("Mistral", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    # Qwen3: per-head q/k RMSNorm, head_dim independent of hidden_size (12 != 32 / 4)
    "qwen3_gqa_hd12": ("Qwen3", dict(num_key_value_heads=2, tie_word_embeddings=False, head_dim=12)),
    "qwen3_mha_tied": ("Qwen3", dict(num_key_value_heads=4, tie_word_embeddings=True)),
}


def _perturb(model):
    """Random values everywhere (norm weights and biases too: HF initialises them to 1 / 0)."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_llama(variant, dtype):
    kind, kw = LLAMA_VARIANTS[variant]
    conf = getattr(transformers, f"{kind}Config")(
        vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=4,
        intermediate_size=48, rope_theta=500.0, rms_norm_eps=1e-5, **kw)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = getattr(transformers, f"{kind}ForCausalLM")(conf).eval()
    return _perturb(model).to(dtype)


def hf_gpt2(dtype, n_inner=None):
    conf = transformers.GPT2Config(vocab_size=V, n_embd=D, n_layer=L, n_head=4, n_positions=16,
                                   n_inner=n_inner, bos_token_id=0, eos_token_id=0)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    return _perturb(transformers.GPT2LMHeadModel(conf).eval()).to(dtype)


def tokens(seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def hf_logits(model, toks):
    with torch.no_grad():
        return model(toks).logits


def noisy(tree, seed=0):
    """A copy of an ecospa tree with every weight perturbed (rotary frequencies untouched)."""
    g = torch.Generator().manual_seed(seed)

    def go(node, key=None):
        if isinstance(node, dict):
            return {k: go(v, k) for k, v in node.items()}
        if isinstance(node, tuple):
            return tuple(go(v) for v in node)
        if key == "inv_freq":
            return node
        return node + 0.1 * torch.randn(node.shape, generator=g, dtype=torch.float64).to(node.dtype)

    return go(tree)


def assert_trees_equal(a, b):
    if isinstance(a, dict):
        assert sorted(a) == sorted(b)
        for k in a:
            assert_trees_equal(a[k], b[k])
    elif isinstance(a, tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_trees_equal(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def random_scores(params, groups, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = ecospa.validate(params, groups)
    return {name: torch.rand(b, n, generator=g) for name, (b, n) in sizes.items()}


# --- functional forward vs transformers --------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", sorted(LLAMA_VARIANTS))
def test_llama_forward_matches_transformers(variant, dtype):
    model = hf_llama(variant, dtype)
    cfg, params = io_llama.from_hf(model.state_dict(), model.config)
    assert cfg.n_kv_heads == model.config.num_key_value_heads
    assert cfg.tie_embeddings == model.config.tie_word_embeddings
    assert cfg.attention_bias == variant.startswith("qwen2")
    assert cfg.qk_norm == variant.startswith("qwen3")
    toks = tokens()
    close(llama.forward(params, toks, cfg), hf_logits(model, toks), HF)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_forward_matches_transformers(dtype):
    model = hf_gpt2(dtype, n_inner=40)
    cfg, params = io_gpt2.from_hf(model.state_dict(), model.config)
    assert cfg.ffn_dim == 40
    toks = tokens()
    close(gpt2.forward(params, toks, cfg), hf_logits(model, toks), HF)


def test_from_hf_accepts_plain_names_and_dict_config():
    """GGUF/other loaders pass HF names (with or without "model.") and a config.json dict."""
    model = hf_llama("gqa_untied", torch.float64)
    sd = {k.removeprefix("model."): v for k, v in model.state_dict().items()}
    conf = json.loads(model.config.to_json_string())
    cfg, params = io_llama.from_hf(sd, conf)
    cfg_ref, ref = io_llama.from_hf(model.state_dict(), model.config)
    assert cfg == cfg_ref
    assert_trees_equal(params, ref)
    before = {k: v.clone() for k, v in sd.items()}
    params["layers"][0]["w_gate"].add_(1.0)  # the result must not alias the input
    params["embed"].add_(1.0)
    assert all(torch.equal(sd[k], before[k]) for k in sd)


@pytest.mark.parametrize("conf, theta", [
    ({"rope_theta": 123.0}, 123.0),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 77.0}}, 77.0),
    ({"rope_theta": 5.0, "rope_scaling": None}, 5.0),
])
def test_rope_theta_from_either_transformers_version(conf, theta):
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=4)
    assert config_from_hf({**base, **conf}).rope_theta == theta


@pytest.mark.parametrize("conf, words", [
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "yarn"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1.0}}, "llama3.*needs 'factor'"),
    ({"rope_scaling": {"rope_type": "linear", "factor": -2.0}}, "linear.*'factor' as a number > 0"),
    ({"model_type": "falcon"}, "falcon"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "o_proj"),
    ({"hidden_size": None}, "hidden_size"),
])
def test_unsupported_llama_configs_raise(conf, words):
    base = dict(model_type="llama", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=2, intermediate_size=4)
    with pytest.raises(ValueError, match=words):
        config_from_hf({**base, **conf})


# --- to_hf round trips -------------------------------------------------------------------------

LLAMA_CFGS = {
    "gqa_untied": llama.Config(vocab_size=V, dim=D, n_layers=L, n_heads=4, n_kv_heads=2,
                               ffn_dim=48, tie_embeddings=False, rope_theta=500.0),
    "mqa_tied_hd12": llama.Config(vocab_size=V, dim=D, n_layers=L, n_heads=4, n_kv_heads=1,
                                  head_dim=12, ffn_dim=40),
    "qwen2_bias": llama.Config(vocab_size=V, dim=D, n_layers=L, n_heads=4, n_kv_heads=2,
                               ffn_dim=48, attention_bias=True, tie_embeddings=False),
}


def fresh_hf(conf: dict):
    conf = transformers.AutoConfig.for_model(**conf)
    conf._attn_implementation = "eager"
    return transformers.AutoModelForCausalLM.from_config(conf).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(LLAMA_CFGS))
def test_llama_to_hf_round_trip(name, dtype):
    cfg = LLAMA_CFGS[name]
    params = noisy(llama.init(cfg, seed=3, dtype=dtype))
    sd, conf = io_llama.to_hf(params, cfg)
    # transformers 4 reads the top-level key, 5 reads rope_parameters: both must hold theta.
    assert conf["rope_theta"] == conf["rope_parameters"]["rope_theta"] == cfg.rope_theta
    model = fresh_hf(conf).to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    toks = tokens()
    close(llama.forward(params, toks, cfg), hf_logits(model, toks), HF)
    cfg2, back = io_llama.from_hf(sd, conf)
    assert cfg2 == cfg
    assert_trees_equal(back, params)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gpt2_to_hf_round_trip(dtype):
    cfg = gpt2.Config(vocab_size=V, dim=D, n_layers=L, n_heads=4, ffn_dim=40, max_seq_len=16)
    params = noisy(gpt2.init(cfg, seed=3, dtype=dtype))
    sd, conf = io_gpt2.to_hf(params, cfg)
    model = fresh_hf(conf).to(dtype)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == ["lm_head.weight"]
    toks = tokens()
    close(gpt2.forward(params, toks, cfg), hf_logits(model, toks), HF)
    cfg2, back = io_gpt2.from_hf(sd, conf)
    assert cfg2 == cfg
    assert_trees_equal(back, params)


# --- pruned export through save_hf and from_pretrained ------------------------------------------

def _from_pretrained(directory, dtype):
    model = transformers.AutoModelForCausalLM.from_pretrained(directory,
                                                              attn_implementation="eager")
    assert model.dtype == dtype  # save_hf records the dtype; transformers loads it back
    return model.eval()


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pruned_llama_exports_to_transformers(tmp_path, dtype):
    cfg = LLAMA_CFGS["gqa_untied"]
    params = noisy(llama.init(cfg, seed=4, dtype=dtype))
    groups = llama.coupled_groups(cfg)
    small = ecospa.pruner(groups, sparsity={"mlp": 0.5})(params, random_scores(params, groups))
    assert small["layers"][0]["w_up"].shape == (D, 24)
    out = io_llama.save_hf(small, cfg, tmp_path / "pruned")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    model = _from_pretrained(out, dtype)
    assert model.config.intermediate_size == 24
    toks = tokens()
    close(llama.forward(small, toks, cfg), hf_logits(model, toks), HF)


@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_pruned_qwen3_exports_padded_to_stock_transformers(tmp_path, dtype):
    """Every coupled kind pruned, rotary pairs too: the per-head q/k norms keep the original
    head_dim as their divisor, so the padded model (zero pairs) is the pruned one, exactly."""
    from ecospa.jobs.export import export
    model0 = hf_llama("qwen3_gqa_hd12", dtype)
    cfg, params = io_llama.from_hf(model0.state_dict(), model0.config)
    groups = llama.coupled_groups(cfg)
    small = ecospa.pruner(groups, sparsity=0.5)(params, random_scores(params, groups, seed=5))
    assert small["layers"][0]["wk"].shape[-1] == 3  # 3 of 6 rotary pairs kept per KV head
    assert small["layers"][0]["q_norm"].shape == (12,)  # the shared norm weight is never pruned
    toks = tokens()
    want = llama.forward(small, toks, cfg)
    out = export(small, cfg, str(tmp_path / "padded"), "hf-padded")["path"]
    model = _from_pretrained(out, dtype)
    assert type(model).__name__ == "Qwen3ForCausalLM" and model.config.head_dim == 12
    close(hf_logits(model, toks), want, HF)
    # the pruned model differs from the dense one (the test is not vacuous)
    assert not torch.allclose(want, hf_logits(model0, toks), **HF[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_pruned_gpt2_exports_to_transformers(tmp_path, dtype):
    model0 = hf_gpt2(dtype)
    cfg, params = io_gpt2.from_hf(model0.state_dict(), model0.config)
    groups = gpt2.coupled_groups(cfg)
    small = ecospa.pruner(groups, sparsity={"mlp": 0.5})(params, random_scores(params, groups))
    out = io_gpt2.save_hf(small, cfg, tmp_path / "pruned")
    model = _from_pretrained(out, dtype)
    assert model.config.n_inner == 2 * D
    toks = tokens()
    close(gpt2.forward(small, toks, cfg), hf_logits(model, toks), HF)


def test_save_hf_replaces_an_existing_directory(tmp_path):
    cfg = LLAMA_CFGS["mqa_tied_hd12"]
    a, b = noisy(llama.init(cfg), seed=1), noisy(llama.init(cfg), seed=2)
    io_llama.save_hf(a, cfg, tmp_path / "m")
    io_llama.save_hf(b, cfg, tmp_path / "m")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no temp or old directories left behind
    _, _, loaded = load_hf(tmp_path / "m")
    assert_trees_equal(loaded, b)


# --- what cannot be exported ---------------------------------------------------------------------

GPT2_CFG = gpt2.Config(vocab_size=V, dim=D, n_heads=4)


@pytest.mark.parametrize("kind", ["qk", "vo"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_attention_pruned_export_raises(tmp_path, family, kind):
    mod = llama if family == "llama" else gpt2
    cfg = LLAMA_CFGS["gqa_untied"] if family == "llama" else GPT2_CFG
    params = mod.init(cfg)
    groups = mod.coupled_groups(cfg)
    small = ecospa.pruner(groups, sparsity={kind: 0.5})(params, random_scores(params, groups))
    with pytest.raises(ValueError, match=r"layer 0: attention was pruned.*scale"):
        HF_FAMILIES[family].to_hf(small, cfg)
    with pytest.raises(ValueError, match="attention was pruned"):
        HF_FAMILIES[family].save_hf(small, cfg, tmp_path / "x")
    assert not os.path.exists(tmp_path / "x")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_per_layer_mlp_widths_export_raises(family):
    mod = llama if family == "llama" else gpt2
    cfg = LLAMA_CFGS["gqa_untied"] if family == "llama" else GPT2_CFG
    params = mod.init(cfg)
    groups = mod.coupled_groups(cfg)
    keep = ecospa.keep_all(params, groups)
    keep = {**keep, "layers.1.mlp": keep["layers.1.mlp"][:, :5]}
    with pytest.raises(ValueError, match="MLP widths differ"):
        HF_FAMILIES[family].to_hf(ecospa.slice_units(params, groups, keep), cfg)


def test_reordered_rotary_frequencies_export_raises():
    cfg = LLAMA_CFGS["gqa_untied"]
    params = llama.init(cfg)
    layer = dict(params["layers"][1], inv_freq=params["layers"][1]["inv_freq"].flip(-1))
    bad = dict(params, layers=(params["layers"][0], layer))
    with pytest.raises(ValueError, match="layer 1: inv_freq"):
        io_llama.to_hf(bad, cfg)


# --- load_hf on directories ----------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_load_hf_reads_save_pretrained(tmp_path, family):
    model = hf_gpt2(torch.float32) if family == "gpt2" else hf_llama(
        "qwen2_gqa" if family == "qwen2" else "gqa_tied", torch.float32)
    model.save_pretrained(tmp_path)
    fam, cfg, params = load_hf(str(tmp_path), dtype=torch.float64)
    assert fam == ("gpt2" if family == "gpt2" else "llama")
    assert params["layers"][0]["wq"].dtype == torch.float64
    toks = tokens()
    mod = gpt2 if family == "gpt2" else llama
    close(mod.forward(params, toks, cfg).float(), hf_logits(model, toks), HF)


def test_load_hf_reads_shards_and_pickles(tmp_path):
    model = hf_llama("gqa_untied", torch.float32)
    _, _, ref = load_hf(_saved(model, tmp_path / "one"))
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert os.path.exists(tmp_path / "sharded" / "model.safetensors.index.json")
    _, _, sharded = load_hf(tmp_path / "sharded")
    assert_trees_equal(sharded, ref)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(model.config.to_json_string())
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    _, _, pickled = load_hf(tmp_path / "bin")
    assert_trees_equal(pickled, ref)


def _saved(model, directory):
    model.save_pretrained(directory)
    return directory


def test_load_hf_truncated_safetensors_raises(tmp_path):
    d = _saved(hf_llama("gqa_tied", torch.float32), tmp_path)
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        load_hf(d)


def test_load_hf_mismatched_config_names_the_tensor(tmp_path):
    d = _saved(hf_llama("gqa_tied", torch.float32), tmp_path)
    conf = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**conf, "intermediate_size": 40}))
    with pytest.raises(ValueError, match=r"layers.0.mlp.gate_proj.weight.*\(48, 32\).*\(40, 32\)"):
        load_hf(d)
    (d / "config.json").write_text(json.dumps({**conf, "num_hidden_layers": 3}))
    with pytest.raises(ValueError, match="lacks .*model.layers.2"):
        load_hf(d)


@pytest.mark.parametrize("setup, words", [
    ("nothing", "no such model directory"),
    ("empty", "no config.json"),
    ("no_weights", "no weights"),
    ("bert", "model_type 'bert' is not supported"),
])
def test_load_hf_bad_directories_raise(tmp_path, setup, words):
    d = tmp_path / "m"
    if setup != "nothing":
        d.mkdir()
    if setup in ("no_weights", "bert"):
        (d / "config.json").write_text(json.dumps({"model_type": "llama" if setup == "no_weights"
                                                   else "bert"}))
    with pytest.raises(ValueError, match=words):
        load_hf(str(d))


def test_gpt2_from_hf_accepts_old_checkpoint_names():
    """openai-community/gpt2's files: no "transformer." prefix, causal-mask buffers stored."""
    model = hf_gpt2(torch.float64)
    sd = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    for i in range(L):
        sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
        sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    cfg, params = io_gpt2.from_hf(sd, json.loads(model.config.to_json_string()))
    assert_trees_equal(params, io_gpt2.from_hf(model.state_dict(), model.config)[1])


def test_load_hf_unreachable_hub_id_raises(monkeypatch):
    """A hub id needs the network; offline it must fail with a ValueError that says so."""
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="not a local directory and could not be downloaded"):
        load_hf("no-such-org/no-such-model")
