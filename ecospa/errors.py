"""The exceptions ecospa raises on purpose, and the argparse types every command shares.

``UsageError`` means the user asked for something invalid (a flag, a path, a target): the CLI
prints one line and exits with code 2 before any expensive work. Every other error the CLI
catches (``ValueError``, ``OSError``, ``RuntimeError``, ...) is a failure: one line, exit code 1.
``ecospa --debug ...`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import math
import numbers

import torch


class UsageError(ValueError):
    """Invalid input from the user (flags, paths, targets); the CLI exits with code 2."""


def whole(x) -> bool:
    """A whole number (an ``int`` that is not a ``bool``): what counts, sizes and steps must be."""
    return isinstance(x, int) and not isinstance(x, bool)


def _number(text: str, kind, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _number(text, int, "a whole number >= 1")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _number(text, int, "a whole number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (learning rates, epsilons)."""
    value = _number(text, float, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def check_fraction(value, what: str, *, zero: bool = True) -> float:
    """The one fraction check (targets, budgets, sparsities, flags): ``value`` must be a real
    number, not a bool or a string, in [0, 1), or in (0, 1) with ``zero=False``; NaN never is.

    Returns ``float(value)``; otherwise a ValueError naming ``what``:
    ``check_fraction(1.5, "sparsity")`` -> "sparsity must be a number in [0, 1), got 1.5".
    """
    inside = isinstance(value, numbers.Real) and not isinstance(value, bool) and (
        0.0 <= value < 1.0 if zero else 0.0 < value < 1.0)
    if not inside:
        raise ValueError(f"{what} must be a number in {'[0, 1)' if zero else '(0, 1)'}, got {value!r}")
    return float(value)


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1) (``check_fraction``)."""
    value = _number(text, float, "a fraction in [0, 1)")
    try:
        return check_fraction(value, "the value")
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text!r}") from None


def device(text: str) -> str:
    """argparse type: a torch device this build of torch can use ('cpu', 'cuda', 'cuda:1', 'mps')."""
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(
                f"device {text!r}: this torch build has no usable CUDA "
                f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"device {text!r}: MPS is not available here; use --device cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"device {text!r} is not supported; use cpu, cuda, cuda:N or mps")
    return text


__all__ = ["UsageError", "whole", "check_fraction", "positive_int", "nonneg_int", "positive_float", "fraction", "device"]
