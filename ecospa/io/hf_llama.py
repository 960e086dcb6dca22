"""Conversion between ``ecospa.func.llama`` parameter trees and ``transformers`` checkpoints.

Covers LlamaForCausalLM, MistralForCausalLM (full attention), Qwen2ForCausalLM (q/k/v biases)
and Qwen3ForCausalLM (per-head q/k RMSNorm: one [head_dim] weight for all heads, kept whole
when rotary pairs are pruned; each head reads it at its kept pairs' slots).
HF stores ``nn.Linear`` weights as [out, in]; ecospa stores ``x @ W`` with explicit head axes:

    q_proj.weight [Hq*hd, D]  --T-->  [D, Hq*hd]  --reshape-->  wq [D, Hkv, G, 2, P]

HF query head ``h*G + g`` reads KV head ``h`` (``repeat_kv``), and HF's rotate-half layout puts
dim ``i`` of a head at ``(r, p) = (i // P, i % P)``, so the reshape is the whole conversion.
config.json is read and written by ``ecospa.io.hf_llama_config``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ecospa.func import llama
from ecospa.io._hf_common import check_layer_count, check_state_dict, uniform_width
from ecospa.io.hf_llama_config import LLAMA_TYPES, config_from_hf, config_to_hf
from ecospa.io.hf_write import write_hf

_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints carry; recomputed here


def _layer_shapes(cfg) -> dict:
    """HF tensor name (within a layer) -> expected shape."""
    D, Hq, Hkv, hd, F_ = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    shapes = {"input_layernorm.weight": (D,), "post_attention_layernorm.weight": (D,),
              "self_attn.q_proj.weight": (Hq * hd, D), "self_attn.k_proj.weight": (Hkv * hd, D),
              "self_attn.v_proj.weight": (Hkv * hd, D), "self_attn.o_proj.weight": (D, Hq * hd),
              "mlp.gate_proj.weight": (F_, D), "mlp.up_proj.weight": (F_, D),
              "mlp.down_proj.weight": (D, F_)}
    if cfg.attention_bias:
        shapes.update({"self_attn.q_proj.bias": (Hq * hd,), "self_attn.k_proj.bias": (Hkv * hd,),
                       "self_attn.v_proj.bias": (Hkv * hd,)})
    if cfg.qk_norm:
        shapes.update({"self_attn.q_norm.weight": (hd,), "self_attn.k_norm.weight": (hd,)})
    return shapes


def expected_shapes(cfg) -> dict:
    """Every HF tensor name (with the "model." prefix) of a checkpoint for ``cfg`` -> shape."""
    out = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim), "model.norm.weight": (cfg.dim,)}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    for i in range(cfg.n_layers):
        out.update({f"model.layers.{i}.{k}": s for k, s in _layer_shapes(cfg).items()})
    return out


def _normalize_names(state_dict: Mapping[str, torch.Tensor], consume: bool = False) -> dict:
    """Give every key the "model." prefix (except lm_head), drop recomputed buffers;
    ``consume``: empty ``state_dict`` (a dict) as its tensors move over."""
    out = {}
    items = [(k, state_dict.pop(k)) for k in list(state_dict)] if consume else state_dict.items()
    for k, v in items:
        if k.endswith(_IGNORED):
            continue
        if not (k.startswith("model.") or k.startswith("lm_head.")):
            k = "model." + k
        out[k] = v
    return out


def from_hf(state_dict: Mapping[str, torch.Tensor], config: Any,
            dtype: Optional[torch.dtype] = None, consume: bool = False):
    """(llama.Config, params) from an HF LLaMA/Mistral/Qwen2 state dict and config.

    Args:
      state_dict: tensors named like "model.layers.0.self_attn.q_proj.weight" (the "model."
        prefix is optional; lm_head.weight may be absent when embeddings are tied).
      config: a transformers config or the dict from config.json.
      dtype: cast weights to this dtype (default: keep). inv_freq is always float32.
      consume: take the tensors OUT of ``state_dict`` (a dict; it is empty afterwards) and drop
        each layer's inputs once converted, so the peak memory is the model plus one layer
        instead of two models (the loaders pass their own dicts this way). Same result.
    Returns a new tree; the input tensors are not modified (nor aliased).
    Example: ``cfg, params = hf_llama.from_hf(model.state_dict(), model.config)``
    """
    sd = _normalize_names(state_dict, consume)
    cfg = config_from_hf(config, tied="lm_head.weight" not in sd)
    check_layer_count(cfg.n_layers, len(sd), 1, "num_hidden_layers")
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)  # a tied model's state_dict() lists the shared tensor twice
    check_state_dict(sd, expected_shapes(cfg))
    D, Hkv, hd = cfg.dim, cfg.n_kv_heads, cfg.head_dim
    G, P = cfg.n_heads // Hkv, hd // 2

    def t(name):
        x = (sd.pop(name) if consume else sd[name]).detach()
        return x if dtype is None else x.to(dtype)

    def layer(i):
        n = f"model.layers.{i}."
        p = {"attn_norm": t(n + "input_layernorm.weight"),
             "wq": t(n + "self_attn.q_proj.weight").T.reshape(D, Hkv, G, 2, P),
             "wk": t(n + "self_attn.k_proj.weight").T.reshape(D, Hkv, 2, P),
             "wv": t(n + "self_attn.v_proj.weight").T.reshape(D, Hkv, hd),
             "wo": t(n + "self_attn.o_proj.weight").T.reshape(Hkv, G, hd, D),
             "inv_freq": llama.inv_freq(cfg).expand(Hkv, P).clone(),
             "mlp_norm": t(n + "post_attention_layernorm.weight"),
             "w_gate": t(n + "mlp.gate_proj.weight").T.contiguous(),
             "w_up": t(n + "mlp.up_proj.weight").T.contiguous(),
             "w_down": t(n + "mlp.down_proj.weight").T.contiguous()}
        if cfg.attention_bias:
            p.update(bq=t(n + "self_attn.q_proj.bias").reshape(Hkv, G, 2, P),
                     bk=t(n + "self_attn.k_proj.bias").reshape(Hkv, 2, P),
                     bv=t(n + "self_attn.v_proj.bias").reshape(Hkv, hd))
        if cfg.qk_norm:
            p.update(q_norm=t(n + "self_attn.q_norm.weight"), k_norm=t(n + "self_attn.k_norm.weight"))
        return {k: v.clone(memory_format=torch.contiguous_format) for k, v in p.items()}

    params = {"embed": t("model.embed_tokens.weight").clone(),
              "layers": tuple(layer(i) for i in range(cfg.n_layers)),
              "norm": t("model.norm.weight").clone()}
    if not cfg.tie_embeddings:
        params["lm_head"] = t("lm_head.weight").clone()
    return cfg, params


def _check_representable(params: dict, cfg) -> int:
    """The common MLP width; ValueError naming the layer if HF cannot hold the tree."""
    full = llama.inv_freq(cfg)
    D, Hkv, G, hd = cfg.dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    widths = []
    for i, p in enumerate(params["layers"]):
        qk, dv = 2 * p["wq"].shape[-1], p["wv"].shape[-1]
        if p["wq"].shape[:3] != (D, Hkv, G) or qk != hd or dv != hd:
            raise ValueError(
                f"layer {i}: attention was pruned (qk dims {qk}, value dims {dv}, head_dim "
                f"{hd}); transformers' LLaMA needs qk = value = head_dim in every layer, scales "
                f"scores by 1/sqrt(head_dim) (ecospa keeps the original scale) and derives the "
                f"rotary frequencies from rope_theta, so only MLP-pruned trees can be exported")
        freq = p["inv_freq"].to(torch.float32)
        if not torch.allclose(freq, full.expand_as(freq), rtol=1e-6, atol=0.0):
            raise ValueError(f"layer {i}: inv_freq differs from rope_theta={cfg.rope_theta}'s "
                             "frequencies (reordered rotary pairs?); transformers cannot hold it")
        widths.append(p["w_gate"].shape[1])
    return uniform_width(widths, "intermediate_size")


def to_hf(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) in transformers' LLaMA (or Qwen2, with biases) format.

    Raises ValueError when the tree has pruned attention or per-layer MLP widths, which an HF
    config cannot describe. Returns new tensors; ``params`` is unchanged.
    Example: ``sd, conf = hf_llama.to_hf(params, cfg)``
    """
    ffn = _check_representable(params, cfg)
    D = cfg.dim
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = params["lm_head"]
    for i, p in enumerate(params["layers"]):
        sd.update(layer_to_hf(p, f"model.layers.{i}.", D))
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    return sd, config_to_hf(cfg, ffn, params["embed"].dtype)


