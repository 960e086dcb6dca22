"""A training run's directory: what a run owns in ``--out`` and how it is replaced or resumed.

    OUT/checkpoint       the latest checkpoint (``ecospa.io.checkpoint``, atomic)
    OUT/metrics.jsonl    one JSON record per line, appended; trimmed to the checkpoint on resume
    OUT/summary.json     written at the end (atomic)
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

from ecospa.errors import UsageError, whole
from ecospa.io.files import atomic_write

# The files a run writes into ``out`` (besides leftovers of interrupted writes).
RUN_FILES = ("checkpoint", "metrics.jsonl", "summary.json")


def append_line(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def check_out(out: Path) -> None:
    """``out`` must be (or become) a writable directory: not a file, not under a file."""
    try:
        for p in (out, *out.parents):
            if p.exists():
                if not p.is_dir():
                    raise UsageError(f"--out {out}: {p} is a file, not a directory; choose another --out")
                if not os.access(p, os.W_OK | os.X_OK):
                    raise UsageError(f"--out {out}: {p} is not writable; choose another --out")
                return
    except OSError as err:  # a name too long, a loop of symlinks, ...
        shown = str(out) if len(str(out)) < 200 else str(out)[:80] + "..." + str(out)[-40:]
        raise UsageError(f"--out {shown}: {err.strerror or err}; choose another --out") from err


def run_files(out: Path) -> list:
    """What a previous run left in ``out``: our files and the leftovers of interrupted writes."""
    if not out.is_dir():
        return []
    found = [out / n for n in RUN_FILES if (out / n).exists() or (out / n).is_symlink()]
    leftovers = [p for n in RUN_FILES for p in out.glob(f".{n}.*-*")
                 if any(f".{n}.{k}-" in p.name for k in ("old", "tmp", "trash"))]
    return found + sorted(leftovers)


def check_fresh(out: Path, overwrite: bool) -> list:
    """A new run needs a directory without another run's files; ``overwrite`` allows replacing
    them (only ours: a foreign ``checkpoint`` is refused). Returns what is to be replaced."""
    found = run_files(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:4]) + (", ..." if len(found) > 4 else "")
        raise UsageError(f"{out} already holds a training run ({names}); use --resume to continue "
                         "it, --overwrite to replace it, or another --out")
    ck = out / "checkpoint"
    if ck in found and (ck.is_symlink() or not ck.is_dir() or not (ck / "manifest.json").is_file()):
        raise UsageError(f"{ck} is not an ecospa checkpoint; --overwrite replaces only ecospa's own "
                         "files: move it away or choose another --out")
    for name in ("metrics.jsonl", "summary.json"):
        if out / name in found and ((out / name).is_symlink() or not (out / name).is_file()):
            raise UsageError(f"{out / name} is not a file ecospa wrote; move it away or choose "
                             "another --out")
    return found


def remove_run(paths: list) -> None:
    """Delete a previous run's files (from ``run_files``): each is renamed aside first, so a kill
    midway leaves no partial checkpoint that could pass for a complete one; the checkpoint's
    leftovers and the checkpoint go before the metrics and the summary."""
    def base(p: Path) -> str:
        return next(n for n in RUN_FILES if p.name == n or p.name.startswith(f".{n}."))

    order = {"checkpoint": 0, "summary.json": 1, "metrics.jsonl": 2}
    for p in sorted(paths, key=lambda p: (not p.name.startswith("."), order[base(p)])):
        if not (p.exists() or p.is_symlink()):
            continue
        trash = p if ".trash-" in p.name else p.with_name(f".{base(p)}.trash-{uuid.uuid4().hex[:8]}")
        os.replace(p, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash)
        else:
            trash.unlink()


def trim_metrics(path: Path, step: int) -> None:
    """Keep the metric lines of steps up to ``step`` (the checkpoint's), atomically: a resumed
    run writes the later ones again."""
    kept = []
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
            except ValueError:
                continue  # a line cut by a kill
            if not isinstance(r, dict) or not whole(r.get("step")):
                continue
            # a prune event at step s happens before step s trains; a record at s after it
            if r["step"] < step or (r["step"] == step and "event" not in r):
                kept.append(line)
    atomic_write(path, "".join(x + "\n" for x in kept))


def write_json(path: Path, obj) -> None:
    """Write ``obj`` as JSON atomically (``summary.json``)."""
    atomic_write(path, json.dumps(obj, indent=1))


__all__ = ["RUN_FILES", "append_line", "check_fresh", "check_out", "remove_run", "run_files", "trim_metrics",
           "write_json"]
