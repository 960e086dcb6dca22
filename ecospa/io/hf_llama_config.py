"""``config.json`` of the LLaMA family (LLaMA, Mistral, Qwen2) <-> ``llama.Config``: reading an
HF config as untrusted input (every unsupported feature is a ValueError naming it) and writing
the config of an export. The tensors are converted in ``ecospa.io.hf_llama``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ecospa.func import llama
from ecospa.io._hf_common import as_dict, cfg_bool, cfg_float, cfg_int, cfg_str

LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _need(c: dict, key: str):
    if c.get(key) is None:
        raise ValueError(f"config has no {key!r}; is this a LLaMA-family config.json?")
    return c[key]


def _rope(c: dict) -> tuple:
    """(rope_theta, rope_scaling or None) from transformers 4 (top-level rope_theta +
    rope_scaling) or 5 (rope_parameters). Unsupported scalings are a ValueError naming them."""
    spec = None
    for key in ("rope_parameters", "rope_scaling"):
        v = c.get(key)
        if v is None:
            continue
        if not isinstance(v, Mapping):
            raise ValueError(f"config {key!r} must be an object or null, got {v!r}")
        if spec is None:
            spec = v
    theta = cfg_float(c, "rope_theta", 10000.0)
    if spec is not None and spec.get("rope_theta") is not None:
        theta = cfg_float(spec, "rope_theta", 10000.0)
    if spec is None:
        return theta, None
    kind = spec.get("rope_type", spec.get("type", "default"))
    scaling = {k: v for k, v in spec.items() if k != "rope_theta"}
    if kind == "dynamic":
        raise ValueError("rope type 'dynamic' is not implemented: its frequencies change with the "
                         "sequence length, which pruned layers (each keeping its own frequencies) "
                         "cannot follow; ecospa cannot reproduce this model's positions")
    return theta, llama._check_rope_scaling(scaling)


def config_from_hf(config: Any, tied: Optional[bool] = None):
    """``llama.Config`` from an HF config; ``tied`` is the fallback for tie_word_embeddings."""
    c = as_dict(config)
    kind = cfg_str(c, "model_type", "llama")
    if kind not in LLAMA_TYPES:
        raise ValueError(f"model_type {kind!r} is not a LLaMA-family model ({LLAMA_TYPES})")
    act = c.get("hidden_act", "silu")
    if not isinstance(act, str) or act != "silu":
        raise ValueError(f"hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if cfg_bool(c, "mlp_bias", False):
        raise ValueError("mlp_bias=True is not supported: ecospa's LLaMA MLP has no biases")
    if cfg_bool(c, "use_sliding_window", False) and kind == "qwen2":
        raise ValueError("Qwen2 sliding-window attention is not implemented; use full attention")
    if kind == "qwen3" and (cfg_bool(c, "use_sliding_window", False)
                            or any(t != "full_attention" for t in (c.get("layer_types") or []))):
        raise ValueError("Qwen3 sliding-window attention is not implemented; use full attention")
    if kind != "qwen2" and cfg_bool(c, "attention_bias", False):
        raise ValueError("attention_bias=True puts a bias on o_proj, which ecospa does not "
                         "represent (Qwen2-style q/k/v biases are supported)")
    for key in ("num_attention_heads", "hidden_size", "vocab_size", "num_hidden_layers",
                "intermediate_size"):
        _need(c, key)
    heads = cfg_int(c, "num_attention_heads")
    dim = cfg_int(c, "hidden_size")
    max_len = cfg_int(c, "max_position_embeddings", 2048, hi=2**40)
    if kind == "mistral" and c.get("sliding_window") is not None:
        # ecospa attends over the full causal prefix: identical only within the window.
        max_len = min(max_len, cfg_int(c, "sliding_window", hi=2**40))
    tie = cfg_bool(c, "tie_word_embeddings")
    theta, scaling = _rope(c)
    return llama.Config(
        vocab_size=cfg_int(c, "vocab_size"), dim=dim, n_layers=cfg_int(c, "num_hidden_layers"),
        n_heads=heads, n_kv_heads=cfg_int(c, "num_key_value_heads", heads),
        ffn_dim=cfg_int(c, "intermediate_size"), head_dim=cfg_int(c, "head_dim", max(1, dim // heads)),
        rope_theta=theta, rope_scaling=scaling, norm_eps=cfg_float(c, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(tied if tie is None else tie), attention_bias=kind == "qwen2",
        qk_norm=kind == "qwen3",
        max_seq_len=max_len, name="llama")  # name = the family (checkpoints dispatch on it)


def config_to_hf(cfg, ffn_dim: int, dtype: torch.dtype) -> dict:
    """The config.json of an export: LLaMA, or Qwen2 when the model has q/k/v biases;
    ``ffn_dim`` is the (uniform) MLP width of the tree, ``dtype`` its weights' dtype."""
    if cfg.qk_norm and cfg.attention_bias:
        raise ValueError("no transformers model has both Qwen3's q/k norms and Qwen2's q/k/v biases")
    kind = "qwen3" if cfg.qk_norm else "qwen2" if cfg.attention_bias else "llama"
    arch = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[kind]
    conf = {"architectures": [arch],
            "model_type": kind, "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim,
            "intermediate_size": ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "hidden_act": "silu", "rms_norm_eps": cfg.norm_eps,
            "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
            "tie_word_embeddings": cfg.tie_embeddings, "dtype": str(dtype).removeprefix("torch.")}
    if cfg.rope_scaling:
        scaling = dict(cfg.rope_scaling)
        if scaling["rope_type"] == "factors":
            raise ValueError("this model's RoPE scaling came from a GGUF's rope_freqs table, which "
                             "transformers cannot express; export it as GGUF instead")
        conf["rope_parameters"] = {**scaling, "rope_theta": cfg.rope_theta}
        conf["rope_scaling"] = dict(scaling)  # transformers 4 reads this key
    if not cfg.attention_bias:
        conf.update(attention_bias=False, mlp_bias=False)
    if cfg.qk_norm:
        conf.update(use_sliding_window=False, layer_types=["full_attention"] * cfg.n_layers)
    return conf


__all__ = ["LLAMA_TYPES", "config_from_hf", "config_to_hf"]
