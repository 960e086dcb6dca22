"""The command line's one vocabulary: what several commands share, named and explained once.

- ``HelpFormatter``: every option's default in ``--help`` ("(default: 40)"); an option whose
  default is None says in its own help what happens without it.
- ``renamed(parser, old, new)``: an old spelling of a renamed option keeps working, hidden from
  ``--help``, and prints one warning line on stderr.
- ``dtype_name``: "float32" and "f32" (likewise float16/f16, bfloat16/bf16, float64/f64) are one
  dtype on every command that takes ``--dtype``; the torch names are the canonical ones.
- ``add_threads`` / ``add_device``: the same ``--threads`` and ``--device`` on every command that
  computes; ``MODEL_HELP``: what ``--model`` accepts, registry included.
"""
from __future__ import annotations

import argparse
import sys
import textwrap

from ecospa.errors import device, positive_int
from ecospa.io.load import REGISTRY
from ecospa.train import presets


def _shown(value) -> str:
    if isinstance(value, (list, tuple)):
        value = " ".join(map(str, value)) or "none"
    return str(value).replace("%", "%%")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """argparse's help, with "(default: X)" after every option that has a default (not a switch
    that is off, not None: those say in words what happens); epilogs keep their line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or action.required or default is None or default is argparse.SUPPRESS \
                or (action.nargs == 0 and default is False):
            return text
        return f"{text} (default: {_shown(default)})"

    def _split_lines(self, text, width):
        """Wrapped like argparse's, but never inside a hyphenated word (hf-padded, --eval-windows)."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """Accept ``old`` as a deprecated spelling of the option ``new`` (already added): the same
    destination, type and choices, hidden from ``--help``; using it prints
    "PROG: warning: OLD is deprecated; use NEW" on stderr and works as NEW."""
    target = next(a for a in parser._actions if new in a.option_strings)
    if type(target) is not argparse._StoreAction:
        raise TypeError(f"renamed() handles options that take a value; {new} does not")

    class Deprecated(argparse._StoreAction):
        def __call__(self, parser, namespace, values, option_string=None):
            print(f"{parser.prog}: warning: {option_string} is deprecated; use {new}", file=sys.stderr)
            super().__call__(parser, namespace, values, option_string)

    parser.add_argument(old, action=Deprecated, dest=target.dest, type=target.type, choices=target.choices,
                        nargs=target.nargs, metavar=target.metavar or new.lstrip("-").upper().replace("-", "_"),
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


DTYPE_SPELLINGS = {"f32": "float32", "f16": "float16", "bf16": "bfloat16", "f64": "float64",
                   "fp32": "float32", "fp16": "float16", "half": "float16", "float": "float32"}


def dtype_name(text: str) -> str:
    """argparse type: a dtype in torch's spelling ("f32" -> "float32"); pair it with ``choices``."""
    return DTYPE_SPELLINGS.get(text.strip().lower(), text.strip().lower())


def dtype_help(what: str) -> str:
    return f"{what} (short spellings f32, f16, bf16, f64 are accepted too)"


def add_threads(p: argparse.ArgumentParser) -> None:
    """``--threads N``: torch CPU threads."""
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch CPU threads (default: torch's choice, usually one per core)")


def add_device(p: argparse.ArgumentParser, default: str = "cpu", help_default: str = "") -> None:
    """``--device``: cpu, cuda, cuda:N or mps (checked against this torch build)."""
    p.add_argument("--device", type=device, default=default,
                   help="cpu, cuda, cuda:N or mps" + (f" (default: {help_default})" if help_default else ""))


MODEL_HELP = ("a registered name (" + "; ".join(f"{n}: {e.about}" for n, e in REGISTRY.items()) +
              "), a .gguf file, a Hugging Face directory or hub id (org/name), or an ecospa "
              "checkpoint or `ecospa train` run directory")


def preset_default(field: str) -> str:
    """'(default: the --preset's; tiny: 600)' for a train flag the preset sets."""
    value = _preset_values(presets.TINY).get(field)
    return f"(default: the --preset's value; tiny: {_shown(value)})"


def _preset_values(cfg) -> dict:
    s = cfg.prune
    target = f"budget {s.budget:g}" if s.budget is not None else \
        f"sparsity {s.sparsity if s.sparsity is not None else 0.5}"
    return {"model": f"{type(cfg.model).__module__.rsplit('.', 1)[-1]} dim {cfg.model.dim} x {cfg.model.n_layers}",
            "data": f"{cfg.data} ({cfg.tokenizer})", "steps": cfg.steps, "batch_size": cfg.batch_size,
            "seq_len": cfg.seq_len, "lr": f"{cfg.lr:g}", "target": target, "sparsity": target,
            "budget": target, "rounds": s.rounds, "multiple_of": s.multiple_of, "rewarm": s.rewarm,
            "moments": s.moments, "decay_steps": s.decay_steps,
            "distill_steps": s.distill_steps, "distill_weight": s.distill_weight, "carry": s.carry, "estimator": cfg.estimator, "seed": cfg.seed, "device": cfg.device,
            "dtype": cfg.dtype, "eval_every": cfg.eval_every,
            "ckpt_every": "at every evaluation" if cfg.ckpt_every is None else cfg.ckpt_every}


def preset_epilog() -> str:
    """What each ``--preset`` sets (a flag given on the command line overrides it)."""
    cols = ("model", "data", "steps", "batch_size", "seq_len", "lr", "target", "rounds", "device", "dtype")
    values = {name: _preset_values(cfg) for name, cfg in presets.PRESETS.items()}
    rows = [("preset",) + cols] + [(name,) + tuple(str(v[c]) for c in cols) for name, v in values.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols) + 1)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    same = [f"{f.replace('_', '-')} {first}" for f in ("estimator", "moments", "rewarm", "decay_steps", "distill_steps",
                                                          "distill_weight", "carry", "multiple_of", "seed")
            if len({str(v[f]) for v in values.values()}) == 1 for first in [next(iter(values.values()))[f]]]
    return ("what each --preset sets (a flag on the command line overrides it; every preset also sets "
            + ", ".join(same) + "):\n  " + "\n  ".join(lines))


__all__ = ["HelpFormatter", "renamed", "dtype_name", "dtype_help", "DTYPE_SPELLINGS", "add_threads",
           "add_device", "MODEL_HELP", "preset_default", "preset_epilog"]
