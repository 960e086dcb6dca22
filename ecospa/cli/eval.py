"""``ecospa eval``: held-out perplexity of a model on one or more text sources.

    ecospa eval --model smollm2-135m                     # pydoc val AND stdlib val (2nd domain)
    ecospa eval --model runs/smol50 --data pydoc --seq-len 512 --eval-windows 15

Each source's split is tokenized (the first ``MAX_CHARS`` characters) and scored on the first
``--eval-windows`` non-overlapping windows (``ecospa.io.data.windows``); one line per source.
"""
from __future__ import annotations

import argparse
import math
import time

import optree
import torch

from ecospa._tree import count_params
from ecospa.cli._options import MODEL_HELP, add_device, add_threads, renamed
from ecospa.errors import positive_int
from ecospa.func.families import family_of
from ecospa.io import load
from ecospa.io.data import corpus
from ecospa.io.load import encode
from ecospa.jobs.evaluate import nll

MAX_CHARS = 2_000_000  # per source: far more text than 40 windows of 512 tokens need


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ecospa eval``."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", nargs="+", default=["pydoc", "stdlib"],
                   help="text sources (pydoc, stdlib, file:PATH, ...), each scored on its own; the "
                   "default adds Python source (stdlib) to English prose (pydoc) as a second domain")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which split of each source")
    p.add_argument("--seq-len", type=positive_int, default=512, help="predictions per window")
    p.add_argument("--batch-size", type=positive_int, default=4, help="windows per forward call")
    p.add_argument("--eval-windows", dest="max_windows", type=positive_int, default=40, metavar="N",
                   help="evaluate only the first N windows of each source (as compress)")
    renamed(p, "--max-windows", "--eval-windows")
    add_device(p)
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    """Load, tokenize the split, print perplexity and conditions."""
    if args.threads:
        torch.set_num_threads(args.threads)
    texts = {src: corpus(src, args.split, max_chars=MAX_CHARS) for src in args.data}  # bad --data: before loading
    cfg, params, tok = load.load_model(args.model)
    params = optree.tree_map(lambda x: x.to(args.device), params, namespace="")
    print(f"model {args.model}: {count_params(params) / 1e6:.2f}M params")
    for src, text in texts.items():
        ids = encode(tok, text).to(args.device)
        t0 = time.perf_counter()
        res = nll(family_of(cfg).forward, params, cfg, ids, args.seq_len, args.batch_size,
                  args.max_windows, progress=True)
        print(f"data {src}/{args.split}: {ids.numel()} tokens, {res['windows']} windows x {args.seq_len} "
              f"({time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads): "
              f"perplexity {math.exp(res['nll']):.3f}  (mean NLL {res['nll']:.4f})")
    return 0


__all__ = ["add_arguments", "run"]
