"""File helpers every writer shares: checksums, atomic replacement of one file, one writer per
output (``exclusive``), failed writes as one clear error (``write_errors``) and the file mode a
new output gets (``publish_mode``)."""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import uuid
from pathlib import Path
from typing import Iterator, Union

from ecospa.errors import UsageError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks (one writer is then the user's care)
    fcntl = None


class WriteFailed(RuntimeError):
    """An output could not be written (disk full, permissions, ...); the message names the path,
    the reason and what was kept. The CLI prints it as one line and exits with code 1."""


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


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path) -> None:
    """Give a file or directory we wrote the mode a plain ``open`` would have (0666/0777 minus
    the umask): temporary files are created 0600, which would make exports private."""
    base = 0o777 if os.path.isdir(path) else 0o666
    os.chmod(path, base & ~_umask())


def lock_path(path) -> str:
    """The advisory lock file of output ``path``: a hidden sibling ``.NAME.lock``."""
    path = os.path.abspath(os.fspath(path)).rstrip(os.sep)
    return os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")


def _holder(lock: str) -> str:
    try:
        with open(lock) as f:
            pid = f.read().strip()
        return f"pid {pid}" if pid.isdigit() else "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def exclusive(path, flag: str = "--out") -> Iterator[None]:
    """Hold the one-writer lock of output ``path`` for the block (``flock`` on ``.NAME.lock``
    beside it, holding our pid). A second writer gets a UsageError naming the holder's pid; the
    lock dies with its process (kill -9 included), so a stale file never blocks anyone."""
    if fcntl is None:
        yield
        return
    lock = lock_path(path)
    made, probe = [], os.path.dirname(lock)
    while not os.path.isdir(probe):  # the parents we create for the lock go again at the end
        made.append(probe)
        probe = os.path.dirname(probe)
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise UsageError(f"{flag} {os.fspath(path)!r} is being written by another ecospa process "
                             f"({_holder(lock)}, lock file {lock}); wait for it to finish or choose "
                             f"another {flag}") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a finishing holder
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for d in made:  # innermost first; only while empty (the writer's output keeps them)
            with contextlib.suppress(OSError):
                os.rmdir(d)


def _reason(err: BaseException) -> str:
    """What went wrong in a write, in words (an OSError's, or the one inside a SafetensorError)."""
    code, text = getattr(err, "errno", None), getattr(err, "strerror", None)
    if not text:
        found = re.search(r'message: "([^"]+)"', str(err))
        text = found.group(1) if found else (str(err) or type(err).__name__)
        number = re.search(r"code: (\d+)", str(err))
        code = int(number.group(1)) if number else code
    if code is None and re.search(r"\d+ requested and \d+ written", text):  # numpy's short write
        return f"{text} (a short write: the disk is probably full)"
    hint = {errno.ENOSPC: "disk full: free space and run again",
            errno.EDQUOT: "disk quota exceeded: free space and run again",
            errno.EFBIG: "file too large for this file system or limit",
            errno.EROFS: "read-only file system: choose a writable location",
            errno.EACCES: "permission denied: choose a writable location"}.get(code)
    return f"{text} ({hint})" if hint else text


@contextlib.contextmanager
def write_errors(target, kept: str) -> Iterator[None]:
    """Turn a failed write in the block (an OSError, or safetensors' SafetensorError, which
    wraps one) into one ``WriteFailed`` that names ``target``, the reason and ``kept`` (what is
    intact, e.g. "the previous export is unchanged")."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as err:
        raise WriteFailed(f"could not write {os.fspath(target)}: {_reason(err)}; {kept}") from err


__all__ = ["sha256_file", "fsync_file", "atomic_write", "check_output_path", "exclusive", "lock_path",
           "publish_mode", "write_errors", "WriteFailed"]
