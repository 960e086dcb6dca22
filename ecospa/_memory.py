"""Give the allocator's free memory back to the operating system (glibc ``malloc_trim``).

Why: on Linux, torch's CPU tensors come from glibc's ``malloc``. A tensor under the allocator's
mmap threshold (which grows to 32 MB as large tensors are freed) lives in the heap, and the
heap only shrinks from its top. A training step that keeps a few small tensors (one boundary
activation per layer) among many freed temporaries leaves most of the freed memory resident: a
layer-wise recovery step on SmolLM2-135M in a plain Python process peaked at 2723 MiB, 2509 MiB
with these trims. ``malloc_trim(0)`` returns every free page of the heap (``madvise``), in about
0.05 s for that heap, so calling it a few times per step costs nothing measurable. A fixed low
mmap threshold (``ecospa.jobs.phases.return_freed_memory``, which the ``compress`` CLI sets) does
the same for every tensor above it, at the cost of page faults on each allocation (a 1 MB
threshold made that step 25-30% slower); under it the trims change nothing measurable.

Elsewhere (macOS, musl, Windows) ``trim()`` does nothing. ``ECOSPA_MALLOC_TRIM=0`` turns it off.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable, Optional

_TRIM: Optional[Callable[[int], int]] = None
_LOOKED = False


def _malloc_trim() -> Optional[Callable[[int], int]]:
    global _TRIM, _LOOKED
    if not _LOOKED:
        _LOOKED = True
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            fn = libc.malloc_trim
        except (OSError, AttributeError, TypeError):  # not glibc: nothing to call
            fn = None
        if fn is not None:
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        _TRIM = fn
    return _TRIM


def enabled() -> bool:
    """Whether ``trim()`` calls ``malloc_trim`` (glibc, and ``ECOSPA_MALLOC_TRIM`` not ``0``)."""
    return os.environ.get("ECOSPA_MALLOC_TRIM", "1") != "0" and _malloc_trim() is not None


def trim() -> bool:
    """Return the heap's free pages to the OS; True when ``malloc_trim`` ran. Changes no value."""
    if not enabled():
        return False
    _malloc_trim()(0)
    return True


__all__ = ["enabled", "trim"]
