"""Conversion between ``ecospa.func.gpt2`` parameter trees and ``transformers``' GPT2LMHeadModel.

HF GPT-2 uses ``Conv1D`` layers whose weights are already [in, out] (``x @ W``), so only head
axes are split out: c_attn.weight [D, 3*H*E] holds q, k, v side by side, head h at columns
``h*E : (h+1)*E`` of each third.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Optional

import torch

from ecospa.func import gpt2
from ecospa.io._hf_common import (as_dict, cfg_bool, cfg_float, cfg_int, cfg_str, check_layer_count,
                                  check_state_dict, uniform_width)
from ecospa.io.hf_write import write_hf

_TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
# Causal-mask buffers that old checkpoints store; recomputed by every implementation.
_IGNORED = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$")


def config_from_hf(config: Any):
    """``gpt2.Config`` from an HF GPT-2 config (object or config.json dict)."""
    c = as_dict(config)
    kind = cfg_str(c, "model_type", "gpt2")
    if kind != "gpt2":
        raise ValueError(f"model_type {kind!r} is not GPT-2")
    act = c.get("activation_function", "gelu_new")
    if not isinstance(act, str) or act not in _TANH_GELU:
        raise ValueError(f"activation_function {act!r} is not supported (tanh GELU only)")
    if not cfg_bool(c, "scale_attn_weights", True) or cfg_bool(c, "scale_attn_by_inverse_layer_idx", False):
        raise ValueError("only the standard 1/sqrt(head_dim) attention scale is supported")
    if cfg_bool(c, "add_cross_attention", False):
        raise ValueError("GPT-2 with cross-attention is not a decoder-only LM; not supported")
    if not cfg_bool(c, "tie_word_embeddings", True):
        raise ValueError("untied GPT-2 embeddings are not supported (ecospa's GPT-2 is tied)")
    for key in ("vocab_size", "n_embd", "n_layer", "n_head"):
        if c.get(key) is None:
            raise ValueError(f"config has no {key!r}; is this a GPT-2 config.json?")
    dim = cfg_int(c, "n_embd")
    return gpt2.Config(vocab_size=cfg_int(c, "vocab_size"), dim=dim, n_layers=cfg_int(c, "n_layer"),
                       n_heads=cfg_int(c, "n_head"), ffn_dim=cfg_int(c, "n_inner", 4 * dim),
                       max_seq_len=cfg_int(c, "n_positions", 1024),
                       norm_eps=cfg_float(c, "layer_norm_epsilon", 1e-5),
                       name="gpt2")  # the family (checkpoints dispatch on it)


def expected_shapes(cfg) -> dict:
    """Every HF tensor name (with the "transformer." prefix) for ``cfg`` -> shape."""
    D, F_ = cfg.dim, cfg.ffn_dim
    out = {"transformer.wte.weight": (cfg.vocab_size, D),
           "transformer.wpe.weight": (cfg.max_seq_len, D),
           "transformer.ln_f.weight": (D,), "transformer.ln_f.bias": (D,)}
    layer = {"ln_1.weight": (D,), "ln_1.bias": (D,), "attn.c_attn.weight": (D, 3 * D),
             "attn.c_attn.bias": (3 * D,), "attn.c_proj.weight": (D, D), "attn.c_proj.bias": (D,),
             "ln_2.weight": (D,), "ln_2.bias": (D,), "mlp.c_fc.weight": (D, F_),
             "mlp.c_fc.bias": (F_,), "mlp.c_proj.weight": (F_, D), "mlp.c_proj.bias": (D,)}
    for i in range(cfg.n_layers):
        out.update({f"transformer.h.{i}.{k}": s for k, s in layer.items()})
    return out


def _normalize_names(state_dict: Mapping[str, torch.Tensor]) -> dict:
    out = {}
    for k, v in state_dict.items():
        if _IGNORED.search(k) or k == "lm_head.weight":  # lm_head is wte (tied)
            continue
        out[k if k.startswith("transformer.") else "transformer." + k] = v
    return out


def from_hf(state_dict: Mapping[str, torch.Tensor], config: Any,
            dtype: Optional[torch.dtype] = None):
    """(gpt2.Config, params) from an HF GPT-2 state dict and config.

    Keys may carry the "transformer." prefix or not; lm_head.weight (tied to wte) is ignored.
    Returns a new tree; the inputs are neither modified nor aliased.
    Example: ``cfg, params = hf_gpt2.from_hf(model.state_dict(), model.config)``
    """
    cfg = config_from_hf(config)
    sd = _normalize_names(state_dict)
    check_layer_count(cfg.n_layers, len(sd), 1, "n_layer")
    check_state_dict(sd, expected_shapes(cfg))
    D, H, E = cfg.dim, cfg.n_heads, cfg.head_dim

    def t(name):
        x = sd["transformer." + name].detach()
        return (x if dtype is None else x.to(dtype)).clone(memory_format=torch.contiguous_format)

    def layer(i):
        n = f"h.{i}."
        wq, wk, wv = t(n + "attn.c_attn.weight").reshape(D, 3, H, E).unbind(1)  # [D, H, E] each
        bq, bk, bv = t(n + "attn.c_attn.bias").reshape(3, H, E).unbind(0)  # [H, E] each
        p = {"ln1_w": t(n + "ln_1.weight"), "ln1_b": t(n + "ln_1.bias"),
             "wq": wq, "bq": bq, "wk": wk, "bk": bk, "wv": wv, "bv": bv,
             "wo": t(n + "attn.c_proj.weight").reshape(H, E, D), "bo": t(n + "attn.c_proj.bias"),
             "ln2_w": t(n + "ln_2.weight"), "ln2_b": t(n + "ln_2.bias"),
             "w_in": t(n + "mlp.c_fc.weight"), "b_in": t(n + "mlp.c_fc.bias"),
             "w_out": t(n + "mlp.c_proj.weight"), "b_out": t(n + "mlp.c_proj.bias")}
        return {k: v.contiguous() for k, v in p.items()}

    params = {"wte": t("wte.weight"), "wpe": t("wpe.weight"),
              "layers": tuple(layer(i) for i in range(cfg.n_layers)),
              "ln_f_w": t("ln_f.weight"), "ln_f_b": t("ln_f.bias")}
    return cfg, params


def _check_representable(params: dict, cfg) -> int:
    """The common MLP width; ValueError naming the layer if HF cannot hold the tree."""
    D, H, E = cfg.dim, cfg.n_heads, cfg.head_dim
    widths = []
    for i, p in enumerate(params["layers"]):
        dk, dv = p["wq"].shape[-1], p["wv"].shape[-1]
        if p["wq"].shape[:2] != (D, H) or dk != E or dv != E:
            raise ValueError(
                f"layer {i}: attention was pruned (qk dims {dk}, value dims {dv}, head_dim {E}); "
                f"transformers' GPT-2 needs n_embd = n_head * head_dim for q, k and v and scales "
                f"scores by 1/sqrt(its head dim) (ecospa keeps the original scale), so only "
                f"MLP-pruned trees can be exported")
        widths.append(p["w_in"].shape[1])
    return uniform_width(widths, "n_inner")


def to_hf(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) in transformers' GPT2LMHeadModel format.

    Raises ValueError when attention is pruned or MLP widths differ per layer.
    Returns new tensors; ``params`` is unchanged. lm_head.weight is omitted (tied to wte).
    """
    ffn = _check_representable(params, cfg)
    D = cfg.dim
    sd = {"transformer.wte.weight": params["wte"], "transformer.wpe.weight": params["wpe"],
          "transformer.ln_f.weight": params["ln_f_w"], "transformer.ln_f.bias": params["ln_f_b"]}
    for i, p in enumerate(params["layers"]):
        n = f"transformer.h.{i}."
        sd.update({n + "ln_1.weight": p["ln1_w"], n + "ln_1.bias": p["ln1_b"],
                   n + "attn.c_attn.weight": torch.stack((p["wq"], p["wk"], p["wv"]), 1)
                   .reshape(D, 3 * D),  # [D, 3, H, E] -> [D, 3*H*E]
                   n + "attn.c_attn.bias": torch.stack((p["bq"], p["bk"], p["bv"])).reshape(-1),
                   n + "attn.c_proj.weight": p["wo"].reshape(D, D), n + "attn.c_proj.bias": p["bo"],
                   n + "ln_2.weight": p["ln2_w"], n + "ln_2.bias": p["ln2_b"],
                   n + "mlp.c_fc.weight": p["w_in"], n + "mlp.c_fc.bias": p["b_in"],
                   n + "mlp.c_proj.weight": p["w_out"], n + "mlp.c_proj.bias": p["b_out"]})
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    conf = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
            "vocab_size": cfg.vocab_size, "n_embd": D, "n_layer": cfg.n_layers,
            "n_head": cfg.n_heads, "n_inner": ffn, "n_positions": cfg.max_seq_len,
            "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
            "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
            "tie_word_embeddings": True, "dtype": str(params["wte"].dtype).removeprefix("torch.")}
    return sd, conf


def save_hf(params: dict, cfg, directory: str, extra_files=None, config_extra=None) -> str:
    """Save as a transformers GPT-2 checkpoint (config.json + model.safetensors) atomically;
    ``extra_files`` (name -> bytes) are written beside them and ``config_extra`` (the special
    token ids) goes into config.json (see ``write_hf``)."""
    sd, conf = to_hf(params, cfg)
    return write_hf(sd, conf, directory, extra_files, config_extra)


__all__ = ["config_from_hf", "expected_shapes", "from_hf", "to_hf", "save_hf"]
