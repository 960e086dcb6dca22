"""``ecospa eval``: held-out perplexity of a model on one or more text sources.

    ecospa eval --model runs/train                       # as the run validated (its seq_len, windows)
    ecospa eval --model smollm2-135m                     # pydoc val AND stdlib val (2nd domain)
    ecospa eval --model runs/smol50 --data pydoc --seq-len 512 --eval-windows 15

The defaults come from the model (``ecospa.jobs.evaluate.eval_defaults``): a checkpoint of
``ecospa train`` is scored on its run's data first, with the run's window, batch and number of
validation windows (so the perplexity is the one the run reported); another model on 512-token
windows capped at its context. A --seq-len past the trained context is warned about.

Each source's split is tokenized (the first ``MAX_CHARS`` characters) and scored on the first
``--eval-windows`` non-overlapping windows (``ecospa.io.data.windows``); one line per source.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import optree
import torch

from ecospa._tree import count_params
from ecospa.cli._options import MODEL_HELP, add_device, add_threads, renamed
from ecospa.errors import positive_int
from ecospa.func.families import family_of
from ecospa.io import load
from ecospa.io.data import corpus
from ecospa.io.load import encode, train_config_of
from ecospa.jobs.evaluate import eval_defaults, nll, window_warning

MAX_CHARS = 2_000_000  # per source: far more text than 40 windows of 512 tokens need


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags of ``ecospa eval``."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--data", nargs="+", default=None,
                   help="text sources (pydoc, stdlib, file:PATH, ...), each scored on its own (default: "
                   "a train run's data, then pydoc (English prose) and stdlib (Python source) as "
                   "a second domain)")
    p.add_argument("--split", default="val", choices=("train", "val"), help="which split of each source")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="predictions per window (default: a train run's seq_len, else 512 capped at the "
                        "model's context)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="windows per forward call (default: a train run's batch_size, else 4)")
    p.add_argument("--eval-windows", dest="max_windows", type=positive_int, default=None, metavar="N",
                   help="evaluate only the first N windows of each source (default: a train run's "
                        "eval_batches x batch_size, else 40, as compress)")
    renamed(p, "--max-windows", "--eval-windows")
    add_device(p)
    add_threads(p)


def run(args: argparse.Namespace) -> int:
    """Load, tokenize the split, print perplexity and conditions."""
    if args.threads:
        torch.set_num_threads(args.threads)
    trained = train_config_of(args.model)
    texts = {src: corpus(src, args.split, max_chars=MAX_CHARS)  # bad --data: before loading
             for src in (args.data or eval_defaults(None, trained)["data"])}
    cfg, params, tok = load.load_model(args.model)
    params = optree.tree_map(lambda x: x.to(args.device), params, namespace="")
    d = eval_defaults(cfg, trained)
    seq_len, batch_size, max_windows = (d[k] if getattr(args, k) is None else getattr(args, k)
                                        for k in ("seq_len", "batch_size", "max_windows"))
    warning = window_warning(seq_len, d)
    if warning:
        print(warning, file=sys.stderr)
    print(f"model {args.model}: {count_params(params) / 1e6:.2f}M params")
    for src, text in texts.items():
        ids = encode(tok, text).to(args.device)
        t0 = time.perf_counter()
        res = nll(family_of(cfg).forward, params, cfg, ids, seq_len, batch_size, max_windows,
                  progress=True)
        print(f"data {src}/{args.split}: {ids.numel()} tokens, {res['windows']} windows x {seq_len} "
              f"({time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads): "
              f"perplexity {math.exp(res['nll']):.3f}  (mean NLL {res['nll']:.4f})", flush=True)
    return 0


__all__ = ["add_arguments", "run"]