def layer_to_hf(p: dict, prefix: str, dim: int) -> dict:
    """One layer's tensors under HF names (``prefix`` + "self_attn.q_proj.weight", ...): the
    ``x @ W`` layout transposed back to [out, in]; q/k/v biases when the layer has them. Views
    of ``p``'s tensors; any widths (the compact export writes pruned layers with it too)."""
    out = {prefix + "input_layernorm.weight": p["attn_norm"],
           prefix + "self_attn.q_proj.weight": p["wq"].reshape(dim, -1).T,  # [Hq*hd, D]
           prefix + "self_attn.k_proj.weight": p["wk"].reshape(dim, -1).T,  # [Hkv*hd, D]
           prefix + "self_attn.v_proj.weight": p["wv"].reshape(dim, -1).T,
           prefix + "self_attn.o_proj.weight": p["wo"].reshape(-1, dim).T,  # [D, Hq*hd]
           prefix + "post_attention_layernorm.weight": p["mlp_norm"],
           prefix + "mlp.gate_proj.weight": p["w_gate"].T, prefix + "mlp.up_proj.weight": p["w_up"].T,
           prefix + "mlp.down_proj.weight": p["w_down"].T}
    if "q_norm" in p:  # one [head_dim] weight for all heads, as in transformers
        out.update({prefix + "self_attn.q_norm.weight": p["q_norm"],
                    prefix + "self_attn.k_norm.weight": p["k_norm"]})
    if "bq" in p:
        out.update({prefix + "self_attn.q_proj.bias": p["bq"].reshape(-1),
                    prefix + "self_attn.k_proj.bias": p["bk"].reshape(-1),
                    prefix + "self_attn.v_proj.bias": p["bv"].reshape(-1)})
    return out


def save_hf(params: dict, cfg, directory: str, extra_files: Optional[Mapping[str, bytes]] = None,
            config_extra: Optional[Mapping] = None) -> str:
    """Save as a transformers checkpoint (config.json + model.safetensors) atomically;
    ``extra_files`` and ``config_extra`` as in ``write_hf``.

    ``transformers.AutoModelForCausalLM.from_pretrained(directory)`` loads the result.
    Raises ValueError if the tree is not representable (see ``to_hf``). Returns the directory.
    """
    sd, conf = to_hf(params, cfg)
    return write_hf(sd, conf, directory, extra_files, config_extra)


__all__ = ["LLAMA_TYPES", "config_from_hf", "expected_shapes", "from_hf", "to_hf", "layer_to_hf", "save_hf"]
