"""Compact export for ``transformers`` with custom code: real savings, per-layer sizes.

``save_hf_compact(params, cfg, directory)`` writes config.json (model_type "ecospa_llama",
per-layer ``layer_qk_pairs``, ``layer_v_dims``, ``layer_ffn_dims``, the original ``head_dim`` for
the scale, and ``auto_map``), model.safetensors (each layer's kept rotary frequencies as the
buffer ``self_attn.inv_freq``) and ``modeling_ecospa.py``, a self-contained modeling file, so

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

loads the pruned shapes and ``model.generate()`` works with the default dynamic cache.
LLaMA family only (LLaMA, Mistral without sliding window, Qwen2-style q/k/v biases).
"""
from __future__ import annotations

import os

import torch

from ecospa.func import llama

MODELING = os.path.join(os.path.dirname(__file__), "_remote_modeling.py")


def to_hf_compact(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) of the compact remote-code layout; ``params`` unchanged."""
    if not isinstance(cfg, llama.Config):
        raise ValueError(f"hf-compact supports the llama family only, got {type(cfg).__name__}; "
                         "use the hf-padded format")
    D = cfg.dim
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"],
          "lm_head.weight": params.get("lm_head", params["embed"])}  # tied: written twice
    pairs, vdims, ffn = [], [], []
    for i, p in enumerate(params["layers"]):
        n = f"model.layers.{i}."
        pairs.append(p["wq"].shape[-1])
        vdims.append(p["wv"].shape[-1])
        ffn.append(p["w_up"].shape[1])
        sd.update({n + "input_layernorm.weight": p["attn_norm"],
                   n + "self_attn.q_proj.weight": p["wq"].reshape(D, -1).T,
                   n + "self_attn.k_proj.weight": p["wk"].reshape(D, -1).T,
                   n + "self_attn.v_proj.weight": p["wv"].reshape(D, -1).T,
                   n + "self_attn.o_proj.weight": p["wo"].reshape(-1, D).T,
                   n + "self_attn.inv_freq": p["inv_freq"].to(torch.float32),
                   n + "post_attention_layernorm.weight": p["mlp_norm"],
                   n + "mlp.gate_proj.weight": p["w_gate"].T, n + "mlp.up_proj.weight": p["w_up"].T,
                   n + "mlp.down_proj.weight": p["w_down"].T})
        if cfg.attention_bias:
            sd.update({n + "self_attn.q_proj.bias": p["bq"].reshape(-1),
                       n + "self_attn.k_proj.bias": p["bk"].reshape(-1),
                       n + "self_attn.v_proj.bias": p["bv"].reshape(-1)})
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    conf = {"architectures": ["EcospaLlamaForCausalLM"], "model_type": "ecospa_llama",
            "auto_map": {"AutoConfig": "modeling_ecospa.EcospaLlamaConfig",
                         "AutoModelForCausalLM": "modeling_ecospa.EcospaLlamaForCausalLM"},
            "vocab_size": cfg.vocab_size, "hidden_size": D, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "layer_qk_pairs": pairs, "layer_v_dims": vdims,
            "layer_ffn_dims": ffn, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attention_bias,
            "tie_word_embeddings": False, "torch_dtype": str(params["embed"].dtype).removeprefix("torch.")}
    return sd, conf


def save_hf_compact(params: dict, cfg, directory: str, extra_files=None) -> str:
    """Write the compact remote-code export (see the module docstring); returns the directory."""
    from ecospa.func._hf_llama import write_hf
    sd, conf = to_hf_compact(params, cfg)
    with open(MODELING, "rb") as f:
        files = {"modeling_ecospa.py": f.read(), **(extra_files or {})}
    return write_hf(sd, conf, directory, files)


__all__ = ["to_hf_compact", "save_hf_compact"]
