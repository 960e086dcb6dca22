"""GGUF export: a pruned LLaMA tree written by save_gguf reads back (ecospa's own GGUF reader,
which undoes llama.cpp's Q/K permutation) to the same logits; compact() of it is the pruned tree."""
from __future__ import annotations

import os

import optree
import pytest
import torch

import ecospa
from ecospa.func import gpt2, llama
from ecospa.func.padding import compact
from strategies import random_scores
from tolerances import EXACT, close

pytest.importorskip("gguf")
from ecospa.io.gguf import load_gguf  # noqa: E402
from ecospa.io.gguf_export import save_gguf  # noqa: E402

CFG = llama.Config(vocab_size=37, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=24,
                   rope_theta=500.0, init_std=0.3, max_seq_len=64)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5])
def test_round_trip_same_logits(tmp_path, tied, budget):
    cfg = llama.Config(**{**CFG.__dict__, "tie_embeddings": tied})
    params = llama.init(cfg, seed=1)
    groups = llama.coupled_groups(cfg)
    small = ecospa.pruner(groups, budget=budget)(params, random_scores(params, groups, 1)) if budget else params
    before = optree.tree_map(torch.clone, small, namespace="")
    info = save_gguf(small, cfg, tmp_path / "m.gguf")
    back_cfg, back, _ = load_gguf(tmp_path / "m.gguf")
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    close(llama.forward(back, x, back_cfg), llama.forward(small, x, cfg), EXACT)
    again = compact(back, back_cfg)
    assert [t.shape for t in optree.tree_leaves(again, namespace="")] == \
        [t.shape for t in optree.tree_leaves(small, namespace="")]
    for a, b in zip(optree.tree_leaves(small, namespace=""), optree.tree_leaves(before, namespace="")):
        assert torch.equal(a, b)
    assert bool(info["notes"]) == (budget > 0)


def test_tokenizer_metadata_is_carried(tmp_path):
    from ecospa.io.gguf import tokenizer_info
    import gguf
    params = llama.init(CFG)
    tok = {"model": "gpt2", "tokens": [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(37)],
           "token_type": [1] * 37, "merges": ["a a"], "bos_token_id": 1, "eos_token_id": 2}
    save_gguf(params, CFG, tmp_path / "t.gguf", tokenizer_info=tok)
    got = tokenizer_info(gguf.GGUFReader(str(tmp_path / "t.gguf")))
    assert got["tokens"] == tok["tokens"] and got["merges"] == tok["merges"]
    assert got["eos_token_id"] == 2 and got["model"] == "gpt2"


def test_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path):
    params = llama.init(CFG)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"user data")
    with pytest.raises(ValueError, match="exists"):
        save_gguf(params, CFG, target)
    assert target.read_bytes() == b"user data"
    with pytest.raises(ValueError, match="end in .gguf"):
        save_gguf(params, CFG, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="llama family only"):
        save_gguf(gpt2.init(gpt2.Config()), gpt2.Config(), tmp_path / "g.gguf")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]


def _pruned(cfg, budget=0.5, seed=1):
    params = llama.init(cfg, seed=seed)
    groups = llama.coupled_groups(cfg)
    return ecospa.pruner(groups, budget=budget)(params, random_scores(params, groups, seed))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5])
def test_compact_round_trip_keeps_each_layers_width(tmp_path, tied, budget):
    cfg = llama.Config(**{**CFG.__dict__, "tie_embeddings": tied})
    small = _pruned(cfg, budget) if budget else llama.init(cfg, seed=1)
    before = optree.tree_map(torch.clone, small, namespace="")
    info = save_gguf(small, cfg, tmp_path / "c.gguf", layout="compact")
    widths = [p["w_up"].shape[1] for p in small["layers"]]
    assert info["architecture"] == "deci" and info["mlp_widths"] == widths
    back_cfg, back, _ = load_gguf(tmp_path / "c.gguf")
    assert back_cfg.ffn_dim == cfg.ffn_dim  # the dense width, kept for padding and statistics
    assert [p["w_up"].shape[1] for p in back["layers"]] == widths
    assert [p["w_down"].shape[0] for p in back["layers"]] == widths
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    close(llama.forward(back, x, back_cfg), llama.forward(small, x, cfg), EXACT)
    for a, b in zip(optree.tree_leaves(small, namespace=""), optree.tree_leaves(before, namespace="")):
        assert torch.equal(a, b)


