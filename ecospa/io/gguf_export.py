"""Write LLaMA-family ecospa trees as GGUF files for llama.cpp.

Two layouts (``save_gguf(..., layout=...)``):

- ``"padded"`` (``ecospa export --format gguf``): llama.cpp's ``llama`` architecture, which has
  one ``feed_forward_length`` and one head size for keys and values equal to the rotary size,
  and one ``rope_freqs`` table for all layers: a pruned tree is written in the padded layout
  (``ecospa.func.padding.pad``), which computes the same logits. Every file is the dense size.
- ``"compact"`` (``--format gguf-compact``): llama.cpp's ``deci`` architecture, the llama graph
  that reads ``deci.feed_forward_length`` as a per-layer array (``hparams.n_ff(il)`` in its
  tensor creation and graph; the ``llama`` architecture creates every layer at ``n_ff(0)``).
  Each layer's MLP holds only its kept neurons, so the file and llama.cpp's MLP compute shrink
  with the pruning. Attention stays padded (one head size, kept rotary pairs at their original
  slots, zeros elsewhere), because llama.cpp's graphs need key = value = rotary size for the
  whole model. The dense width is kept as ``ecospa.dense_feed_forward_length`` so
  ``ecospa.io.gguf.load_gguf`` returns the compact tree with its original config.

Weights are stored as F32 (or F16 with ``dtype="f16"``); the Q/K rows get llama.cpp's rotary
permutation (``ecospa.io.gguf.permute``), which ``load_gguf`` undoes on the way back in. The
source's tokenizer metadata (pre-tokenizer, chat template, bos/eos/add-prefix flags) and its
``general.*`` metadata are carried over; a pruned model's name, size label and description say
so, and the source is recorded as its base model.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Optional

import numpy as np

from ecospa.func import llama
from ecospa.func.padding import pad
from ecospa.io.files import exclusive, publish_mode, write_errors
from ecospa.io.gguf import LAYER_NAMES, TOP_NAMES, permute
from ecospa.io.hf_llama import layer_to_hf

_NAMES = {hf: g for g, hf in LAYER_NAMES.items()}  # HF name inside "model.layers.N." -> "blk.N."
_TOP = {hf: g for g, hf in TOP_NAMES.items()}
LAYOUTS = {"padded": "llama", "compact": "deci"}  # layout -> llama.cpp architecture
DENSE_FFN_KEY = "ecospa.dense_feed_forward_length"  # the unpruned MLP width (compact layout)
_TOKENIZER_BOOLS = ("add_bos_token", "add_eos_token", "add_space_prefix", "add_sep_token",
                    "remove_extra_whitespaces")


def _gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_NAMES[rest]}.{suffix}"
    return f"{_TOP[stem]}.{suffix}"


def _tokenizer_metadata(writer, info: dict) -> None:
    """Copy ``tokenizer.ggml.*`` metadata (as ``ecospa.io.gguf.tokenizer_info`` returns it) and
    ``tokenizer.chat_template``: the vocabulary, the pre-tokenizer, every special token id
    (bos, eos, unk, pad, eot, fim, ...) and the flags llama.cpp tokenizes with (add bos/eos,
    add space prefix)."""
    if info.get("model"):
        writer.add_tokenizer_model(info["model"])
    if info.get("pre"):
        writer.add_tokenizer_pre(info["pre"])
    if info.get("tokens"):
        writer.add_token_list(list(info["tokens"]))
    if info.get("scores"):
        writer.add_token_scores(list(info["scores"]))
    if info.get("merges"):
        writer.add_token_merges(list(info["merges"]))
    if info.get("token_type"):
        writer.add_token_types(list(info["token_type"]))
    for key, value in sorted(info.items()):
        if key.endswith("_token_id") and isinstance(value, int) and not isinstance(value, bool) \
                and value >= 0:
            writer.add_uint32(f"tokenizer.ggml.{key}", int(value))
        elif key in _TOKENIZER_BOOLS and isinstance(value, bool):
            writer.add_bool(f"tokenizer.ggml.{key}", value)
    if isinstance(info.get("chat_template"), str) and info["chat_template"]:
        writer.add_chat_template(info["chat_template"])


def _weights(params: dict) -> int:
    """Number of weight values (the rotary tables are buffers, not weights)."""
    n = params["embed"].numel() + params["norm"].numel() + \
        (params["lm_head"].numel() if "lm_head" in params else 0)
    return n + sum(v.numel() for p in params["layers"] for k, v in p.items() if k != "inv_freq")


def _size_label(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            value = n / div
            return f"{value:.0f}{unit}" if value >= 10 else f"{value:.1f}{unit}".replace(".0", "")
    return str(n)


def general_metadata(general: Optional[dict], name: str, kept: int, dense: int, layout: str) -> dict:
    """The ``general.*`` keys of an export ({key: {"value", "type", "sub_type"}}): the source's
    (``ecospa.io.gguf.general_info``), with, for a pruned model, a name, size label and
    description that say so and the source recorded as ``general.base_model.0``."""
    STRING, UINT32 = 8, 4  # gguf.GGUFValueType

    def text(value):
        return {"value": value, "type": STRING, "sub_type": None}

    out = dict(general or {})
    src_name = (out.get("general.name") or {}).get("value")
    src_name = src_name if isinstance(src_name, str) and src_name else None
    if src_name is None:
        out["general.name"] = text(name)
    if kept >= dense:
        return out
    out["general.name"] = text(f"{src_name or name} (pruned by ecospa, {kept / dense:.0%} of weights)")
    out["general.size_label"] = text(_size_label(kept))
    out["general.description"] = text(
        f"{src_name or 'model'} structurally pruned by ecospa: {kept:,} of {dense:,} weights kept "
        f"({kept / dense:.1%}); GGUF layout {layout!r}"
        + (" (per-layer MLP widths in deci.feed_forward_length, attention padded)"
           if layout == "compact" else " (pruned units padded with zeros to the dense shapes)"))
    if src_name and not any(k.startswith("general.base_model.") for k in general or {}):
        out["general.base_model.count"] = {"value": 1, "type": UINT32, "sub_type": None}
        out["general.base_model.0.name"] = text(src_name)
        for field in ("organization", "version", "repo_url"):
            value = (out.get(f"general.{field}") or {}).get("value")
            if isinstance(value, str) and value:
                out[f"general.base_model.0.{field}"] = text(value)
    return out


def _write_general(gguf, writer, entries: dict) -> None:
    for key, entry in entries.items():
        sub = entry.get("sub_type")
        writer.add_key_value(key, entry["value"], gguf.GGUFValueType(entry["type"]),
                             gguf.GGUFValueType(sub) if sub is not None else None)


def check_compact(params: dict) -> list:
    """The per-layer MLP widths of a tree the compact layout can hold; ValueError naming the
    layer otherwise (a layer with no MLP neuron left)."""
    widths = [int(p["w_up"].shape[1]) for p in params["layers"]]
    for i, w in enumerate(widths):
        if w < 1:
            raise ValueError(f"layer {i} has no MLP neuron left; the gguf-compact layout needs at "
                             "least one per layer (export it with --format gguf, which pads)")
    return widths


def save_gguf(params: dict, cfg, path: str, tokenizer_info: Optional[dict] = None,
              dtype: str = "f32", name: str = "ecospa model", overwrite: bool = False,
              layout: str = "padded", general: Optional[dict] = None) -> dict:
    """Write ``params`` (a dense or pruned LLaMA tree) to the GGUF file ``path``.

    Args:
      params, cfg: an ecospa LLaMA tree and its ``llama.Config``.
      path: the .gguf file to write (written to a temporary sibling, then renamed).
      tokenizer_info: ``tokenizer.ggml.*`` metadata to embed (e.g. from the source GGUF), so the
        file is usable on its own; without it the file holds weights only.
      dtype: "f32" or "f16".
      name: ``general.name`` when ``general`` has none.
      overwrite: replace an existing file at ``path`` (otherwise that is an error).
      layout: "padded" (llama architecture, dense shapes) or "compact" (deci architecture,
        per-layer MLP widths; see the module docstring).
      general: the source's ``general.*`` metadata (``ecospa.io.gguf.general_info``).
    Returns:
      what was written: {"path", "layout", "architecture", "ffn_width", "mlp_widths", "notes"}.
    """
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ValueError("writing GGUF files needs the 'gguf' package: pip install gguf") from err
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    if not isinstance(cfg, llama.Config):
        raise ValueError(f"GGUF export supports the llama family only, got {type(cfg).__name__}")
    if cfg.attention_bias:
        raise ValueError("GGUF export of models with q/k/v biases (Qwen2-style) is not supported: "
                         "llama.cpp's llama and deci architectures have no attention biases")
    if cfg.qk_norm:
        raise ValueError("GGUF export of Qwen3 (q/k norms) is not supported: llama.cpp's llama "
                         "and deci architectures have no q/k norms; use --format hf-padded")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".gguf"):
        raise ValueError(f"{path!r}: a GGUF file name must end in .gguf")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file name ending in .gguf")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path!r} exists; choose another name or pass overwrite=True (--overwrite)")
    widths = check_compact(params) if layout == "compact" else [p["w_up"].shape[1] for p in params["layers"]]
    padded, pcfg = pad(params, cfg)
    layers = padded["layers"]
    if layout == "compact":  # padded attention, the kept MLP neurons only
        layers = tuple({**q, "w_gate": p["w_gate"], "w_up": p["w_up"], "w_down": p["w_down"]}
                       for p, q in zip(params["layers"], layers))
    sd = {"model.embed_tokens.weight": padded["embed"], "model.norm.weight": padded["norm"]}
    if "lm_head" in padded:
        sd["lm_head.weight"] = padded["lm_head"]
    for i, q in enumerate(layers):
        sd.update(layer_to_hf(q, f"model.layers.{i}.", pcfg.dim))
    np_dtype = np.float32 if dtype == "f32" else np.float16
    dense, kept = _weights(padded), _weights(params)  # padded = the dense shapes

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    kept_note = "the previous file is unchanged" if os.path.lexists(path) else "nothing was written"
    with exclusive(path), write_errors(path, kept_note):
        for left in gguf_leftovers(path):  # temporary files of killed exports to this path
            os.remove(left)
        meta = {"tokenizer": tokenizer_info, "general": general, "name": name, "kept": kept,
                "dense": dense, "widths": widths}
        _write(gguf, path, sd, pcfg, cfg, meta, dtype, np_dtype, layout)
    notes = []
    if layout == "padded" and (len(set(widths)) > 1 or widths[0] != pcfg.ffn_dim):
        notes.append(f"MLP widths {min(widths)}..{max(widths)} padded with zeros to {pcfg.ffn_dim} "
                     "(llama.cpp's llama architecture has one feed_forward_length; "
                     "--format gguf-compact writes the kept neurons only)")
    if layout == "compact":
        notes.append(f"llama.cpp 'deci' architecture: per-layer MLP widths {min(widths)}..{max(widths)} "
                     f"(dense {cfg.ffn_dim})")
    if any(2 * p["wq"].shape[-1] != cfg.head_dim or p["wv"].shape[-1] != cfg.head_dim
           for p in params["layers"]):
        notes.append("pruned attention written padded (zero Q/K pairs and V/O dims): exact, "
                     "but llama.cpp computes the full head size")
    return {"path": path, "layout": layout, "architecture": LAYOUTS[layout],
            "ffn_width": pcfg.ffn_dim, "mlp_widths": widths, "notes": notes}


def _rope_metadata(gguf, writer, cfg):
    """Write the RoPE scaling the llama.cpp way: ``linear`` as metadata; any other scaling as the
    ``rope_freqs`` tensor of per-pair divisors (returned, written with the tensors), which is how
    llama.cpp's converter writes Llama 3.x."""
    spec = dict(cfg.rope_scaling or ())
    if not spec:
        return None
    if spec["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(spec["factor"]))
        return None
    base = llama.inv_freq(dataclasses.replace(cfg, rope_scaling=None))
    return (base / llama.inv_freq(cfg)).numpy().astype(np.float32)


def gguf_leftovers(path: str) -> list:
    """Temporary files that killed exports to ``path`` left beside it."""
    directory, name = os.path.split(path)
    if not os.path.isdir(directory):
        return []
    return [os.path.join(directory, e) for e in sorted(os.listdir(directory))
            if e.startswith(f".tmp-{name}-") and os.path.isfile(os.path.join(directory, e))
            and not os.path.islink(os.path.join(directory, e))]


def _write(gguf, path, sd, pcfg, cfg, meta, dtype, np_dtype, layout) -> None:
    """Write the file to a temporary sibling, then rename it over ``path``."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, LAYOUTS[layout])
        _write_general(gguf, writer, general_metadata(meta["general"], meta["name"], meta["kept"],
                                                      meta["dense"], layout))
        writer.add_block_count(pcfg.n_layers)
        writer.add_context_length(pcfg.max_seq_len)
        writer.add_embedding_length(pcfg.dim)
        if layout == "compact":  # one width per layer (an int32 array, as llama.cpp's converter writes)
            writer.add_feed_forward_length([int(w) for w in meta["widths"]])
            writer.add_uint32(DENSE_FFN_KEY, int(cfg.ffn_dim))
        else:
            writer.add_feed_forward_length(pcfg.ffn_dim)
        writer.add_head_count(pcfg.n_heads)
        writer.add_head_count_kv(pcfg.n_kv_heads)
        writer.add_rope_dimension_count(pcfg.head_dim)
        writer.add_rope_freq_base(float(pcfg.rope_theta))
        rope_freqs = _rope_metadata(gguf, writer, pcfg)
        writer.add_layer_norm_rms_eps(float(pcfg.norm_eps))
        writer.add_vocab_size(pcfg.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        if meta["tokenizer"]:
            _tokenizer_metadata(writer, meta["tokenizer"])
        for hf_name, w in sd.items():
            w = w.detach().float()
            if ".q_proj." in hf_name:
                w = permute(w, pcfg.n_heads)
            elif ".k_proj." in hf_name:
                w = permute(w, pcfg.n_kv_heads)
            arr = w.numpy().astype(np.float32 if w.ndim == 1 else np_dtype)  # norms stay f32
            writer.add_tensor(_gguf_name(hf_name), arr)
        if rope_freqs is not None:
            writer.add_tensor("rope_freqs.weight", rope_freqs)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        publish_mode(tmp)  # mkstemp makes it 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


__all__ = ["LAYOUTS", "check_compact", "general_metadata", "save_gguf", "gguf_leftovers"]
