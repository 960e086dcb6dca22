"""Export a (pruned) model for other tools, and the ``ecospa export`` command.

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

import argparse
import os
from typing import Optional

from ecospa.errors import UsageError
from ecospa.func import gpt2, llama
from ecospa.func.padding import pad

FORMATS = ("hf-padded", "hf-compact", "gguf")


def _check_out(out: str, fmt: str, overwrite: bool) -> str:
    out = os.path.abspath(os.fspath(out))
    if fmt == "gguf":
        if not out.endswith(".gguf"):
            raise UsageError(f"--out {out!r}: a GGUF file name must end in .gguf")
        if os.path.lexists(out) and not overwrite:
            raise UsageError(f"--out {out!r} exists; choose another name or pass --overwrite")
    else:
        from ecospa.func._hf_llama import check_export_target
        return check_export_target(out, "--out")  # new, empty, or an earlier export of ours
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if parent and not os.path.isdir(parent):
        raise UsageError(f"--out {out!r} is under the file {parent!r}")
    return out


def export(params: dict, cfg, out: str, fmt: str, tokenizer=None, tokenizer_info: Optional[dict] = None,
           dtype: str = "f32", overwrite: bool = False) -> dict:
    """Write ``params`` to ``out`` in format ``fmt`` (see the module docstring).

    Returns {"format", "path", "notes"}. ``tokenizer`` (a ``tokenizers.Tokenizer``) is saved as
    tokenizer.json beside an HF export; ``tokenizer_info`` (GGUF tokenizer metadata) goes into a
    GGUF file. The input tree is not modified.
    """
    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = _check_out(out, fmt, overwrite)
    if fmt == "gguf":
        from ecospa.io.gguf_export import save_gguf
        info = save_gguf(params, cfg, out, tokenizer_info=tokenizer_info, dtype=dtype, overwrite=overwrite)
        return {"format": fmt, "path": info["path"], "notes": info["notes"]}
    module = llama if isinstance(cfg, llama.Config) else gpt2 if isinstance(cfg, gpt2.Config) else None
    if module is None:
        raise ValueError(f"no HF export for config type {type(cfg).__name__}")
    if dtype == "f16":
        import optree
        params = optree.tree_map(lambda x: x.half() if x.is_floating_point() and x.ndim > 1 else x,
                                 params, namespace="")
    files = {}
    if tokenizer is not None and hasattr(tokenizer, "to_str") and hasattr(tokenizer, "get_vocab_size"):
        files["tokenizer.json"] = tokenizer.to_str().encode("utf-8")  # a tokenizers.Tokenizer
    if fmt == "hf-compact":
        from ecospa.io.hf_compact import save_hf_compact
        path, pcfg = save_hf_compact(params, cfg, out, files), cfg
    else:
        padded, pcfg = pad(params, cfg)
        path = module.save_hf(padded, pcfg, out, files)
    notes = []
    if fmt == "hf-compact":
        return {"format": fmt, "path": path, "notes": [
            "load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]}
    widths = sorted({(2 * p["wq"].shape[-1] if module is llama else p["wq"].shape[-1], p["wv"].shape[-1])
                     for p in params["layers"]})
    if widths != [(cfg.head_dim, cfg.head_dim)]:
        notes.append("pruned attention written padded with zeros (exact; computed at full head size)")
    mlp = {p["w_up" if module is llama else "w_in"].shape[1] for p in params["layers"]}
    if mlp != {pcfg.ffn_dim}:
        notes.append(f"MLP widths {min(mlp)}..{max(mlp)} padded with zeros to {pcfg.ffn_dim}")
    return {"format": fmt, "path": path, "notes": notes}


def _source_tokenizer_info(spec: str) -> Optional[dict]:
    """GGUF tokenizer metadata of a model spec (a .gguf, a registry name, or a native checkpoint
    that records one of those as its tokenizer source), or None."""
    from ecospa.models import REGISTRY, registry_path
    path = registry_path(spec) if spec in REGISTRY else spec
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        import json
        with open(os.path.join(path, "manifest.json")) as f:
            src = (json.load(f).get("extra") or {}).get("tokenizer")
        return _source_tokenizer_info(src) if isinstance(src, str) and src != spec else None
    if str(path).endswith(".gguf") and os.path.isfile(path):
        import gguf

        from ecospa.io.gguf import tokenizer_info
        return tokenizer_info(gguf.GGUFReader(path)) or None
    return None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="registry name, .gguf file, Hugging Face directory or ecospa checkpoint")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf-padded: stock transformers directory; hf-compact: pruned sizes, "
                        "trust_remote_code; gguf: llama.cpp file")
    p.add_argument("--out", required=True, help="directory (hf-padded, hf-compact) or .gguf file to write")
    p.add_argument("--dtype", choices=("f32", "f16"), default="f32", help="weight dtype in the export")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export at --out (hf-padded: only a previous ecospa export)")


def run(args: argparse.Namespace) -> int:
    from ecospa.models import load_model
    _check_out(args.out, args.format, args.overwrite)  # before loading anything
    cfg, params, tok = load_model(args.model)
    info = _source_tokenizer_info(args.model) if args.format == "gguf" else None
    res = export(params, cfg, args.out, args.format, tokenizer=tok, tokenizer_info=info,
                 dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {res['format']} export: {res['path']}")
    for note in res["notes"]:
        print(f"  note: {note}")
    return 0


__all__ = ["FORMATS", "export", "add_arguments", "run"]
