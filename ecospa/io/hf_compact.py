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

import dataclasses
import os

import torch

from ecospa.func import llama
from ecospa.io._hf_common import cfg_bool, cfg_float, cfg_int, check_layers_found
from ecospa.io.hf_llama import layer_to_hf
from ecospa.io.hf_write import write_hf

MODELING = os.path.join(os.path.dirname(__file__), "_remote_modeling.py")


def to_hf_compact(params: dict, cfg) -> tuple:
    """(state_dict, config_dict) of the compact remote-code layout; ``params`` unchanged."""
    if not isinstance(cfg, llama.Config):
        raise ValueError(f"hf-compact supports the llama family only, got {type(cfg).__name__}; "
                         "use the hf-padded format")
    D = cfg.dim
    sd = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["norm"]}
    if not cfg.tie_embeddings:
        sd["lm_head.weight"] = params["lm_head"]  # tied: the modeling file ties lm_head to the embedding
    pairs, vdims, ffn = [], [], []
    for i, p in enumerate(params["layers"]):
        n = f"model.layers.{i}."
        pairs.append(p["wq"].shape[-1])
        vdims.append(p["wv"].shape[-1])
        ffn.append(p["w_up"].shape[1])
        sd.update(layer_to_hf(p, n, D))
        sd[n + "self_attn.inv_freq"] = p["inv_freq"].to(torch.float32)  # kept frequencies: a buffer
        if cfg.qk_norm:  # the shared norm weights (layer_to_hf) and each kept pair's original slot
            sd[n + "self_attn.qk_slots"] = llama.kept_slots(p, cfg)
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    conf = {"architectures": ["EcospaLlamaForCausalLM"], "model_type": "ecospa_llama",
            "auto_map": {"AutoConfig": "modeling_ecospa.EcospaLlamaConfig",
                         "AutoModelForCausalLM": "modeling_ecospa.EcospaLlamaForCausalLM"},
            "vocab_size": cfg.vocab_size, "hidden_size": D, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "head_dim": cfg.head_dim, "layer_qk_pairs": pairs, "layer_v_dims": vdims,
            "layer_ffn_dims": ffn, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_seq_len, "attention_bias": cfg.attention_bias,
            "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": str(params["embed"].dtype).removeprefix("torch.")}
    if cfg.qk_norm:
        conf["qk_norm"] = True
    if cfg.rope_scaling:  # the buffers hold the scaled frequencies; this is for coming back
        conf["ecospa_rope_scaling"] = dict(cfg.rope_scaling)
    return sd, conf


def save_hf_compact(params: dict, cfg, directory: str, extra_files=None, config_extra=None) -> str:
    """Write the compact remote-code export (see the module docstring); returns the directory.
    ``extra_files`` and ``config_extra`` as in ``write_hf``."""
    sd, conf = to_hf_compact(params, cfg)
    with open(MODELING, "rb") as f:
        files = {"modeling_ecospa.py": f.read(), **(extra_files or {})}
    return write_hf(sd, conf, directory, files, config_extra)


