"""Hostile or nonsense model files: every reader bounds what it allocates by what the file can
hold and fails with one clear ValueError (issue 9, part C). Tests run under a memory cap."""
from __future__ import annotations

import contextlib
import json
import os
import resource
import struct
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ecospa.func import gpt2, llama
from ecospa.io import hf_gpt2, hf_llama
from ecospa.io.hf import load_hf
from _helpers import hf_llama_state_dict as _sd

HF_CFG = dict(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=24, head_dim=4, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, model_type="llama")


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@contextlib.contextmanager
def memory_cap(extra: int = 1 << 30):
    """Lower this process's address-space limit to what it uses now + ``extra`` (then restore):
    a reader that allocates by a size read from a file hits MemoryError instead of the machine."""
    if not os.path.exists("/proc/self/status"):  # not Linux: run uncapped
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _vm_bytes() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _hf_dir(path, config, sd=None):
    from safetensors.torch import save_file
    path.mkdir(parents=True, exist_ok=True)
    save_file(sd if sd is not None else _sd(HF_CFG), str(path / "model.safetensors"))
    (path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return path


# --- HF config.json ------------------------------------------------------------------------------

@pytest.mark.parametrize("change, words", [
    ({"num_hidden_layers": 1_000_000_000}, "num_hidden_layers"),
    ({"vocab_size": 10**12}, "vocab_size"),
    ({"tie_word_embeddings": "false"}, "tie_word_embeddings"),
    ({"hidden_size": "16"}, "hidden_size"),
    ({"num_attention_heads": 0}, "num_attention_heads"),
    ({"num_key_value_heads": -2}, "num_key_value_heads"),
    ({"intermediate_size": 24.5}, "intermediate_size"),
    ({"num_hidden_layers": True}, "num_hidden_layers"),
    ({"rms_norm_eps": -1e-5}, "rms_norm_eps"),
    ({"rms_norm_eps": 0.0}, "rms_norm_eps"),
    ({"rms_norm_eps": "1e-5"}, "rms_norm_eps"),
    ({"rope_theta": -10000.0}, "rope_theta"),
    ({"rope_theta": 0}, "rope_theta"),
    ({"rope_theta": float("nan")}, "rope_theta"),
])
def test_hf_config_nonsense_is_a_clear_error(tmp_path, change, words):
    d = _hf_dir(tmp_path / "m", {**HF_CFG, **change})
    t0 = time.perf_counter()
    with memory_cap(), pytest.raises(ValueError, match=words):
        load_hf(str(d))
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("text", ["[]", "null", "\"llama\"", "3", "{\"model_type\": [1]}"])
def test_hf_config_that_is_not_an_object(tmp_path, text):
    d = _hf_dir(tmp_path / "m", text)
    with pytest.raises(ValueError, match="config.json"):
        load_hf(str(d))


def test_gpt2_config_nonsense_is_a_clear_error():
    cfg = gpt2.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2, max_seq_len=8)
    sd, conf = hf_gpt2.to_hf(gpt2.init(cfg), cfg)
    for change, words in [({"layer_norm_epsilon": -1e-5}, "layer_norm_epsilon"),
                          ({"layer_norm_epsilon": 0}, "layer_norm_epsilon"),
                          ({"n_layer": 10**9}, "n_layer"), ({"n_embd": "8"}, "n_embd"),
                          ({"tie_word_embeddings": "false"}, "tie_word_embeddings")]:
        with memory_cap(), pytest.raises(ValueError, match=words):
            hf_gpt2.from_hf(sd, {**conf, **change})


@pytest.mark.parametrize("entry", ["../outside.bin", "/abs/outside.bin", "sub/../../outside.bin"])
def test_shard_index_cannot_point_outside_the_model_directory(tmp_path, entry):
    sd = _sd(HF_CFG)
    torch.save(sd, tmp_path / "outside.bin")  # a readable file outside the model directory
    if entry.startswith("/abs"):
        entry = str(tmp_path / "outside.bin")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(HF_CFG))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {k: entry for k in sd}}))
    with pytest.raises(ValueError, match="outside the model directory"):
        load_hf(str(d))


def test_shard_index_inside_the_directory_still_loads(tmp_path):
    sd = _sd(HF_CFG)
    d = tmp_path / "m"
    (d / "sub").mkdir(parents=True)
    keys = sorted(sd)
    torch.save({k: sd[k] for k in keys[:5]}, d / "sub" / "a.bin")
    torch.save({k: sd[k] for k in keys[5:]}, d / "b.bin")
    (d / "config.json").write_text(json.dumps(HF_CFG))
    (d / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"weight_map": {**{k: "sub/a.bin" for k in keys[:5]}, **{k: "./b.bin" for k in keys[5:]}}}))
    _, cfg, params = load_hf(str(d))
    assert cfg.n_layers == 2 and not cfg.tie_embeddings


