"""Read LLaMA-architecture GGUF files (llama.cpp's format) into ecospa parameter trees.

``load_gguf(path)`` dequantizes every tensor (Q4_1, Q8_0, F16, ... via the ``gguf`` package),
renames it to the Hugging Face convention, UNDOES the Q/K row permutation llama.cpp's converter
applies for its interleaved rotary layout, and builds the tree with ``ecospa.io.hf_llama.from_hf``.
``ecospa.io.gguf_tokenizer.gguf_tokenizer(path)`` builds its tokenizer.

Needs the optional ``gguf`` package (``pip install gguf``).
"""
from __future__ import annotations

import os

import numpy as np
import torch

from ecospa.io._hf_common import cfg_float, cfg_int
from ecospa.io.gguf_header import check_header, gguf_module
from ecospa.io.hf_llama import from_hf

_CONFIG_KEYS = {  # GGUF metadata key (after "llama.") -> HF config.json key
    "block_count": "num_hidden_layers",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "rope.freq_base": "rope_theta",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "context_length": "max_position_embeddings",
    "vocab_size": "vocab_size",
}
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")

LAYER_NAMES = {  # GGUF name inside "blk.N." -> HF name inside "model.layers.N."
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_reader(path):
    """A ``gguf.GGUFReader`` over ``path`` after ``check_header`` bounded its counts."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    gguf = gguf_module()
    check_header(path)
    try:
        return gguf.GGUFReader(path)
    except ImportError:  # a broken install or an import cut short by Ctrl-C: not the file's fault
        raise
    except Exception as err:  # numpy/struct errors on truncated or foreign files
        raise ValueError(f"{path!r} is not a readable GGUF file (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err


def _value(reader, key: str):
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return field.contents()
    except ImportError:
        raise
    except Exception as err:  # undecodable strings, odd types
        raise ValueError(f"GGUF metadata {key!r} cannot be read ({type(err).__name__}: {err})") from err


def hf_config(reader) -> dict:
    """An HF-style config dict (config.json keys) from a GGUF reader's llama.* metadata."""
    arch = _value(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' files are supported "
                         "(LLaMA, SmolLM, TinyLlama, Mistral-style dense decoders)")
    cfg = {"model_type": "llama"}
    for key, name in _CONFIG_KEYS.items():
        v = _value(reader, f"llama.{key}")
        if v is not None:
            cfg[name] = v
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}: the file is not a complete llama model")
    for key, name in _CONFIG_KEYS.items():  # the types and ranges a model can have
        if name in ("rope_theta", "rms_norm_eps"):
            cfg_float(cfg, name, 1.0)
        elif name in cfg:
            cfg_int(cfg, name, hi=2**40 if name == "max_position_embeddings" else 2**31 - 1)
    cfg.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    cfg.setdefault("rope_theta", 10000.0)
    cfg.setdefault("rms_norm_eps", 1e-5)
    rope_dims = _value(reader, "llama.rope.dimension_count")
    cfg["head_dim"] = rope_dims if rope_dims is not None else \
        max(1, cfg["hidden_size"] // cfg["num_attention_heads"])
    cfg_int(cfg, "head_dim")
    if "vocab_size" not in cfg:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        cfg["vocab_size"] = len(tokens.data) if tokens is not None else None
    names = {t.name for t in reader.tensors}
    blocks = {n.split(".")[1] for n in names if n.startswith("blk.") and n.count(".") >= 2}
    if cfg["num_hidden_layers"] > len(blocks):
        raise ValueError(f"GGUF metadata llama.block_count (num_hidden_layers) = "
                         f"{cfg['num_hidden_layers']}, but the file holds tensors for only "
                         f"{len(blocks)} blocks (truncated or corrupt file)")
    cfg["tie_word_embeddings"] = "output.weight" not in names
    scaling = _rope_scaling(reader)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(reader) -> dict:
    """RoPE scaling from llama.cpp's metadata: ``rope.scaling.type`` linear (a factor) or a
    ``rope_freqs`` tensor (per-pair divisors, what Llama 3.x converts to); {} when plain."""
    kind = _value(reader, "llama.rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ValueError(f"GGUF rope scaling {kind!r} is not implemented (linear and "
                             "rope_freqs are); ecospa cannot reproduce this model's positions")
        return {"rope_type": "linear", "factor": cfg_float(
            {"f": _value(reader, "llama.rope.scaling.factor")}, "f", 1.0)}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            factors = np.asarray(t.data, dtype=np.float64).reshape(-1)
            if not np.all(np.isfinite(factors)) or not np.all(factors > 0):
                raise ValueError("tensor 'rope_freqs.weight' holds values <= 0 or not finite; "
                                 "the file is corrupt")
            if np.all(factors == 1.0):
                return {}
            return {"rope_type": "factors", "factors": [float(f) for f in factors]}
    return {}


def _array(tensor, gguf) -> np.ndarray:
    """Dequantized tensor in numpy order (GGUF lists dims reversed: [in, out] -> [out, in])."""
    kind = tensor.tensor_type
    if kind in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16,
                gguf.GGMLQuantizationType.F64):
        data = np.asarray(tensor.data)
    else:
        data = gguf.quants.dequantize(tensor.data, kind)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if data.size != int(np.prod(shape)):
        raise ValueError(f"tensor {tensor.name!r}: {data.size} values for shape {shape}; "
                         "the file is truncated or corrupt")
    return data.reshape(shape)


def unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Invert llama.cpp's Q/K row permutation (interleaved rotary pairs -> rotate-half).

    The converter does, per head: ``w.reshape(n_head, 2, hd//2, dim).swapaxes(1, 2).reshape(w.shape)``.
    """
    rows = w.shape[0]
    hd = rows // n_head
    return w.reshape(n_head, hd // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)  # [H*hd, ...]


def permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row permutation (what its converter writes); ``unpermute`` inverts it."""
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def hf_state_dict(reader, cfg: dict, dtype: torch.dtype = torch.float32) -> dict:
    """HF-named tensors (model.layers.N.self_attn.q_proj.weight, ...) from a GGUF reader."""
    gguf = gguf_module()
    out = {}
    for t in reader.tensors:
        stem, _, suffix = t.name.rpartition(".")
        parts = stem.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in LAYER_NAMES:
            name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
        elif stem in TOP_NAMES:
            name = f"{TOP_NAMES[stem]}.{suffix}"
        else:
            continue  # e.g. rope_freqs: recomputed from rope_theta
        try:
            w = torch.from_numpy(np.array(_array(t, gguf), dtype=np.float32)).to(dtype)
        except (ValueError, ImportError):  # ImportError: a broken install, not a corrupt file
            raise
        except Exception as err:
            raise ValueError(f"tensor {t.name!r} could not be read ({err}); "
                             "the file is truncated or corrupt") from err
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = cfg["num_attention_heads"] if parts[2] == "attn_q" else cfg["num_key_value_heads"]
            if w.ndim != 2 or w.shape[0] % heads or (w.shape[0] // heads) % 2:
                raise ValueError(f"tensor {t.name!r} has shape {tuple(w.shape)}, which does not "
                                 f"split into {heads} heads of rotary pairs; the metadata does "
                                 "not belong to these tensors")
            w = unpermute(w, heads)
        out[name] = w
    _check_complete(out, cfg)
    return out


def _check_complete(sd: dict, cfg: dict) -> None:
    need = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(cfg["num_hidden_layers"]):
        need += [f"model.layers.{i}.{n}.weight" for n in LAYER_NAMES.values()]
    missing = [n for n in need if n not in sd]
    if missing:
        raise ValueError(f"GGUF file lacks {len(missing)} required tensors, e.g. {missing[:3]}")


def tokenizer_info(reader) -> dict:
    """The tokenizer.ggml.* metadata as a plain dict (tokens, merges, token_type, ids, model),
    with ``tokenizer.chat_template`` as "chat_template" when the file has one."""
    info = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml."):
            info[key[len("tokenizer.ggml."):]] = field.contents()
        elif key == "tokenizer.chat_template":
            info["chat_template"] = field.contents()
    return info


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """Load a LLaMA-architecture GGUF file as an ecospa model.

    Args:
      path: the .gguf file.
      dtype: dtype of the returned parameters (quantized blocks are dequantized first).
    Returns:
      (cfg, params, tokenizer_info): ``llama.Config``, the parameter tree, and the
      ``tokenizer.ggml.*`` metadata (pass the path to ``gguf_tokenizer`` for a tokenizer).
    Example:
      cfg, params, tok = load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    """
    reader = open_reader(path)
    cfg = hf_config(reader)
    sd = hf_state_dict(reader, cfg, dtype)
    model_cfg, params = from_hf(sd, cfg)
    return model_cfg, params, tokenizer_info(reader)


__all__ = ["load_gguf", "open_reader", "hf_config", "hf_state_dict", "tokenizer_info", "permute", "unpermute",
           "LAYER_NAMES", "TOP_NAMES"]