def from_hf_compact(sd: dict, config: dict, dtype: torch.dtype = torch.float32) -> tuple:
    """(llama.Config, params) from a compact export's state dict and config.json (the inverse of
    ``to_hf_compact``); ValueError naming the tensor when a shape disagrees with the config, when
    the config declares more or fewer layers than the tensors hold, or a tensor is left over."""
    n = cfg_int(config, "num_hidden_layers")
    check_layers_found(sd, n, "num_hidden_layers", fix=" (and layer_qk_pairs, layer_v_dims, "
                       "layer_ffn_dims: one entry per layer)")
    lists = {}
    for key in ("layer_qk_pairs", "layer_v_dims", "layer_ffn_dims"):
        v = config.get(key)
        if not isinstance(v, list) or len(v) != n or not all(isinstance(x, int) and not isinstance(x, bool)
                                                               and 1 <= x <= 2**31 for x in v):
            raise ValueError(f"config {key!r} must list {n} whole numbers >= 1 (one per layer), got {v!r}")
        lists[key] = v
    heads = cfg_int(config, "num_attention_heads")
    cfg = llama.Config(vocab_size=cfg_int(config, "vocab_size"), dim=cfg_int(config, "hidden_size"),
                       n_layers=n, n_heads=heads, n_kv_heads=cfg_int(config, "num_key_value_heads", heads),
                       head_dim=cfg_int(config, "head_dim"), ffn_dim=max(lists["layer_ffn_dims"]),
                       rope_theta=cfg_float(config, "rope_theta", 10000.0),
                       rope_scaling=config.get("ecospa_rope_scaling"),
                       qk_norm=bool(cfg_bool(config, "qk_norm", False)),
                       norm_eps=cfg_float(config, "rms_norm_eps", 1e-5),
                       attention_bias=bool(cfg_bool(config, "attention_bias", False)),
                       max_seq_len=cfg_int(config, "max_position_embeddings", 2048),
                       tie_embeddings=bool(cfg_bool(config, "tie_word_embeddings", False)))
    D, Hkv, G = cfg.dim, cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads

    used = set()

    def t(name, shape):
        if name not in sd:
            raise ValueError(f"the compact export lacks the tensor {name!r}")
        used.add(name)
        x = sd[name]
        if tuple(x.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r} has shape {tuple(x.shape)}, the config says {tuple(shape)}")
        return x

    def w(x):
        return x.to(dtype)

    V = cfg.vocab_size
    layers = []
    for i in range(n):
        P, E, F_ = lists["layer_qk_pairs"][i], lists["layer_v_dims"][i], lists["layer_ffn_dims"][i]
        pre = f"model.layers.{i}."
        p = {"attn_norm": w(t(pre + "input_layernorm.weight", (D,))),
             "wq": w(t(pre + "self_attn.q_proj.weight", (Hkv * G * 2 * P, D)).T.reshape(D, Hkv, G, 2, P)),
             "wk": w(t(pre + "self_attn.k_proj.weight", (Hkv * 2 * P, D)).T.reshape(D, Hkv, 2, P)),
             "wv": w(t(pre + "self_attn.v_proj.weight", (Hkv * E, D)).T.reshape(D, Hkv, E)),
             "wo": w(t(pre + "self_attn.o_proj.weight", (D, Hkv * G * E)).T.reshape(Hkv, G, E, D)),
             "inv_freq": t(pre + "self_attn.inv_freq", (Hkv, P)).to(torch.float32),
             "mlp_norm": w(t(pre + "post_attention_layernorm.weight", (D,))),
             "w_gate": w(t(pre + "mlp.gate_proj.weight", (F_, D)).T),
             "w_up": w(t(pre + "mlp.up_proj.weight", (F_, D)).T),
             "w_down": w(t(pre + "mlp.down_proj.weight", (D, F_)).T)}
        if cfg.attention_bias:
            p.update(bq=w(t(pre + "self_attn.q_proj.bias", (Hkv * G * 2 * P,)).reshape(Hkv, G, 2, P)),
                     bk=w(t(pre + "self_attn.k_proj.bias", (Hkv * 2 * P,)).reshape(Hkv, 2, P)),
                     bv=w(t(pre + "self_attn.v_proj.bias", (Hkv * E,)).reshape(Hkv, E)))
        if cfg.qk_norm:
            hd = cfg.head_dim
            p.update(q_norm=w(t(pre + "self_attn.q_norm.weight", (hd,))),
                     k_norm=w(t(pre + "self_attn.k_norm.weight", (hd,))))
            slots = t(pre + "self_attn.qk_slots", (Hkv, P))
            if not torch.equal(slots.long(), llama.kept_slots(p, cfg)):
                raise ValueError(f"{pre}self_attn.qk_slots disagrees with the layer's inv_freq; the "
                                 "export is corrupt")
        layers.append({k: v.contiguous() for k, v in p.items()})
    embed = t("model.embed_tokens.weight", (V, D))
    head = None if cfg.tie_embeddings else t("lm_head.weight", (V, D))
    params = {"embed": w(embed), "layers": tuple(layers), "norm": w(t("model.norm.weight", (D,)))}
    if cfg.tie_embeddings and "lm_head.weight" in sd and torch.equal(sd["lm_head.weight"], embed):
        used.add("lm_head.weight")  # a tied head saved as well is the embedding itself
    extra = sorted(set(sd) - used)
    if extra:
        raise ValueError(f"the weights hold {len(extra)} tensors the config does not describe, e.g. "
                         f"{extra[:3]}; does config.json belong to these weights?")
    if head is not None and torch.equal(head, embed):  # a head identical to the embedding: tie them
        cfg = dataclasses.replace(cfg, tie_embeddings=True)
    elif head is not None:
        params["lm_head"] = w(head)
    return cfg, params


__all__ = ["to_hf_compact", "save_hf_compact", "from_hf_compact"]
