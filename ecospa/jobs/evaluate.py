"""Held-out perplexity: ``exp(mean next-token NLL)`` over ``ecospa.io.data.windows``.

The loss is ``ecospa.train.step.lm_loss`` and the mean is ``ecospa.train.step.evaluate``, the same
two functions ``ecospa train`` reports its validation perplexity with, so ``ecospa train`` and
``ecospa eval`` agree on the same params and windows (``ecospa eval --seq-len T --batch-size B
--eval-windows N`` with a run's ``seq_len``, ``batch_size`` and ``eval_batches * batch_size``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from tqdm.auto import tqdm

from ecospa.io.data import windows
from ecospa.train.step import evaluate, lm_loss


def nll(forward: Callable, params, cfg, ids, seq_len: int = 512,
        batch_size: int = 4, max_windows: Optional[int] = None, progress: bool = False) -> dict:
    """Mean next-token NLL over the windows: {"nll": mean, "tokens": n, "windows": w}."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = windows(ids, seq_len, max_windows)
    batches = tqdm(win.split(batch_size), desc="eval", unit="batch", disable=not progress, leave=False)
    mean = evaluate(lm_loss(forward, cfg), params, batches)
    return {"nll": mean, "tokens": win[:, 1:].numel(), "windows": win.shape[0]}


def perplexity(forward: Callable, params, cfg, ids, seq_len: int = 512,
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


__all__ = ["perplexity", "nll"]
