"""File helpers every writer shares: checksums and atomic replacement of one file."""
from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path
from typing import Union

from ecospa.errors import UsageError


def sha256_file(path) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fsync_file(path) -> None:
    """Flush a written file's bytes to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path, data: Union[str, bytes]) -> None:
    """Replace ``path`` by ``data`` atomically: a temporary sibling, fsynced, renamed over it
    (a reader sees the old content or the new one, never a part)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb" if isinstance(data, bytes) else "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def check_output_path(raw: str, flag: str, link_note: str = "") -> str:
    """The absolute path of an output ``raw`` (given as ``flag``); UsageError, nothing touched,
    for a name longer than 255 bytes, a symbolic link, or a path under a file."""
    path = os.path.abspath(raw)
    for part in path.split(os.sep):
        if len(part.encode("utf-8", "surrogateescape")) > 255:
            raise UsageError(f"{flag} {raw!r}: the name {part[:20]}... is longer than 255 bytes; "
                             "choose a shorter path")
    if os.path.islink(raw) or os.path.islink(path):
        raise UsageError(f"{flag} {raw!r} is a symbolic link; give the real directory path{link_note}")
    probe = os.path.dirname(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise UsageError(f"{flag} {raw!r} is under {probe!r}, which is a file, not a directory")
    return path


__all__ = ["sha256_file", "fsync_file", "atomic_write", "check_output_path"]
