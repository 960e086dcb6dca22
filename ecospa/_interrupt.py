"""Ctrl-C while a command starts up: one line and exit code 130, never a traceback.

The CLI's error boundary (``ecospa.cli.boundary``) turns a ``KeyboardInterrupt`` raised while a
command works into "ecospa CMD: interrupted" and exit code 130. Before it is active, the entry
points import torch and friends for one to three seconds; a ``KeyboardInterrupt`` raised inside
those imports would print a traceback, could be swallowed by a library's cleanup ("Exception
ignored in ...") or leave a half-initialised module that later fails with a misleading error.

``guard(prog)`` therefore replaces Python's SIGINT handler by one that writes
"PROG: interrupted" and leaves at once (``os._exit(130)``: nothing has been written yet, so there
is nothing to clean up); ``release()`` puts Python's handler back just before the boundary runs
the command, so that from then on Ctrl-C raises ``KeyboardInterrupt`` and ``finally`` blocks run.

``import ecospa`` calls ``guard_entry_point()`` first of all: it guards only when this interpreter
was started as one of the ENTRY_POINTS (``ecospa ...``, ``python -m ecospa ...``,
``python -m ecospa.cli.harness ...``; read from ``sys.orig_argv``), so a program or notebook that
imports ecospa as a library keeps Python's own Ctrl-C.

Standard library only, and imported before anything heavy: this module must stay cheap.
"""
from __future__ import annotations

import os
import signal
import sys
import threading

# ``python -m MODULE`` (or the console script ``ecospa``) -> the name its messages start with
ENTRY_POINTS = {"ecospa": "ecospa", "ecospa.__main__": "ecospa",
                "ecospa.cli.harness": "python -m ecospa.cli.harness"}
_SCRIPTS = ("ecospa", "ecospa.exe", "ecospa-script.py")  # the console script's file names


def _leave(prog: str):
    line = f"{prog}: interrupted\n".encode("utf-8", "replace")

    def handler(signum, frame):  # pragma: no cover - runs in the interrupted process
        try:
            os.write(2, line)
        finally:
            os._exit(130)

    handler.ecospa_guard = True
    return handler


def _ours(handler) -> bool:
    return getattr(handler, "ecospa_guard", False)


def guard(prog: str = "ecospa") -> bool:
    """From now on Ctrl-C prints "PROG: interrupted" and exits with code 130 at once.

    Only in the main thread, and only over Python's own handler (or an earlier guard): a
    program that installed its own SIGINT handler keeps it. True if the guard is in place."""
    if threading.current_thread() is not threading.main_thread():
        return False
    current = signal.getsignal(signal.SIGINT)
    if current is not signal.default_int_handler and not _ours(current):
        return False
    signal.signal(signal.SIGINT, _leave(prog))
    return True


def release() -> None:
    """Python's own handler again (Ctrl-C raises KeyboardInterrupt), if a guard is in place."""
    if threading.current_thread() is threading.main_thread() and _ours(signal.getsignal(signal.SIGINT)):
        signal.signal(signal.SIGINT, signal.default_int_handler)


def entry_point(argv) -> str | None:
    """The ENTRY_POINTS prog the interpreter command line ``argv`` (``sys.orig_argv``) runs, or
    None: ``['python', '-X', 'utf8', '-m', 'ecospa', 'train']`` -> 'ecospa';
    ``['python', '/venv/bin/ecospa', 'eval']`` -> 'ecospa'; ``['python', '-c', ...]`` -> None."""
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "-" or not arg.startswith("-"):  # the script (stdin: '-')
            return "ecospa" if os.path.basename(arg) in _SCRIPTS else None
        if arg.startswith("--"):  # --check-hash-based-pycs MODE is the one long option with a value
            i += 2 if arg == "--check-hash-based-pycs" else 1
            continue
        for j, letter in enumerate(arg[1:], 1):  # a cluster of short options: -u, -bb, -um, -Xdev
            if letter in "mcXW":
                value = arg[j + 1:] or (args[i + 1] if i + 1 < len(args) else "")
                if letter == "m":
                    return ENTRY_POINTS.get(value)
                if letter == "c":
                    return None
                i += 0 if arg[j + 1:] else 1  # -X/-W took the next argument as its value
                break
        i += 1
    return None


def guard_entry_point() -> bool:
    """``guard`` when this process was started as an ecospa entry point (see ``entry_point``)."""
    prog = entry_point(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return guard(prog) if prog else False


__all__ = ["ENTRY_POINTS", "entry_point", "guard", "guard_entry_point", "release"]