_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                     | st.floats(allow_nan=True) | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids, max_size=3),
                     max_leaves=6)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=st.dictionaries(st.sampled_from(sorted(HF_CFG) + [
    "rope_scaling", "rope_parameters", "hidden_act", "max_position_embeddings", "sliding_window",
    "attention_bias", "mlp_bias"]), _JSON, max_size=3), drop=st.sets(st.sampled_from(sorted(HF_CFG)), max_size=2))
def test_fuzz_hf_config_reader(changes, drop):
    """Mutated config.json values: from_hf either loads or raises ValueError, never anything else."""
    conf = {k: v for k, v in {**HF_CFG, **changes}.items() if k not in drop}
    sd = _SD
    with memory_cap():
        try:
            cfg, params = hf_llama.from_hf(sd, conf)
        except ValueError:
            return
    assert cfg.n_layers == 2


_SD = _sd(HF_CFG)


@settings(max_examples=40, deadline=None)
@given(text=st.one_of(st.binary(max_size=64).map(lambda b: b.decode("latin-1")),
                      _JSON.map(json.dumps)))
def test_fuzz_hf_config_file(tmp_path_factory, text):
    d = tmp_path_factory.mktemp("fz")
    _hf_dir(d, text, _SD)
    with memory_cap():
        with pytest.raises(ValueError):
            load_hf(str(d))


# --- GGUF ----------------------------------------------------------------------------------------

def _gguf_file(path, config=None, sd=None):
    gguf = pytest.importorskip("gguf")
    from test_gguf import write_gguf
    c = dict(HF_CFG, **(config or {}))
    write_gguf(path, sd if sd is not None else _sd(HF_CFG), c)
    del gguf
    return path


def _raw_gguf(kvs: bytes, n_kv: int, n_tensors: int = 0, tail: bytes = b"") -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kvs + tail


def _key(name: str) -> bytes:
    return struct.pack("<Q", len(name)) + name.encode()


def test_gguf_block_count_beyond_the_file_fails_fast(tmp_path):
    from ecospa.io.gguf import load_gguf
    path = _gguf_file(tmp_path / "m.gguf", {"num_hidden_layers": 10**9})
    t0 = time.perf_counter()
    with memory_cap(), pytest.raises(ValueError, match="block_count|num_hidden_layers"):
        load_gguf(path)
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("elem_type", [0, 8, 9])  # uint8, string, array
def test_gguf_huge_array_fails_fast(tmp_path, elem_type):
    pytest.importorskip("gguf")
    from ecospa.io.gguf import load_gguf
    kv = _key("general.architecture") + struct.pack("<I", 8) + _key("llama")
    kv += _key("x.huge") + struct.pack("<IIQ", 9, elem_type, 2**40) + b"\0" * 64
    (tmp_path / "a.gguf").write_bytes(_raw_gguf(kv, 2))
    t0 = time.perf_counter()
    with memory_cap(), pytest.raises(ValueError, match="x.huge"):
        load_gguf(tmp_path / "a.gguf")
    assert time.perf_counter() - t0 < 5


@pytest.mark.parametrize("what", ["tensor_count", "kv_count", "string", "dims", "data"])
def test_gguf_counts_beyond_the_file(tmp_path, what):
    pytest.importorskip("gguf")
    from ecospa.io.gguf import load_gguf
    if what == "tensor_count":
        data = _raw_gguf(b"", 0, n_tensors=2**62)
    elif what == "kv_count":
        data = _raw_gguf(b"", 2**62)
    elif what == "string":
        data = _raw_gguf(struct.pack("<Q", 2**50) + b"abc", 1)
    else:
        dims = [2**40, 2**40] if what == "dims" else [4, 4]
        info = _key("w") + struct.pack("<I", 2) + struct.pack("<2Q", *dims) + struct.pack("<IQ", 0, 0)
        data = _raw_gguf(b"", 0, n_tensors=1, tail=info + b"\0" * 40)
    (tmp_path / "a.gguf").write_bytes(data)
    with memory_cap(), pytest.raises(ValueError, match="GGUF"):
        load_gguf(tmp_path / "a.gguf")


