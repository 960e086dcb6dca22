"""The ``ecospa`` command line: ``ecospa train``, ``compress``, ``eval``, ``generate``, ``export``.

Each subcommand lives in its own module here (``ecospa.cli.train``, ``.compress``, ``.eval``,
``.generate``, ``.export``), which provides ``add_arguments(parser)`` and ``run(args) -> int``
over the library in ``ecospa.train`` / ``ecospa.jobs``; this file only dispatches and turns
errors into one line each (the options several commands share, and the help formatter that
shows every default, are in ``ecospa.cli._options``):

- exit 2: bad arguments (argparse, or ``ecospa.errors.UsageError`` found while validating);
- exit 1: a failure while working (corrupt checkpoint, diverged loss, disk full, ...);
- exit 130: interrupted (Ctrl-C), at any moment: while the command works (``KeyboardInterrupt``
  reaches ``boundary``) and, for the entry points, while they start up and import torch
  (``ecospa._interrupt``, armed by ``import ecospa`` before anything heavy).

``ecospa --debug COMMAND ...`` (or ``ECOSPA_DEBUG=1``) re-raises with the full traceback.
``boundary`` is the one place that does this; ``python -m ecospa.cli.harness`` goes through it too.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from typing import Callable

from ecospa import _interrupt
from ecospa.errors import UsageError

COMMANDS = {
    "train": ("ecospa.cli.train", "sparse pre-training from scratch (default: tiny CPU demo)"),
    "compress": ("ecospa.cli.compress", "compress a pretrained checkpoint: calibrate, prune, recover, save"),
    "eval": ("ecospa.cli.eval", "perplexity of a checkpoint on a text source"),
    "generate": ("ecospa.cli.generate", "continue a prompt with a model (greedy or sampled, KV cache)"),
    "export": ("ecospa.cli.export", "write a (pruned) model for transformers (padded) or llama.cpp (gguf)"),
}

# The errors a command may end with on bad input or a failing environment; anything else is a
# bug in ecospa and keeps its traceback.
EXPECTED = (ValueError, OSError, RuntimeError, ImportError, KeyError, MemoryError)


def message(err: BaseException) -> str:
    """One line that says what went wrong (OSError: the operation's target and the reason)."""
    if isinstance(err, OSError) and err.strerror:
        where = f" {err.filename!r}" if err.filename else ""
        hint = {errno.ENOSPC: " (disk full: free space and run again; the previous checkpoint is kept)",
                errno.EROFS: " (read-only file system: choose a writable --out)",
                errno.ENAMETOOLONG: " (path too long: choose a shorter --out)",
                errno.EACCES: " (permission denied: choose a writable location)"}.get(err.errno, "")
        text = f"{err.strerror}{where}{hint}"
    elif isinstance(err, ModuleNotFoundError) and err.name:
        text = (f"{err} (an optional dependency is missing: install the extra that provides it, "
                "e.g. pip install 'ecospa[hf]')")
    elif isinstance(err, KeyError):
        text = f"missing key {err}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: 'ecospa train: error: ... (see ecospa train --help)'."""

    def error(self, text):
        self.exit(2, f"{self.prog}: error: {' '.join(text.split())} (see {self.prog} --help)\n")


def build_parser() -> tuple[argparse.ArgumentParser, dict]:
    from ecospa.cli._options import HelpFormatter
    parser = Parser(prog="ecospa", description="Coupled structured sparsity for transformers: "
                    f"{', '.join(COMMANDS)}. `ecospa COMMAND --help` shows each command's options.")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        modules[name] = importlib.import_module(mod)
        modules[name].add_arguments(sub.add_parser(name, help=help_, description=help_,
                                                   formatter_class=HelpFormatter))
    return parser, modules


def debugging(argv: list) -> bool:
    """``--debug`` anywhere on the line (removed from ``argv``) or ``ECOSPA_DEBUG=1``."""
    debug = os.environ.get("ECOSPA_DEBUG", "") not in ("", "0")
    if "--debug" in argv:  # accepted anywhere on the line, not only before the command
        argv.remove("--debug")
        debug = True
    return debug


def boundary(prog: str, work: Callable[[], int], debug: bool = False) -> int:
    """THE error boundary: run ``work()`` and turn what it raises into one line on stderr and an
    exit code (2: UsageError, 1: another expected error, 130: Ctrl-C); ``debug`` re-raises.
    Ctrl-C raises KeyboardInterrupt here: ``work`` calls ``_interrupt.release()`` once its
    imports are done (before that, the guard has already exited with 130)."""
    try:
        return int(work() or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except EXPECTED as err:
        if debug:
            raise
        if isinstance(err, UsageError):
            print(f"{prog}: error: {message(err)}", file=sys.stderr)
            return 2
        print(f"{prog}: error: {message(err)} [--debug shows the traceback]", file=sys.stderr)
        return 1


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    parser, modules = build_parser()  # imports every subcommand (torch): still under the guard
    args = parser.parse_args(argv)

    def work() -> int:
        _interrupt.release()  # from here on Ctrl-C is a KeyboardInterrupt for the boundary
        return modules[args.command].run(args)

    return boundary(f"ecospa {args.command}", work, debug)


if __name__ == "__main__":
    sys.exit(main())
