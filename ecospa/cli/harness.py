"""``python -m ecospa.cli.harness``: lm-evaluation-harness tasks on an ecospa model (needs the
``eval`` extra; the adapter itself is ``ecospa.jobs.harness.EcospaLM``).

Errors go through the CLI's one boundary (``ecospa.cli.boundary``): one line each, exit code 2
for bad arguments (checked before lm-eval is imported or the model loaded: flags, --out,
--include-path, then the task names against lm-eval's index; a --model that names nothing), 1 for a
failure (lm-eval missing, a model that cannot be loaded), 130 for Ctrl-C; ``--debug`` shows the
traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from ecospa import _interrupt
from ecospa.cli import Parser, boundary, debugging
from ecospa.cli._options import MODEL_HELP, HelpFormatter, add_threads
from ecospa.errors import UsageError, positive_int

PROG = "python -m ecospa.cli.harness"


def _tasks(text: str) -> list:
    """argparse type: comma-separated task names, none empty."""
    names = [t.strip() for t in text.split(",")]
    if not all(names):
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {text!r}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="lm-evaluation-harness tasks on an ecospa model",
               formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tasks", required=True, type=_tasks, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="directory with local task YAMLs (offline tasks; default: "
                   "lm-eval's built-in tasks only)")
    p.add_argument("--limit", type=positive_int, help="examples per task, for a quick look (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="requests per forward call")
    p.add_argument("--max-length", type=positive_int,
                   help="longest context in tokens (default: the model's max_seq_len, at most 2048)")
    p.add_argument("--out", help="write the results JSON here (default: only printed)")
    add_threads(p)
    return p


def check_args(args: argparse.Namespace) -> None:
    """UsageError for a missing --include-path or an --out that cannot be written; nothing is
    imported, loaded or written yet."""
    if args.include_path is not None and not os.path.isdir(args.include_path):
        what = "is a file, not a directory" if os.path.exists(args.include_path) else "does not exist"
        raise UsageError(f"--include-path {args.include_path!r} {what}; give the directory "
                         "that holds the task YAML files")
    if args.out is not None:
        out = os.path.abspath(args.out)
        parent = os.path.dirname(out)
        if os.path.isdir(out):
            raise UsageError(f"--out {args.out!r} is a directory; give a file name for the results JSON")
        if not os.path.isdir(parent):
            raise UsageError(f"--out {args.out!r}: the directory {parent!r} does not exist; "
                             "create it or choose another --out")
        if not os.access(parent, os.W_OK | os.X_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
            raise UsageError(f"--out {args.out!r} cannot be written (permission denied); "
                             "choose a writable location")


def lm_eval_modules():
    """(lm_eval, TaskManager, EcospaLM); ImportError saying how to install lm-eval otherwise."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError as err:  # not ModuleNotFoundError: message() would suggest the hf extra
        raise ImportError(f"lm-eval is needed and cannot be imported ({err}): "
                          "pip install 'ecospa[eval]'") from err
    from ecospa.jobs.harness import EcospaLM
    return lm_eval, TaskManager, EcospaLM


def check_tasks(names: list, manager) -> None:
    """UsageError naming the tasks that lm-eval's index (with --include-path) does not know."""
    unknown = [n for n in names if not manager.match_tasks([n]) and not os.path.isfile(n)]
    if unknown:
        raise UsageError(f"--tasks: lm-eval knows no task {', '.join(map(repr, unknown))}; "
                         "`lm-eval ls tasks` lists the built-in ones, and a local task needs "
                         "--include-path DIR with its YAML file")


def run(args: argparse.Namespace) -> int:
    check_args(args)
    lm_eval, TaskManager, EcospaLM = lm_eval_modules()
    manager = TaskManager(include_path=args.include_path)  # indexes every task: seconds
    check_tasks(args.tasks, manager)
    _interrupt.release()  # from here on Ctrl-C is a KeyboardInterrupt for the boundary
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    lm = EcospaLM(args.model, max_length=args.max_length, batch_size=args.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=args.tasks, limit=args.limit, task_manager=manager)
    print(json.dumps(res["results"], indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res["results"], f, indent=1, default=str)
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debugging(argv)
    args = build_parser().parse_args(argv)
    return boundary(PROG, lambda: run(args), debug)


if __name__ == "__main__":
    sys.exit(main())