def test_compact_writes_a_per_layer_array_and_a_smaller_file(tmp_path):
    import gguf
    from ecospa.io.gguf_export import DENSE_FFN_KEY
    small = _pruned(CFG, 0.5)
    widths = [p["w_up"].shape[1] for p in small["layers"]]
    assert len(set(widths)) > 1  # the test needs layers of different widths
    save_gguf(small, CFG, tmp_path / "p.gguf")
    save_gguf(small, CFG, tmp_path / "c.gguf", layout="compact")
    r = gguf.GGUFReader(str(tmp_path / "c.gguf"))
    assert r.fields["general.architecture"].contents() == "deci"
    assert r.fields["deci.feed_forward_length"].contents() == widths
    assert r.fields[DENSE_FFN_KEY].contents() == CFG.ffn_dim
    shapes = {t.name: tuple(int(d) for d in t.shape) for t in r.tensors}  # GGUF order: [in, out]
    for i, w in enumerate(widths):
        assert shapes[f"blk.{i}.ffn_up.weight"] == (CFG.dim, w)
        assert shapes[f"blk.{i}.ffn_down.weight"] == (w, CFG.dim)
        assert shapes[f"blk.{i}.attn_q.weight"] == (CFG.dim, CFG.n_heads * CFG.head_dim)  # padded
    saved = 4 * 3 * CFG.dim * sum(CFG.ffn_dim - w for w in widths)  # f32 MLP weights left out
    padded, compact_ = os.path.getsize(tmp_path / "p.gguf"), os.path.getsize(tmp_path / "c.gguf")
    assert compact_ < padded and padded - compact_ >= saved - 4096  # up to alignment padding


def test_compact_refuses_what_it_cannot_hold(tmp_path):
    small = _pruned(CFG, 0.5)
    layers = list(small["layers"])
    layers[1] = {**layers[1], "w_gate": layers[1]["w_gate"][:, :0], "w_up": layers[1]["w_up"][:, :0],
                 "w_down": layers[1]["w_down"][:0]}
    with pytest.raises(ValueError, match="layer 1 has no MLP neuron left"):
        save_gguf({**small, "layers": tuple(layers)}, CFG, tmp_path / "c.gguf", layout="compact")
    with pytest.raises(ValueError, match="llama family only"):
        save_gguf(gpt2.init(gpt2.Config()), gpt2.Config(), tmp_path / "g.gguf", layout="compact")
    biased = llama.Config(**{**CFG.__dict__, "attention_bias": True})
    with pytest.raises(ValueError, match="biases"):
        save_gguf(llama.init(biased), biased, tmp_path / "b.gguf", layout="compact")
    with pytest.raises(ValueError, match="layout must be one of"):
        save_gguf(small, CFG, tmp_path / "x.gguf", layout="tiny")
    assert os.listdir(tmp_path) == []


def test_reader_checks_per_layer_metadata(tmp_path):
    import gguf
    small = _pruned(CFG, 0.5)
    save_gguf(small, CFG, tmp_path / "c.gguf", layout="compact")
    data = (tmp_path / "c.gguf").read_bytes()
    r = gguf.GGUFReader(str(tmp_path / "c.gguf"))
    field = r.fields["deci.feed_forward_length"]
    first = int(field.data[0])
    offset = int(field.parts[field.data[0]].ctypes.data - r.data.ctypes.data)  # the first width's bytes
    bad = bytearray(data)
    bad[offset:offset + 4] = (first + 1).to_bytes(4, "little")
    (tmp_path / "bad.gguf").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="does not belong to these tensors"):
        load_gguf(tmp_path / "bad.gguf")


def _source(tmp_path):
    """A dense source GGUF with a byte-level vocabulary, a chat template, tokenizer flags and
    general.* metadata (written by ecospa's exporter from explicit metadata)."""
    import gguf
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    alpha = _byte_alphabet()
    tokens = ["<|endoftext|>", "<|im_start|>"] + [alpha[b] for b in range(256)] + ["Ġt", "he"]
    tok = {"model": "gpt2", "pre": "smollm", "tokens": tokens, "merges": ["Ġ t", "h e"],
           "token_type": [3, 3] + [1] * 258, "bos_token_id": 1, "eos_token_id": 0,
           "padding_token_id": 0, "add_bos_token": False, "add_eos_token": True,
           "add_space_prefix": False, "chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}{% endfor %}"}
    S, A = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)
    general = {"general.name": {"value": "Tiny Test Model", "type": S, "sub_type": None},
               "general.basename": {"value": "tiny", "type": S, "sub_type": None},
               "general.size_label": {"value": "7K", "type": S, "sub_type": None},
               "general.license": {"value": "apache-2.0", "type": S, "sub_type": None},
               "general.organization": {"value": "TestOrg", "type": S, "sub_type": None},
               "general.languages": {"value": ["en", "fr"], "type": A, "sub_type": S}}
    cfg = llama.Config(**{**CFG.__dict__, "vocab_size": len(tokens)})
    save_gguf(llama.init(cfg, seed=2), cfg, tmp_path / "src.gguf", tokenizer_info=tok, general=general)
    return cfg, tok, tmp_path / "src.gguf"


