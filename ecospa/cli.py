"""The ``ecospa`` command line: ``ecospa train``, ``ecospa compress``, ``ecospa eval``.

Each subcommand lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only dispatches.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "train": ("ecospa.train_cli", "sparse pre-training from scratch (default: tiny CPU demo)"),
    "compress": ("ecospa.compress", "compress a pretrained checkpoint: calibrate, prune, recover, save"),
    "eval": ("ecospa.evaluate", "perplexity of a checkpoint on a text source"),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="ecospa", description="Coupled structured sparsity for transformers: train, compress, eval.")
    sub = parser.add_subparsers(dest="command", required=True)
    modules = {}
    for name, (mod, help_) in COMMANDS.items():
        try:
            modules[name] = importlib.import_module(mod)
        except ModuleNotFoundError as err:
            if err.name != mod:
                raise
            continue  # not built yet
        modules[name].add_arguments(sub.add_parser(name, help=help_, description=help_))
    args = parser.parse_args(argv)
    try:
        return int(modules[args.command].run(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"ecospa {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
