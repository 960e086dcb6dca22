"""Held-out perplexity, and the ``ecospa eval`` command.

Perplexity is ``exp(mean next-token NLL)`` over fixed, non-overlapping windows of ``seq_len``
predictions taken from the start of the token stream (each window is ``seq_len + 1`` tokens, the
last token of one window is the first of the next; no context crosses a window boundary).

    ecospa eval --model smollm2-135m --data pydoc --seq-len 512
"""
from __future__ import annotations

import argparse
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ecospa.errors import positive_int


def windows(ids: torch.Tensor, seq_len: int, max_windows: Optional[int] = None) -> torch.Tensor:
    """Non-overlapping evaluation windows [n, seq_len + 1] from the start of a 1-D stream."""
    if ids.ndim != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    n = (ids.numel() - 1) // seq_len
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for one window of {seq_len} + 1; "
                         "use more text or a smaller --seq-len")
    if max_windows is not None:
        if max_windows < 1:
            raise ValueError(f"max_windows must be >= 1, got {max_windows}")
        n = min(n, max_windows)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)  # [n, T+1]
    return ids[idx]


def nll(forward: Callable, params, cfg, ids: torch.Tensor, seq_len: int = 512,
        batch_size: int = 4, max_windows: Optional[int] = None, progress: bool = False) -> dict:
    """Summed next-token NLL over the windows: {"nll": mean, "tokens": n, "windows": w}."""
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = windows(ids, seq_len, max_windows)
    total, count = 0.0, 0
    batches = win.split(batch_size)
    with torch.no_grad():
        for batch in tqdm(batches, desc="eval", unit="batch", disable=not progress, leave=False):
            logits = forward(params, batch[:, :-1], cfg)  # [B, T, V]
            loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(),
                                   reduction="sum")
            total += float(loss)
            count += batch[:, 1:].numel()
    return {"nll": total / count, "tokens": count, "windows": win.shape[0]}


def perplexity(forward: Callable, params, cfg, ids: torch.Tensor, seq_len: int = 512,
               batch_size: int = 4, max_windows: Optional[int] = None,
               progress: bool = False) -> float:
    """Perplexity of ``forward(params, tokens, cfg)`` on ``ids`` (1-D int64), pure.

    Args:
      forward: a pure forward, e.g. ``llama.forward``.
      params, cfg: the model.
      ids: the token stream.
      seq_len: predictions per window (windows are non-overlapping).
      batch_size: windows per forward call.
      max_windows: use only the first this many windows (None: all).
      progress: show a tqdm progress bar.
    Returns:
      exp(mean NLL) as a float.
    Example:
      ppl = perplexity(llama.forward, params, cfg, ids, seq_len=512, max_windows=40)
    """
    return math.exp(nll(forward, params, cfg, ids, seq_len, batch_size, max_windows, progress)["nll"])


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
    from ecospa.data import corpus
    from ecospa.models import encode, forward_for, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    text = corpus(args.data, args.split)  # a bad --data fails before the model is loaded
    cfg, params, tok = load_model(args.model)
    ids = encode(tok, text)
    t0 = time.perf_counter()
    res = nll(forward_for(cfg), params, cfg, ids, args.seq_len, args.batch_size,
              args.max_windows, progress=True)
    n_params = sum(x.numel() for x in _leaves(params))
    print(f"model {args.model}: {n_params / 1e6:.2f}M params; data {args.data}/{args.split}: "
          f"{ids.numel()} tokens, {res['windows']} windows x {args.seq_len} "
          f"({time.perf_counter() - t0:.1f}s, {torch.get_num_threads()} threads)")
    print(f"perplexity {math.exp(res['nll']):.3f}  (mean NLL {res['nll']:.4f})")
    return 0


def _leaves(params):
    import optree
    return [x for x in optree.tree_leaves(params, namespace="") if x.is_floating_point()]


__all__ = ["perplexity", "nll", "windows", "add_arguments", "run"]
