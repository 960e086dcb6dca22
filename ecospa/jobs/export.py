"""Export a (pruned) model for other tools (``ecospa export`` is ``ecospa.cli.export``).

    ecospa export --model runs/smol50/checkpoint --format hf-padded --out exports/smol50-hf
    ecospa export --model runs/smol50/checkpoint --format gguf --out exports/smol50.gguf

Formats:
- ``hf-padded``: a stock ``transformers`` directory (LlamaForCausalLM / Qwen2ForCausalLM /
  GPT2LMHeadModel, no custom code) in the padded layout (``ecospa.func.padding``): same logits,
  loads everywhere (PEFT, lm-eval's ``hf`` model, vLLM); attention is computed at full size.
  ``ecospa.func.padding.compact`` (or ``load_model(..., compact=True)``) brings it back compact.
- ``hf-compact``: per-layer pruned sizes kept (real savings) with a self-contained modeling file
  registered through ``auto_map`` (``ecospa.io.hf_compact``): load with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``; LLaMA family only.
- ``gguf``: a llama.cpp file, padded the same way (``ecospa.io.gguf_export``), with the source's
  tokenizer metadata when the source has it.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch

from ecospa._tree import cast_weights
from ecospa.errors import UsageError
from ecospa.func.families import family_of
from ecospa.func.padding import pad
from ecospa.io.gguf import open_reader, tokenizer_info
from ecospa.io.files import check_output_path
from ecospa.io.gguf_export import save_gguf
from ecospa.io.hf import hf_family_of
from ecospa.io.hf_compact import save_hf_compact
from ecospa.io.hf_write import check_export_target
from ecospa.io.load import REGISTRY, registry_path, run_checkpoint

FORMATS = ("hf-padded", "hf-compact", "gguf")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_source(out: str, model: Optional[str], flag: str = "--out") -> None:
    """UsageError when the output ``out`` is, lies in, or holds the input ``model`` (writing it
    would replace the model being read)."""
    if not model or not os.path.exists(model):
        return
    src = os.path.realpath(run_checkpoint(model))
    real = os.path.realpath(out)
    if _inside(real, src) or _inside(src, real):
        raise UsageError(f"{flag} {out!r} is, lies in or holds the input --model {model!r}: the export "
                         "would replace the model it reads; choose another path")


def check_out(out: str, fmt: str, overwrite: bool, model: Optional[str] = None, flag: str = "--out") -> str:
    """The absolute path an export may write (UsageError, nothing touched, otherwise): never the
    input ``model`` or a path inside it; an existing export only with ``overwrite``."""
    out = os.path.abspath(os.fspath(out))
    check_source(out, model, flag)
    if fmt != "gguf":
        out = check_export_target(out, flag)  # new, empty, or an earlier export of ours
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise UsageError(f"{flag} {out!r} holds an earlier export; pass --overwrite to replace it, "
                             "or choose another directory")
        return out
    if not out.endswith(".gguf"):
        raise UsageError(f"{flag} {out!r}: a GGUF file name must end in .gguf")
    if os.path.lexists(out) and not overwrite:
        raise UsageError(f"{flag} {out!r} exists; choose another name or pass --overwrite")
    return check_output_path(out, flag, " (an export never writes through a link)")


def export(params: dict, cfg, out: str, fmt: str, tokenizer=None, tokenizer_info: Optional[dict] = None,
           dtype: str = "f32", overwrite: bool = False) -> dict:
    """Write ``params`` to ``out`` in format ``fmt`` (see the module docstring).

    Returns {"format", "path", "notes"}. ``tokenizer`` (a ``tokenizers.Tokenizer``) is saved as
    tokenizer.json beside an HF export; ``tokenizer_info`` (GGUF tokenizer metadata) goes into a
    GGUF file. The input tree is not modified.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_out(out, fmt, overwrite)
    if fmt == "gguf":
        info = save_gguf(params, cfg, out, tokenizer_info=tokenizer_info, dtype=dtype, overwrite=overwrite)
        return {"format": fmt, "path": info["path"], "notes": info["notes"]}
    fam = family_of(cfg)
    if dtype == "f16":  # the weights only: rotary frequencies stay float32 (exact phases)
        params = cast_weights(params, torch.float16)
    files = {}
    if tokenizer is not None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab_size"):
        files["tokenizer.json"] = tokenizer.to_str().encode("utf-8")  # a tokenizers.Tokenizer
    if fmt == "hf-compact":
        path, pcfg = save_hf_compact(params, cfg, out, files), cfg
    else:
        padded, pcfg = pad(params, cfg)
        path = hf_family_of(cfg).save_hf(padded, pcfg, out, files)
    notes = []
    if fmt == "hf-compact":
        return {"format": fmt, "path": path, "notes": [
            "load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]}
    qk_per_unit = 2 if fam.name == "llama" else 1  # a LLaMA qk unit is a rotary pair
    widths = sorted({(qk_per_unit * p["wq"].shape[-1], p["wv"].shape[-1]) for p in params["layers"]})
    if widths != [(cfg.head_dim, cfg.head_dim)]:
        notes.append("pruned attention written padded with zeros (exact; computed at full head size)")
    mlp = {p[fam.ffn_in].shape[1] for p in params["layers"]}
    if mlp != {pcfg.ffn_dim}:
        notes.append(f"MLP widths {min(mlp)}..{max(mlp)} padded with zeros to {pcfg.ffn_dim}")
    return {"format": fmt, "path": path, "notes": notes}


def source_tokenizer_info(spec: str) -> Optional[dict]:
    """GGUF tokenizer metadata of a model spec (a .gguf, a registry name, or a native checkpoint
    that records one of those as its tokenizer source), or None."""
    path = registry_path(spec) if spec in REGISTRY else spec
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        with open(os.path.join(path, "manifest.json")) as f:
            src = (json.load(f).get("extra") or {}).get("tokenizer")
        return source_tokenizer_info(src) if isinstance(src, str) and src != spec else None
    if str(path).endswith(".gguf") and os.path.isfile(path):
        return tokenizer_info(open_reader(path)) or None
    return None


__all__ = ["FORMATS", "check_out", "check_source", "export", "source_tokenizer_info"]
