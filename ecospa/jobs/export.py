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
- ``gguf``: a llama.cpp file (``llama`` architecture), padded the same way
  (``ecospa.io.gguf_export``): every file is the dense size.
- ``gguf-compact``: a llama.cpp file in its ``deci`` architecture with per-layer MLP widths (only
  the kept neurons; attention padded): the file and llama.cpp's MLP compute shrink with the
  pruning. ``ecospa.io.gguf.load_gguf`` reads it back compact.

Both GGUF formats carry the source GGUF's tokenizer metadata (pre-tokenizer, chat template,
bos/eos/add-prefix flags) and its ``general.*`` metadata (a pruned model's name, size label and
description say so).

The HF formats carry the source's special tokens and chat template (``source_special_tokens``:
tokenizer_config.json, special_tokens_map.json, generation_config.json and the ids in
config.json, ``ecospa.io.special_tokens``), so ``AutoTokenizer`` and lm-eval's ``hf`` model
find bos/eos/pad.
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
from ecospa.io.gguf import general_info, open_reader, tokenizer_info
from ecospa.io.files import check_output_path
from ecospa.io.gguf_export import save_gguf
from ecospa.io.hf import hf_family_of
from ecospa.io.hf_compact import save_hf_compact
from ecospa.io.hf_write import check_export_target
from ecospa.io.load import REGISTRY, checkpoint_tokenizer_spec, registry_path, run_checkpoint
from ecospa.io.special_tokens import SpecialTokens, config_ids, from_gguf, from_hf_dir, hf_files

FORMATS = ("hf-padded", "hf-compact", "gguf", "gguf-compact")
GGUF_LAYOUTS = {"gguf": "padded", "gguf-compact": "compact"}  # format -> save_gguf layout


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
    if fmt not in GGUF_LAYOUTS:
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


def _tokenizer_json(tokenizer) -> Optional[bytes]:
    """tokenizer.json of a ``tokenizers.Tokenizer`` or of a fast transformers tokenizer, or None."""
    tokenizer = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if tokenizer is not None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab_size"):
        return tokenizer.to_str().encode("utf-8")
    return None


def export(params: dict, cfg, out: str, fmt: str, tokenizer=None, tokenizer_info: Optional[dict] = None,
           dtype: str = "f32", overwrite: bool = False,
           special_tokens: Optional[SpecialTokens] = None, general: Optional[dict] = None) -> dict:
    """Write ``params`` to ``out`` in format ``fmt`` (see the module docstring).

    Returns {"format", "path", "notes"}. ``tokenizer`` (a ``tokenizers.Tokenizer`` or a fast
    transformers tokenizer) is saved as tokenizer.json beside an HF export, with
    ``special_tokens`` (``source_special_tokens``: bos/eos/unk/pad, chat template) in the files
    transformers reads; ``tokenizer_info`` (GGUF tokenizer metadata) and ``general`` (the source
    GGUF's ``general.*``, ``source_general_info``) go into a GGUF file. The input tree is not
    modified.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = check_out(out, fmt, overwrite)
    if fmt in GGUF_LAYOUTS:
        info = save_gguf(params, cfg, out, tokenizer_info=tokenizer_info, dtype=dtype, overwrite=overwrite,
                         layout=GGUF_LAYOUTS[fmt], general=general)
        return {"format": fmt, "path": info["path"], "notes": info["notes"]}
    fam = family_of(cfg)
    if dtype == "f16":  # the weights only: rotary frequencies stay float32 (exact phases)
        params = cast_weights(params, torch.float16)
    files = {}
    if _tokenizer_json(tokenizer) is not None:
        files["tokenizer.json"] = _tokenizer_json(tokenizer)
    files.update(hf_files(special_tokens, tokenizer="tokenizer.json" in files))
    ids = config_ids(special_tokens)
    if fmt == "hf-compact":
        path, pcfg = save_hf_compact(params, cfg, out, files, ids), cfg
    else:
        padded, pcfg = pad(params, cfg)
        path = hf_family_of(cfg).save_hf(padded, pcfg, out, files, ids)
    notes = []
    if fmt == "hf-compact":
        return {"format": fmt, "path": path, "notes": [
            "load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]}
    widths = sorted({fam.kv_dims(p)[2:] for p in params["layers"]})  # (Dk, Dv) of each layer
    if widths != [(cfg.head_dim, cfg.head_dim)]:
        notes.append("pruned attention written padded with zeros (exact; computed at full head size)")
    mlp = {p[fam.ffn_in].shape[1] for p in params["layers"]}
    if mlp != {pcfg.ffn_dim}:
        notes.append(f"MLP widths {min(mlp)}..{max(mlp)} padded with zeros to {pcfg.ffn_dim}")
    return {"format": fmt, "path": path, "notes": notes}


def source_gguf(spec: str) -> Optional[str]:
    """The GGUF file behind a model spec (a .gguf, a registry name, or a native checkpoint that
    records one of those as its tokenizer source), or None."""
    path = registry_path(spec) if spec in REGISTRY else spec
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        with open(os.path.join(path, "manifest.json")) as f:
            src = (json.load(f).get("extra") or {}).get("tokenizer")
        return source_gguf(src) if isinstance(src, str) and src != spec else None
    if str(path).endswith(".gguf") and os.path.isfile(path):
        return path
    return None


def source_tokenizer_info(spec: str) -> Optional[dict]:
    """GGUF tokenizer metadata of a model spec (see ``source_gguf``), or None."""
    path = source_gguf(spec)
    return (tokenizer_info(open_reader(path)) or None) if path else None


def source_general_info(spec: str) -> Optional[dict]:
    """The source GGUF's ``general.*`` metadata (``ecospa.io.gguf.general_info``) of a model
    spec (see ``source_gguf``), or None."""
    path = source_gguf(spec)
    return (general_info(open_reader(path)) or None) if path else None


def source_special_tokens(spec: str) -> Optional[SpecialTokens]:
    """The special tokens and chat template of a model spec: a GGUF's metadata (a .gguf or a
    registry name), a Hugging Face directory's tokenizer files, or those of the source a native
    checkpoint records as its tokenizer; None when there are none to read (a hub id, a byte
    tokenizer)."""
    path = registry_path(spec) if spec in REGISTRY else run_checkpoint(os.fspath(spec))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        src = checkpoint_tokenizer_spec(path)
        if not src or src == spec or not (src in REGISTRY or os.path.exists(src)):
            return None
        try:
            return source_special_tokens(src)
        except ValueError:  # a registered model that is not installed any more
            return None
    if str(path).endswith(".gguf") and os.path.isfile(path):
        return from_gguf(tokenizer_info(open_reader(path))) or None
    if os.path.isdir(path):
        return from_hf_dir(path) or None
    return None


__all__ = ["FORMATS", "GGUF_LAYOUTS", "check_out", "check_source", "export", "source_general_info",
           "source_gguf", "source_special_tokens", "source_tokenizer_info"]
