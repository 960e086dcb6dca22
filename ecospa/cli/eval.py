"""``ecospa eval``: held-out perplexity of a model on a text source.

    ecospa eval --model smollm2-135m --data pydoc --seq-len 512
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from ecospa._tree import count_params
from ecospa.errors import positive_int
from ecospa.func.families import family_of
from ecospa.io import load
from ecospa.io.data import corpus
from ecospa.io.load import encode
from ecospa.jobs.evaluate import nll


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ecospa eval``."""
    p.add_argument("--model", required=True,
                   help="registry name (smollm2-135m), .gguf file, HF directory or ecospa checkpoint")
    p.add_argument("--data", default="pydoc", help="text source (pydoc, stdlib, file:PATH, ...)")
    p.add_argument("--split", default="val", choices=("train", "val"))
    p.add_argument("--seq-len", type=positive_int, default=512)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--max-windows", type=positive_int, default=None,
                   help="evaluate only the first N windows")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def run(args: argparse.Namespace) -> int:
    """Load, tokenize the split, print perplexity and conditions."""
    if args.threads:
        torch.set_num_threads(args.threads)
    text = corpus(args.data, args.split)  # a bad --data fails before the model is loaded
    cfg, params, tok = load.load_model(args.model)
    ids = encode(tok, text)
    t0 = time.perf_counter()
    res = nll(family_of(cfg).forward, params, cfg, ids, args.seq_len, args.batch_size,
              args.max_windows, progress=True)
    print(f"model {args.model}: {count_params(params) / 1e6:.2f}M params; data {args.data}/{args.split}: "
          f"{ids.numel()} tokens, {res['windows']} windows x {args.seq_len} "
          f"({time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads)")
    print(f"perplexity {math.exp(res['nll']):.3f}  (mean NLL {res['nll']:.4f})")
    return 0


__all__ = ["add_arguments", "run"]