@pytest.mark.parametrize("key, value, words", [
    ("head_count", 0, "num_attention_heads"),
    ("head_count_kv", 0, "num_key_value_heads"),
    ("layer_norm_rms_eps", -1.0, "rms_norm_eps"),
    ("rope_freq_base", 0.0, "rope_theta"),
])
def test_gguf_nonsense_metadata(tmp_path, key, value, words):
    gguf = pytest.importorskip("gguf")
    from ecospa.io.gguf import load_gguf
    from test_gguf import write_gguf
    real = getattr(gguf.GGUFWriter, f"add_{key}")

    def patched(self, v):
        return real(self, value)

    try:
        setattr(gguf.GGUFWriter, f"add_{key}", patched)
        write_gguf(tmp_path / "m.gguf", _sd(HF_CFG), HF_CFG)
    finally:
        setattr(gguf.GGUFWriter, f"add_{key}", real)
    with memory_cap(), pytest.raises(ValueError, match=words):
        load_gguf(tmp_path / "m.gguf")


@pytest.fixture(scope="module")
def gguf_bytes(tmp_path_factory):
    path = _gguf_file(tmp_path_factory.mktemp("g") / "m.gguf")
    return path.read_bytes()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_gguf_header(gguf_bytes, tmp_path_factory, data):
    """Random byte edits in the header/metadata/tensor-info part: only ValueError, bounded memory."""
    from ecospa.io.gguf import load_gguf
    from test_gguf import write_gguf  # noqa: F401  (needs gguf)
    buf = bytearray(gguf_bytes)
    head = min(len(buf), 2400)  # metadata and tensor infos live at the start
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, head - 1))
        kind = data.draw(st.sampled_from(["byte", "u64", "cut"]))
        if kind == "byte":
            buf[at] = data.draw(st.integers(0, 255))
        elif kind == "u64":
            buf[at:at + 8] = struct.pack("<Q", data.draw(st.sampled_from(
                [0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1])))
        else:
            del buf[at:]
            break
    path = tmp_path_factory.mktemp("fz") / "m.gguf"
    path.write_bytes(bytes(buf))
    with memory_cap():
        try:
            load_gguf(path)
        except ValueError:
            pass


# --- token ids -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_forward_rejects_out_of_range_token_ids(family):
    mod = llama if family == "llama" else gpt2
    cfg = mod.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2)
    params = mod.init(cfg)
    for bad in (-1, 11, 10**6):
        with pytest.raises(ValueError, match=r"token id.*\[0, 11\)"):
            mod.forward(params, torch.tensor([[1, bad, 2]]), cfg)
    assert mod.forward(params, torch.tensor([[0, 10]]), cfg).shape == (1, 2, 11)
    assert mod.forward(params, torch.zeros(1, 0, dtype=torch.long), cfg).shape == (1, 0, 11)


def test_gpt2_forward_rejects_sequences_longer_than_its_positions():
    cfg = gpt2.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2, max_seq_len=4)
    with pytest.raises(ValueError, match="positions"):
        gpt2.forward(gpt2.init(cfg), torch.zeros(1, 5, dtype=torch.long), cfg)


@pytest.mark.parametrize("field, value", [("norm_eps", -1e-5), ("norm_eps", 0.0),
                                          ("rope_theta", -1.0), ("rope_theta", float("inf")),
                                          ("n_layers", True), ("dim", 8.0)])
def test_config_rejects_nonsense(field, value):
    with pytest.raises(ValueError, match=field):
        llama.Config(**{field: value})
    if field != "rope_theta":
        with pytest.raises(ValueError, match=field):
            gpt2.Config(**{field: value})



@pytest.mark.parametrize("tokens, merges, types", [
    ([1, 2, 3] * 14, ["a b"], [1] * 42),
    (["a"] * 40, [5, 6], [1] * 40),
    (["a"] * 40, ["a b"], [1] * 40),     # a merge of tokens that are not in the vocabulary
    (["a"] * 40, ["ab"], [1] * 40),
])
def test_gguf_nonsense_tokenizer_is_a_value_error(tmp_path, tokens, merges, types):
    pytest.importorskip("gguf")
    from ecospa.io.load import load_model
    from test_gguf import write_gguf
    write_gguf(tmp_path / "m.gguf", _sd(HF_CFG), HF_CFG,
               tokenizer={"tokens": tokens, "merges": merges, "token_type": types})
    with pytest.raises(ValueError, match="tokenizer"):
        load_model(tmp_path / "m.gguf")