def _fields(path) -> dict:
    import gguf
    return {k: f.contents() for k, f in gguf.GGUFReader(str(path)).fields.items()
            if not k.startswith("GGUF.")}


@pytest.mark.parametrize("fmt", ["gguf", "gguf-compact"])
def test_cli_export_carries_tokenizer_flags_chat_template_and_general(tmp_path, fmt):
    from ecospa import cli
    cfg, tok, src = _source(tmp_path)
    out = tmp_path / "out.gguf"
    assert cli.main(["export", "--model", str(src), "--format", fmt, "--out", str(out)]) == 0
    got, want = _fields(out), _fields(src)
    for key in ("tokenizer.chat_template", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "general.name", "general.basename", "general.size_label", "general.license",
                "general.organization", "general.languages"):
        assert got[key] == want[key], key
    assert want["tokenizer.ggml.add_eos_token"] is True and want["general.languages"] == ["en", "fr"]
    assert got["general.architecture"] == ("deci" if fmt == "gguf-compact" else "llama")


def test_pruned_export_says_so_and_names_its_base_model(tmp_path):
    from ecospa.jobs.export import export, source_general_info, source_tokenizer_info
    cfg, tok, src = _source(tmp_path)
    small = _pruned(cfg, 0.5)
    export(small, cfg, str(tmp_path / "p.gguf"), "gguf-compact", tokenizer_info=source_tokenizer_info(str(src)),
           general=source_general_info(str(src)))
    got = _fields(tmp_path / "p.gguf")
    assert got["general.name"].startswith("Tiny Test Model (pruned by ecospa, ")
    assert got["general.size_label"] != "7K" and got["general.license"] == "apache-2.0"
    assert "structurally pruned by ecospa" in got["general.description"]
    assert got["general.base_model.count"] == 1
    assert got["general.base_model.0.name"] == "Tiny Test Model"
    assert got["general.base_model.0.organization"] == "TestOrg"
    assert got["tokenizer.chat_template"] == tok["chat_template"]


@pytest.mark.parametrize("fmt", ["gguf", "gguf-compact", "hf-padded", "hf-compact"])
def test_exports_get_the_ordinary_file_mode(tmp_path, fmt):
    from ecospa.jobs.export import export
    old = os.umask(0o022)
    try:
        out = tmp_path / ("m.gguf" if fmt.startswith("gguf") else "m")
        export(llama.init(CFG), CFG, str(out), fmt)
    finally:
        os.umask(old)
    paths = [out] if out.is_file() else [out] + sorted(out.rglob("*"))
    assert len(paths) >= 1
    for p in paths:
        assert p.stat().st_mode & 0o777 == (0o755 if p.is_dir() else 0o644), p


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 2.5},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 16}])
def test_compact_carries_rope_scaling(tmp_path, scaling):
    cfg = llama.Config(**{**CFG.__dict__, "rope_scaling": scaling})
    small = _pruned(cfg, 0.5)
    save_gguf(small, cfg, tmp_path / "c.gguf", layout="compact")
    back_cfg, back, _ = load_gguf(tmp_path / "c.gguf")
    assert dict(back_cfg.rope_scaling)["rope_type"] == ("linear" if scaling["rope_type"] == "linear" else "factors")
    close(llama.inv_freq(back_cfg), llama.inv_freq(cfg))
    x = torch.randint(0, 37, (2, 40), generator=torch.Generator().manual_seed(0))
    close(llama.forward(back, x, back_cfg), llama.forward(small, x, cfg), EXACT)


def test_reader_refuses_per_layer_heads_and_llama_per_layer_widths(tmp_path):
    """Files ecospa's reader cannot hold are refused by name, not misread."""
    import gguf
    from ecospa.io.gguf import hf_config

    def header(arch, **kv):
        w = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
        w.add_block_count(2)
        w.add_embedding_length(16)
        w.add_head_count(kv.get("heads", 4))
        w.add_feed_forward_length(kv.get("ffn", 24))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return gguf.GGUFReader(str(tmp_path / f"{arch}.gguf"))
    with pytest.raises(ValueError, match="deci.attention.head_count is a per-layer array"):
        hf_config(header("deci", heads=[4, 2], ffn=[8, 9]))
    with pytest.raises(ValueError, match="llama.feed_forward_length is a per-layer array"):
        hf_config(header("llama", ffn=[8, 9]))
    with pytest.raises(ValueError, match="must hold 2 widths >= 1"):
        hf_config(header("deci", ffn=[8, 0]))
