"""``ecospa export --dtype f16`` casts the WEIGHTS only (issue 23, item 8): the rotary
frequencies (``inv_freq``) stay float32 bit for bit in every format, so the phase at long
positions is the source's; the padded f16 export loads in stock ``transformers``."""
from __future__ import annotations

import os

import optree
import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402

import ecospa  # noqa: E402
from ecospa import cli  # noqa: E402
from ecospa._tree import FP32_BUFFERS  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.io import checkpoint  # noqa: E402
from ecospa.io.load import load_model  # noqa: E402
from strategies import random_scores  # noqa: E402
from tolerances import HALF, HF, close  # noqa: E402

CFG = llama.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                   ffn_dim=48, rope_theta=10000.0, init_std=0.2)
FORMATS = ("hf-padded", "hf-compact")
LONG = 2048  # positions 0..2047: the phase error of f16 frequencies grows with the position


def _pruned_f32():
    params = llama.init(CFG, seed=3, dtype=torch.float32)
    groups = llama.coupled_groups(CFG)
    return ecospa.pruner(groups, budget=0.5)(params, random_scores(params, groups, 3))


def _rounded(params):
    """The obviously-right f16 export: every weight matrix rounded to f16, all else untouched."""
    return optree.tree_map_with_path(
        lambda path, x: x.half().float() if x.ndim > 1 and path[-1] not in FP32_BUFFERS else x,
        params, namespace="")


def _export_f16(tmp_path, params, fmt):
    checkpoint.save(tmp_path / "ck", params, CFG, extra={})
    out = tmp_path / fmt
    rc = cli.main(["export", "--model", str(tmp_path / "ck"), "--format", fmt, "--dtype", "f16",
                   "--out", str(out)])
    assert rc == 0
    return str(out)


@pytest.mark.parametrize("fmt", FORMATS)
def test_f16_export_keeps_rotary_frequencies_float32(tmp_path, fmt, capsys):
    small = _pruned_f32()
    assert {2 * p["wq"].shape[-1] for p in small["layers"]} != {CFG.head_dim}, "prune rotary pairs"
    out = _export_f16(tmp_path, small, fmt)
    sd = load_file(os.path.join(out, "model.safetensors"))
    assert sd["model.layers.0.mlp.up_proj.weight"].dtype == torch.float16  # the weights are f16
    if fmt == "hf-compact":  # the file's buffers: float32, bit for bit the source's
        for i, p in enumerate(small["layers"]):
            freq = sd[f"model.layers.{i}.self_attn.inv_freq"]
            assert freq.dtype == torch.float32 and torch.equal(freq, p["inv_freq"])
    cfg2, back, _ = load_model(out, compact=True)
    for p, q in zip(back["layers"], small["layers"]):
        assert p["inv_freq"].dtype == torch.float32 and torch.equal(p["inv_freq"], q["inv_freq"])
        phase = (LONG - 1) * p["inv_freq"].double() - (LONG - 1) * q["inv_freq"].double()
        assert phase.abs().max().item() == 0.0  # radians at position 2047
    # the whole model at long positions: exactly the source with f16-rounded weights
    x = torch.randint(0, CFG.vocab_size, (1, LONG), generator=torch.Generator().manual_seed(0))
    want = llama.forward(_rounded(small), x, CFG)[:, -16:]
    close(llama.forward(back, x, cfg2)[:, -16:], want, HF)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=fmt == "hf-compact", dtype=torch.float32, attn_implementation="eager"
        if fmt == "hf-padded" else None).eval()
    with torch.no_grad():
        close(model(x).logits[:, -16:], want, HF)


def test_f16_padded_export_runs_in_f16_in_stock_transformers(tmp_path):
    """Loaded as float16 (its config's dtype) with no custom code: close to the f32 model."""
    small = _pruned_f32()
    out = _export_f16(tmp_path, small, "hf-padded")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float16).eval()
    assert model.dtype == torch.float16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    x = torch.randint(0, CFG.vocab_size, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x).logits
    assert got.dtype == torch.float16
    close(got, llama.forward(small, x, CFG).half(), HALF)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_native_checkpoint_loaded_in_half_precision_keeps_float32_frequencies(tmp_path, dtype):
    small = _pruned_f32()
    checkpoint.save(tmp_path / "ck", small, CFG, extra={})
    _, back, _ = load_model(str(tmp_path / "ck"), dtype=dtype)
    assert back["layers"][0]["w_up"].dtype == dtype
    for p, q in zip(back["layers"], small["layers"]):
        assert p["inv_freq"].dtype == torch.float32 and torch.equal(p["inv_freq"], q["inv_freq"])
