"""Held-out perplexity: ``exp(mean next-token NLL)`` over ``ecospa.io.data.windows``.

The loss is ``ecospa.train.step.lm_loss`` and the mean is ``ecospa.train.step.evaluate``, the same
two functions ``ecospa train`` reports its validation perplexity with, so ``ecospa train`` and
``ecospa eval`` agree on the same params and windows (``ecospa eval --seq-len T --batch-size B
--eval-windows N`` with a run's ``seq_len``, ``batch_size`` and ``eval_batches * batch_size``).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

from ecospa import _progress
from ecospa.io.data import windows
from ecospa.train.step import evaluate, lm_loss

# ``ecospa eval``'s defaults for a model that records no training run (a GGUF, an HF directory,
# a compressed checkpoint): the window is capped at the model's context (``max_seq_len``).
SEQ_LEN, BATCH_SIZE, MAX_WINDOWS, DATA = 512, 4, 40, ("pydoc", "stdlib")


def eval_defaults(cfg, trained: Optional[dict]) -> dict:
    """The evaluation a model is scored with when the command line says nothing: a training
    run's own (its ``seq_len``, ``batch_size``, ``eval_batches * batch_size`` windows and data
    first, so ``ecospa eval`` repeats the run's validation perplexity), else 512-token windows
    capped at the model's ``max_seq_len``.

    Args:
      cfg: the model's config (``max_seq_len`` is read when it has one).
      trained: the ``TrainConfig`` (as JSON) of a checkpoint written by ``ecospa train``, or None.
    Returns:
      dict seq_len, batch_size, max_windows, data (a list of sources), context (the trained or
      maximum sequence length, None if unknown) and trained (bool).
    Example:
      eval_defaults(cfg, {"seq_len": 128, "batch_size": 16, "eval_batches": 8, "data": "pydoc"})
      # -> seq_len 128, batch_size 16, max_windows 128, data ["pydoc", "stdlib"]
    """
    ctx = getattr(cfg, "max_seq_len", None)
    if trained:
        data = [trained["data"]] + [d for d in DATA if d != trained["data"]]
        return dict(seq_len=trained["seq_len"], batch_size=trained["batch_size"],
                    max_windows=trained["eval_batches"] * trained["batch_size"], data=data,
                    context=trained["seq_len"], trained=True)
    return dict(seq_len=min(SEQ_LEN, ctx) if ctx else SEQ_LEN, batch_size=BATCH_SIZE,
                max_windows=MAX_WINDOWS, data=list(DATA), context=ctx, trained=False)


def window_warning(seq_len: int, defaults: dict) -> Optional[str]:
    """One line when ``seq_len`` is longer than the context the model was trained on (or can
    take); None otherwise."""
    ctx = defaults["context"]
    if ctx is None or seq_len <= ctx:
        return None
    what = (f"the {ctx} tokens the model was trained on (its run's seq_len)" if defaults["trained"]
            else f"the model's context (max_seq_len {ctx})")
    return (f"warning: --seq-len {seq_len} is longer than {what}: positions past it were never "
            f"trained, so the perplexity is higher than the run's; leave --seq-len out (or give "
            f"{ctx}) to compare with training")


def nll(forward: Callable, params, cfg, ids, seq_len: int = 512,
        batch_size: int = 4, max_windows: Optional[int] = None, progress: bool = False,
        loss_fn: Optional[Callable] = None) -> dict:
    """Mean next-token NLL over the windows: {"nll": mean, "tokens": n, "windows": w}.
    ``loss_fn(params, batch)``: the mean NLL of a batch computed another way (e.g.
    ``ecospa.func.layerwise.chunked_loss``, a few tokens' logits at a time); None:
    ``lm_loss(forward, cfg)``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    win = windows(ids, seq_len, max_windows)
    batches = win.split(batch_size)
    bar = _progress.bar(len(batches), "eval", "batch", enabled=None if progress else False)
    mean = evaluate(loss_fn or lm_loss(forward, cfg), params, _ticking(batches, bar))
    bar.close()
    return {"nll": mean, "tokens": win[:, 1:].numel(), "windows": win.shape[0]}


def _ticking(items, bar):
    """``items``, one ``bar.update()`` after each."""
    for x in items:
        yield x
        bar.update(1)


def perplexity(forward: Callable, params, cfg, ids, seq_len: int = 512,
               batch_size: int = 4, max_windows: Optional[int] = None,
               progress: bool = False, loss_fn: Optional[Callable] = None) -> float:
    """Perplexity of ``forward(params, tokens, cfg)`` on ``ids`` (1-D int64), pure.

    Args:
      forward: a pure forward, e.g. ``llama.forward``.
      params, cfg: the model.
      ids: the token stream.
      seq_len: predictions per window (windows are non-overlapping).
      batch_size: windows per forward call.
      max_windows: use only the first this many windows (None: all).
      progress: show progress (``ecospa._progress.bar``: a tqdm bar on a terminal, else lines).
      loss_fn: the batch's mean NLL computed another way (see ``nll``); None: ``lm_loss``.
    Returns:
      exp(mean NLL) as a float.
    Example:
      ppl = perplexity(llama.forward, params, cfg, ids, seq_len=512, max_windows=40)
    """
    return math.exp(nll(forward, params, cfg, ids, seq_len, batch_size, max_windows, progress,
                        loss_fn)["nll"])


__all__ = ["perplexity", "nll", "eval_defaults", "window_warning"]
