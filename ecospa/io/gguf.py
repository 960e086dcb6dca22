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
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture is {arch!r}; only 'llama' files are supported "
                         "(LLaMA, SmolLM, TinyLlama, Mistral-style dense decoders), and 'deci' "
                         "files with per-layer MLP widths (ecospa's gguf-compact export)")
    cfg = {"model_type": "llama"}
    for key, name in _CONFIG_KEYS.items():
        v = _value(reader, f"{arch}.{key}")
        if v is not None:
            cfg[name] = v
    missing = [k for k in _REQUIRED if k not in cfg]
    if missing:
        raise ValueError(f"GGUF metadata lacks {missing}: the file is not a complete {arch} model")
    _per_layer(reader, arch, cfg)
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
    scaling = _rope_scaling(reader, arch)
    if scaling:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(reader, arch: str = "llama") -> dict:
    """RoPE scaling from llama.cpp's metadata: ``rope.scaling.type`` linear (a factor) or a
    ``rope_freqs`` tensor (per-pair divisors, what Llama 3.x converts to); {} when plain."""
    kind = _value(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        if kind != "linear":
            raise ValueError(f"GGUF rope scaling {kind!r} is not implemented (linear and "
                             "rope_freqs are); ecospa cannot reproduce this model's positions")
        return {"rope_type": "linear", "factor": cfg_float(
            {"f": _value(reader, f"{arch}.rope.scaling.factor")}, "f", 1.0)}
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


ARCHITECTURES = ("llama", "deci")
DENSE_FFN_KEY = "ecospa.dense_feed_forward_length"  # written by ecospa's gguf-compact export
WIDTHS = "ecospa_ffn_widths"  # hf_config's key for per-layer MLP widths (load_gguf removes it)


def _per_layer(reader, arch: str, cfg: dict) -> None:
    """Per-layer arrays in ``cfg``: the MLP widths (``deci.feed_forward_length`` as an array)
    go to ``cfg[WIDTHS]`` with the dense width as intermediate_size; head counts must be one
    number for the model (ecospa's attention has the same heads in every layer)."""
    n = cfg["num_hidden_layers"]
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return  # the type checks below name it
    for name, key in (("num_attention_heads", "head_count"), ("num_key_value_heads", "head_count_kv")):
        v = cfg.get(name)
        if isinstance(v, list):
            if len(v) != n or len(set(v)) != 1:
                raise ValueError(f"GGUF metadata {arch}.attention.{key} is a per-layer array "
                                 f"{v[:8]}...; ecospa reads models with the same heads in every "
                                 "layer only")
            cfg[name] = v[0]
    widths = cfg.get("intermediate_size")
    if not isinstance(widths, list):
        return
    if arch != "deci":
        raise ValueError(f"GGUF metadata {arch}.feed_forward_length is a per-layer array; llama.cpp's "
                         f"{arch!r} architecture reads one width (per-layer widths need 'deci')")
    if len(widths) != n or not all(isinstance(w, int) and not isinstance(w, bool) and 1 <= w < 2**31
                                   for w in widths):
        raise ValueError(f"GGUF metadata deci.feed_forward_length must hold {n} widths >= 1 "
                         f"(one per layer), got {widths[:8]}...")
    dense = _value(reader, DENSE_FFN_KEY)
    dense = dense if isinstance(dense, int) and not isinstance(dense, bool) else 0
    cfg["intermediate_size"] = max([dense] + widths)
    cfg[WIDTHS] = list(widths)


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
        widths = cfg.get(WIDTHS)
        if widths and parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
            w = _pad_mlp(w, t.name, parts[2] == "ffn_down", widths, int(parts[1]), cfg)
        out[name] = w
    _check_complete(out, cfg)
    return out


def _pad_mlp(w: torch.Tensor, name: str, down: bool, widths: list, i: int, cfg: dict) -> torch.Tensor:
    """A compact layer's MLP tensor zero-padded to the dense width (exact: silu(0) * 0 = 0 and
    zero rows of down add nothing); ``load_gguf`` slices it back to the layer's width."""
    F_, axis = cfg["intermediate_size"], 1 if down else 0
    if i >= len(widths) or w.ndim != 2 or w.shape[axis] != widths[i]:
        raise ValueError(f"tensor {name!r} has shape {tuple(w.shape)}, but deci.feed_forward_length "
                         f"gives layer {i} a width of {widths[i] if i < len(widths) else '?'}; the "
                         "metadata does not belong to these tensors")
    shape = list(w.shape)
    shape[axis] = F_
    out = w.new_zeros(shape)
    out.narrow(axis, 0, w.shape[axis]).copy_(w)
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


# general.* keys that describe the file, not the model: an export writes its own
_FILE_KEYS = ("general.architecture", "general.file_type", "general.quantization_version",
              "general.alignment")


def general_info(reader) -> dict:
    """The source's ``general.*`` metadata (name, basename, size_label, license, organization,
    base models, ...) as {key: {"value", "type", "sub_type"}} with the GGUF value types, so an
    export writes each key back as it was; the keys about the file itself (architecture,
    file_type, quantization_version, alignment) are left out."""
    out = {}
    for key, field in reader.fields.items():
        if not key.startswith("general.") or key in _FILE_KEYS or not field.types:
            continue
        types = [int(t) for t in field.types]
        out[key] = {"value": _value(reader, key), "type": types[0],
                    "sub_type": types[-1] if len(types) > 1 else None}
    return out


def load_gguf(path, dtype: torch.dtype = torch.float32):
    """Load a LLaMA-architecture GGUF file as an ecospa model (or a ``deci`` one with per-layer
    MLP widths, as ecospa's gguf-compact export writes: its layers come back at those widths).

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
    widths = cfg.pop(WIDTHS, None)
    model_cfg, params = from_hf(sd, cfg, consume=True)  # frees each layer's tensors as it converts
    if widths:  # a gguf-compact file: each layer's MLP back at its own width
        params = {**params, "layers": tuple(
            {**p, "w_gate": p["w_gate"][:, :w].contiguous(), "w_up": p["w_up"][:, :w].contiguous(),
             "w_down": p["w_down"][:w].contiguous()} for p, w in zip(params["layers"], widths))}
    return model_cfg, params, tokenizer_info(reader)


__all__ = ["load_gguf", "open_reader", "hf_config", "general_info", "hf_state_dict", "tokenizer_info", "permute", "unpermute",
           "LAYER_NAMES", "TOP_NAMES"]
