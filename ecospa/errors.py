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


SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def seed_int(text: str) -> int:
    """argparse type: a random seed, an integer in [0, 2**63 - 1]."""
    what = f"a whole number in [0, 2**63 - 1] ({SEED_MAX})"
    value = _number(text, int, what)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def utf8_text(text: str) -> str:
    """argparse type: text that is valid UTF-8. Python turns the undecodable bytes of a command
    line into lone surrogates (surrogateescape); they are named here instead of failing later in
    a tokenizer: ``b'ab\\xffcd'`` -> "not valid UTF-8: byte 0xff at character 2"."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        chars = text[err.start:err.end]
        if all(0xDC80 <= ord(c) <= 0xDCFF for c in chars):  # bytes that were not UTF-8
            bad = chars.encode("utf-8", "surrogateescape")
            shown = f"{'byte' if len(bad) == 1 else 'bytes'} {' '.join(f'0x{b:02x}' for b in bad[:8])}"
        else:  # a lone surrogate that came from elsewhere
            shown = f"the lone surrogate {chars[:8]!r}"
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {shown} at character {err.start}; "
                                         "give the text in UTF-8 (e.g. iconv -t UTF-8)") from None
    return text


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


__all__ = ["UsageError", "whole", "check_fraction", "positive_int", "nonneg_int", "positive_float", "fraction",
           "device", "SEED_MAX", "seed_int", "utf8_text"]
