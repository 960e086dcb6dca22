"""RoPE scaling (Llama 3.x ``llama3``, ``linear``, GGUF ``rope_freqs``): the kept rotary pairs keep
their ORIGINAL scaled frequencies, logits equal transformers past the original context length,
and every export carries the scaling back out."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ecospa  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.io import hf_llama as io_llama  # noqa: E402
from ecospa.io.checkpoint import load as load_checkpoint, save as save_checkpoint  # noqa: E402
from ecospa.io.load import load_model  # noqa: E402
from ecospa.jobs.export import export  # noqa: E402
from tolerances import EXACT, HF, close  # noqa: E402

OLD = 32  # original context: the test sequences (T = 40) run past it
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": OLD}
LINEAR = {"rope_type": "linear", "factor": 2.5}
V, D, T = 64, 32, 40


def hf_model(scaling: dict, dtype=torch.float64):
    conf = transformers.LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=2, num_attention_heads=2,
                                    num_key_value_heads=1, head_dim=16, intermediate_size=48,
                                    rope_theta=500.0, rope_scaling=dict(scaling),
                                    max_position_embeddings=4 * OLD, tie_word_embeddings=False)
    conf._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(conf).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype)


def toks(seed=1):
    return torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(seed))


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


def test_llama3_frequencies_are_the_documented_formula():
    cfg = llama.Config(head_dim=16, rope_theta=500.0, rope_scaling=LLAMA3)
    base = 1.0 / 500.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    got = llama.inv_freq(cfg).double()
    for b, g in zip(base.tolist(), got.tolist()):
        wavelen = 2 * math.pi / b
        if wavelen < OLD / 4:           # high frequency: kept
            want = b
        elif wavelen > OLD / 1:         # low frequency: divided by the factor
            want = b / 8
        else:                           # a blend, weight (OLD / wavelen - 1) / (4 - 1) on the original
            s = (OLD / wavelen - 1) / 3
            want = (1 - s) * b / 8 + s * b
        assert g == pytest.approx(want, rel=1e-6)
    kinds = {(w := 2 * math.pi / b) < OLD / 4, w > OLD} 
    assert kinds == {True, False}  # the test config really has pairs of every kind
    assert llama.inv_freq(dataclasses.replace(cfg, rope_scaling=LINEAR)).double() == \
        pytest.approx((base / 2.5).tolist(), rel=1e-6)


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_logits_equal_transformers_past_the_original_context(scaling, dtype):
    model = hf_model(scaling, dtype)
    cfg, params = io_llama.from_hf(model.state_dict(), model.config)
    assert dict(cfg.rope_scaling)["rope_type"] == scaling["rope_type"]
    x = toks()
    close(llama.forward(params, x, cfg), logits(model, x), HF)


@pytest.mark.parametrize("scaling", [LLAMA3, LINEAR], ids=["llama3", "linear"])
def test_pruned_rotary_pairs_keep_their_scaled_frequencies_and_export_exactly(tmp_path, scaling):
    model = hf_model(scaling)
    cfg, params = io_llama.from_hf(model.state_dict(), model.config)
    groups = llama.coupled_groups(cfg)
    g = torch.Generator().manual_seed(3)
    scores = {n: torch.rand(b, k, generator=g) for n, (b, k) in ecospa.validate(params, groups).items()}
    keep = ecospa.select(params, groups, scores, sparsity=0.5)
    small, masked = ecospa.slice_units(params, groups, keep), ecospa.mask(params, groups, keep)
    x = toks()
    close(llama.forward(small, x, cfg), llama.forward(masked, x, cfg), EXACT)
    full = llama.inv_freq(cfg)
    for i, p in enumerate(small["layers"]):  # each kept pair carries its own scaled frequency
        kept = keep[f"layers.{i}.qk"]
        assert torch.equal(p["inv_freq"], full[kept.long()].reshape(p["inv_freq"].shape).to(p["inv_freq"]))
    want = llama.forward(small, x, cfg)
    # padded: stock transformers, with the scaling in config.json
    out = export(small, cfg, str(tmp_path / "padded"), "hf-padded")["path"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                           dtype=torch.float64).eval()
    close(logits(hf, x), want, HF)
    # compact (remote code) and back into ecospa: the config keeps the scaling
    out = export(small, cfg, str(tmp_path / "compact"), "hf-compact")["path"]
    rc = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True,
                                                           dtype=torch.float64).eval()
    close(logits(rc, x), want, HF)
    cfg2, back, _ = load_model(out, dtype=torch.float64)
    assert cfg2.rope_scaling == cfg.rope_scaling
    close(llama.forward(back, x, cfg2), want, EXACT)
    # GGUF: llama3 as the rope_freqs tensor, linear as metadata; ecospa reads both back
    pytest.importorskip("gguf")
    out = export(small, cfg, str(tmp_path / "m.gguf"), "gguf")["path"]
    cfg3, back, _ = load_model(out, dtype=torch.float64, compact=True)
    assert dict(cfg3.rope_scaling)["rope_type"] == ("linear" if scaling is LINEAR else "factors")
    close(llama.inv_freq(cfg3), full)
    close(llama.forward(back, x, cfg3), want, HF)
    # native checkpoint
    save_checkpoint(tmp_path / "ck", small, cfg)
    back, cfg4, _ = load_checkpoint(tmp_path / "ck")
    assert cfg4 == cfg and cfg4.rope_scaling == cfg.rope_scaling


@pytest.mark.parametrize("spec, words", [
    ({"rope_type": "dynamic", "factor": 2.0}, "dynamic"),
    ({"rope_type": "llama3", "factor": 8.0}, "needs 'low_freq_factor'"),
    ({**LLAMA3, "high_freq_factor": 1.0}, "high_freq_factor > low_freq_factor"),
    ({"rope_type": "linear", "factor": float("nan")}, "number > 0"),
    ({"rope_type": "factors", "factors": [1.0, 0.0]}, "numbers > 0"),
    ("llama3", "must be a dict"),
])
def test_bad_scalings_are_refused_by_name(spec, words):
    with pytest.raises(ValueError, match=words):
        llama.Config(rope_scaling=spec)


def test_a_rope_freqs_model_cannot_go_to_transformers(tmp_path):
    cfg = llama.Config(head_dim=16, rope_scaling={"rope_type": "factors", "factors": [1.0] * 4 + [2.0] * 4})
    params = llama.init(cfg)
    with pytest.raises(ValueError, match="rope_freqs"):
        io_llama.to_hf(params, cfg)
