"""Write LLaMA-family ecospa trees as GGUF files for llama.cpp (the ``llama`` architecture).

llama.cpp's ``llama`` graph needs one head size for keys and values equal to the rotary size,
one ``rope_freqs`` table for all layers and (in the ``llama`` architecture) one
``feed_forward_length``: a pruned tree is written in the padded layout
(``ecospa.func.padding.pad``), which computes the same logits. Per-layer MLP widths would need
llama.cpp's ``deci`` architecture, which ecospa's reader (and most tools) do not read, so the MLP
is padded to the widest layer, and ``save_gguf`` says so in its return value.

Weights are stored as F32 (or F16 with ``dtype="f16"``); the Q/K rows get llama.cpp's rotary
permutation (``ecospa.io.gguf.permute``), which ``load_gguf`` undoes on the way back in.
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
from ecospa.io.hf_llama import to_hf

_NAMES = {hf: g for g, hf in LAYER_NAMES.items()}  # HF name inside "model.layers.N." -> "blk.N."
_TOP = {hf: g for g, hf in TOP_NAMES.items()}


def _gguf_name(hf: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem.startswith("model.layers."):
        _, _, i, rest = stem.split(".", 3)
        return f"blk.{i}.{_NAMES[rest]}.{suffix}"
    return f"{_TOP[stem]}.{suffix}"


def _tokenizer_metadata(writer, info: dict) -> None:
    """Copy ``tokenizer.ggml.*`` metadata (as ``ecospa.io.gguf.tokenizer_info`` returns it)."""
    if info.get("model"):
        writer.add_tokenizer_model(info["model"])
    if info.get("pre"):
        writer.add_tokenizer_pre(info["pre"])
    if info.get("tokens"):
        writer.add_token_list(list(info["tokens"]))
    if info.get("merges"):
        writer.add_token_merges(list(info["merges"]))
    if info.get("token_type"):
        writer.add_token_types(list(info["token_type"]))
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("unknown_token_id", writer.add_unk_token_id),
                     ("padding_token_id", writer.add_pad_token_id)):
        if info.get(key) is not None:
            add(int(info[key]))
    if isinstance(info.get("chat_template"), str) and info["chat_template"]:
        writer.add_chat_template(info["chat_template"])
    if isinstance(info.get("add_bos_token"), bool):
        writer.add_add_bos_token(info["add_bos_token"])


def save_gguf(params: dict, cfg, path: str, tokenizer_info: Optional[dict] = None,
              dtype: str = "f32", name: str = "ecospa model", overwrite: bool = False) -> dict:
    """Write ``params`` (a dense or pruned LLaMA tree) to the GGUF file ``path``.

    Args:
      params, cfg: an ecospa LLaMA tree and its ``llama.Config``.
      path: the .gguf file to write (written to a temporary sibling, then renamed).
      tokenizer_info: ``tokenizer.ggml.*`` metadata to embed (e.g. from the source GGUF), so the
        file is usable on its own; without it the file holds weights only.
      dtype: "f32" or "f16".
      overwrite: replace an existing file at ``path`` (otherwise that is an error).
    Returns:
      what was written: {"path", "layout": "padded", "ffn_width", "mlp_widths", "notes"}.
    """
    try:
        import gguf
    except ModuleNotFoundError as err:
        raise ValueError("writing GGUF files needs the 'gguf' package: pip install gguf") from err
    if not isinstance(cfg, llama.Config):
        raise ValueError(f"GGUF export supports the llama family only, got {type(cfg).__name__}")
    if cfg.attention_bias:
        raise ValueError("GGUF export of models with q/k/v biases (Qwen2-style) is not supported: "
                         "llama.cpp's llama architecture has no attention biases")
    if cfg.qk_norm:
        raise ValueError("GGUF export of Qwen3 (q/k norms) is not supported: llama.cpp's llama "
                         "architecture has no q/k norms; use --format hf-padded")
    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".gguf"):
        raise ValueError(f"{path!r}: a GGUF file name must end in .gguf")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory; give a file name ending in .gguf")
    if os.path.lexists(path) and not overwrite:
        raise ValueError(f"{path!r} exists; choose another name or pass overwrite=True (--overwrite)")
    widths = [p["w_up"].shape[1] for p in params["layers"]]
    padded, pcfg = pad(params, cfg)
    sd, _ = to_hf(padded, pcfg)
    np_dtype = np.float32 if dtype == "f32" else np.float16

    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    kept = "the previous file is unchanged" if os.path.lexists(path) else "nothing was written"
    with exclusive(path), write_errors(path, kept):
        for left in gguf_leftovers(path):  # temporary files of killed exports to this path
            os.remove(left)
        _write(gguf, path, sd, pcfg, tokenizer_info, dtype, np_dtype, name)
    notes = []
    if len(set(widths)) > 1 or widths[0] != pcfg.ffn_dim:
        notes.append(f"MLP widths {min(widths)}..{max(widths)} padded with zeros to {pcfg.ffn_dim} "
                     "(llama.cpp's llama architecture has one feed_forward_length)")
    if any(2 * p["wq"].shape[-1] != cfg.head_dim or p["wv"].shape[-1] != cfg.head_dim
           for p in params["layers"]):
        notes.append("pruned attention written padded (zero Q/K pairs and V/O dims): exact, "
                     "but llama.cpp computes the full head size")
    return {"path": path, "layout": "padded", "ffn_width": pcfg.ffn_dim, "mlp_widths": widths,
            "notes": notes}


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


def _write(gguf, path, sd, pcfg, tokenizer_info, dtype, np_dtype, name) -> None:
    """Write the file to a temporary sibling, then rename it over ``path``."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + "-", dir=directory)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        writer.add_name(name)
        writer.add_block_count(pcfg.n_layers)
        writer.add_context_length(pcfg.max_seq_len)
        writer.add_embedding_length(pcfg.dim)
        writer.add_feed_forward_length(pcfg.ffn_dim)
        writer.add_head_count(pcfg.n_heads)
        writer.add_head_count_kv(pcfg.n_kv_heads)
        writer.add_rope_dimension_count(pcfg.head_dim)
        writer.add_rope_freq_base(float(pcfg.rope_theta))
        rope_freqs = _rope_metadata(gguf, writer, pcfg)
        writer.add_layer_norm_rms_eps(float(pcfg.norm_eps))
        writer.add_vocab_size(pcfg.vocab_size)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        if tokenizer_info:
            _tokenizer_metadata(writer, tokenizer_info)
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


__all__ = ["save_gguf", "gguf_leftovers"]
