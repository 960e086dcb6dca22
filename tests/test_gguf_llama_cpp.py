"""ecospa's GGUF exports in REAL llama.cpp (llama-cpp-python): logits and greedy tokens equal
ecospa's on the tree that was exported (not on the file read back by ecospa, whose reader could
mirror an export error), and a gguf-compact file holds fewer parameters in llama.cpp than the
padded one. Skips with the install command when ``llama_cpp`` is absent."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

import ecospa
from ecospa import importance
from ecospa.func import llama
from tolerances import HF, close

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
if importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("llama_cpp is not installed; it builds from source (15-35 min, cmake and g++): "
                "CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python --no-binary llama-cpp-python",
                allow_module_level=True)
import llama_cpp  # noqa: E402

from ecospa.io.gguf_export import save_gguf  # noqa: E402
from ecospa.io.gguf_tokenizer import _byte_alphabet  # noqa: E402


def _tokenizer() -> dict:
    alpha = _byte_alphabet()
    tokens = ["<|endoftext|>"] + [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe"]
    return {"model": "gpt2", "pre": "gpt-2", "tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he"],
            "token_type": [3] + [1] * 259, "bos_token_id": 0, "eos_token_id": 0, "add_bos_token": False}


CFG = llama.Config(vocab_size=260, dim=64, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=96,
                   rope_theta=10000.0, init_std=0.08, max_seq_len=128)


def _pruned(budget: float) -> dict:
    params = llama.init(CFG, seed=3)
    if not budget:
        return params
    groups = llama.coupled_groups(CFG)
    est = importance.random(groups, seed=3)
    return ecospa.pruner(groups, budget=budget)(params, est.scores(est.init(params)))


# llama.cpp's defaults (an f16 KV cache, flash attention chosen automatically, which runs in f16
# on the CPU) move SmolLM2's logits by up to 0.017 (measured); the comparison runs it in f32.
F32 = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)


def _llama(path: str):
    return llama_cpp.Llama(model_path=path, n_ctx=64, logits_all=True, n_threads=1, verbose=False,
                           n_batch=64, **F32)


def _logits(llm, tokens: list) -> torch.Tensor:
    llm.reset()
    llm.eval(tokens)
    return torch.from_numpy(np.array(llm.scores[:len(tokens)], dtype=np.float32))


def _greedy_llama_cpp(llm, prompt: list, n: int) -> list:
    llm.reset()
    llm.eval(prompt)
    out = []
    for _ in range(n):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        llm.eval([tok])
    return out


def _greedy_ecospa(params, prompt: list, n: int) -> list:
    seq = list(prompt)
    for _ in range(n):
        logits = llama.forward(params, torch.tensor([seq]), CFG)
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("budget", [0.0, 0.5])
@pytest.mark.parametrize("fmt", ["compact", "padded"])
def test_llama_cpp_logits_and_greedy_tokens_equal_ecospa(tmp_path, budget, fmt):
    small = _pruned(budget)
    path = str(tmp_path / "m.gguf")
    save_gguf(small, CFG, path, tokenizer_info=_tokenizer(), layout=fmt)
    llm = _llama(path)
    tokens = [int(t) for t in torch.randint(1, 260, (20,), generator=torch.Generator().manual_seed(0))]
    with torch.no_grad():
        close(_logits(llm, tokens), llama.forward(small, torch.tensor([tokens]), CFG)[0], HF)
        assert _greedy_llama_cpp(llm, tokens[:5], 12) == _greedy_ecospa(small, tokens[:5], 12)
    assert llm.tokenize(b"the the", add_bos=False, special=False) == [1 + ord("t"), 258, 259]


def test_compact_file_holds_fewer_parameters_in_llama_cpp(tmp_path):
    small = _pruned(0.5)
    n = {}
    for fmt in ("compact", "padded"):
        path = str(tmp_path / f"{fmt}.gguf")
        save_gguf(small, CFG, path, tokenizer_info=_tokenizer(), layout=fmt)
        llm = _llama(path)  # held while asked: the model dies with it
        n[fmt] = llama_cpp.llama_model_n_params(llm.model)
    mlp_removed = sum(3 * CFG.dim * (CFG.ffn_dim - p["w_up"].shape[1]) for p in small["layers"])
    assert mlp_removed > 0 and n["padded"] - n["compact"] == mlp_removed


@pytest.mark.slow
def test_smollm2_half_pruned_compact_in_llama_cpp(tmp_path):
    """The real model: SmolLM2-135M pruned to half its group parameters (norm-product scores, no
    training), exported gguf-compact f32: llama.cpp's greedy tokens equal ecospa's, and its
    logits are as close to the float64 truth as ecospa's own float32 forward (the untrained pruned
    model is ill-conditioned: ecospa's float32 logits are themselves ~1.5e-3 from float64, more
    than the float32 tolerance, so that bound is the larger of the two)."""
    from ecospa._tree import cast_weights
    from ecospa.io.load import load_model
    from ecospa.jobs.export import export, source_general_info, source_tokenizer_info
    try:
        cfg, params, tok = load_model("smollm2-135m")
    except ValueError as err:
        pytest.skip(str(err))
    groups = llama.coupled_groups(cfg)
    est = importance.norm_product(groups)
    small = ecospa.pruner(groups, budget=0.5)(params, est.scores(est.init(params)))
    path = str(tmp_path / "smol50.gguf")
    export(small, cfg, path, "gguf-compact", tokenizer_info=source_tokenizer_info("smollm2-135m"),
           general=source_general_info("smollm2-135m"))
    llm = llama_cpp.Llama(model_path=path, n_ctx=128, logits_all=True, n_threads=2, verbose=False, **F32)
    src_info = source_tokenizer_info("smollm2-135m")
    assert llm.metadata["tokenizer.chat_template"] == src_info["chat_template"]  # not llama-2's format
    assert "pruned by ecospa" in llm.metadata["general.name"]
    text = "def add(a, b):\n    return a + b  # ½ of ٣٤"
    ids = tok.encode(text).ids
    assert ids == llm.tokenize(text.encode(), add_bos=False, special=False)
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = llama.forward(small, x, cfg)[0]
        truth = llama.forward(cast_weights(small, torch.float64), x, cfg)[0].float()
        theirs = _logits(llm, ids)
        bound = max(HF[torch.float32]["atol"], float((ours - truth).abs().max()))
        assert float((theirs - truth).abs().max()) <= bound
        global CFG
        saved, CFG = CFG, cfg
        try:
            assert _greedy_llama_cpp(llm, ids, 16) == _greedy_ecospa(small, ids, 16)
        finally:
            CFG = saved
