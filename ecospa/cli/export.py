"""``ecospa export``: write a (pruned) model for transformers or llama.cpp.

    ecospa export --model runs/smol50/checkpoint --format hf-padded --out exports/smol50-hf
    ecospa export --model runs/smol50/checkpoint --format gguf --out exports/smol50.gguf
    ecospa export --model runs/smol50/checkpoint --format gguf-compact --out exports/smol50-compact.gguf
"""
from __future__ import annotations

import argparse

from ecospa.cli._options import MODEL_HELP, dtype_help, dtype_name
from ecospa.io import load
from ecospa.jobs.export import (FORMATS, GGUF_LAYOUTS, check_out, export, source_general_info,
                                source_special_tokens, source_tokenizer_info)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="hf-padded: stock transformers directory; hf-compact: pruned sizes, "
                        "trust_remote_code; gguf: llama.cpp file, dense shapes (padded); "
                        "gguf-compact: llama.cpp file ('deci' architecture) with per-layer MLP "
                        "widths, smaller and faster in llama.cpp")
    p.add_argument("--out", required=True, help="directory (hf-padded, hf-compact) or .gguf file to write")
    p.add_argument("--dtype", type=dtype_name, choices=("float32", "float16"), default="float32",
                   help=dtype_help("weight dtype in the export"))
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing export at --out (hf-padded: only a previous ecospa export)")


def run(args: argparse.Namespace) -> int:
    check_out(args.out, args.format, args.overwrite, model=args.model)  # before loading anything
    cfg, params, tok = load.load_model(args.model)
    gguf = args.format in GGUF_LAYOUTS
    info = source_tokenizer_info(args.model) if gguf else None
    general = source_general_info(args.model) if gguf else None
    special = source_special_tokens(args.model) if not gguf else None
    res = export(params, cfg, args.out, args.format, tokenizer=tok, tokenizer_info=info,
                 dtype={"float32": "f32", "float16": "f16"}[args.dtype], overwrite=args.overwrite,
                 special_tokens=special, general=general)
    print(f"wrote {res['format']} export: {res['path']}")
    for note in res["notes"]:
        print(f"  note: {note}")
    return 0


__all__ = ["add_arguments", "run"]
