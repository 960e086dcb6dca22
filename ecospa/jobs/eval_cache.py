"""A cache of the DENSE model's held-out perplexities, shared by the compress jobs of one machine.

Every ``ecospa compress`` job scores the dense model it starts from on the same held-out windows
(SmolLM2-135M: about 100 s of a 12-minute job on 2 cores). A sweep over budgets, ridges or steps
repeats that evaluation on the same weights and tokens; this cache keeps its result.

An entry is found only by the SHA-256 of everything the number depends on: every tensor of the
model (path, dtype, shape and bytes), its config, the token ids, the evaluation settings (window
length, batch size, number of windows, chunked or whole logits), the torch version and
``CACHE_VERSION`` (raised whenever the evaluation code changes its numbers). Changed weights or a
changed text can never read a stale number. Hashing costs about 1 s per GB of weights.

Where: ``$ECOSPA_CACHE_DIR``, else ``$XDG_CACHE_HOME/ecospa/eval``, else ``~/.cache/ecospa/eval``;
one small JSON file per entry, written atomically. An unreadable or inconsistent entry is ignored
(one warning line) and recomputed; a cache that cannot be written costs a warning line, never the
job. ``--no-eval-cache`` (``Job(eval_cache=False)``) neither reads nor writes it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Callable, Optional

import optree
import torch
from tqdm.auto import tqdm

from ecospa.io.files import atomic_write

CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where the entries live (see the module's docstring)."""
    if os.environ.get("ECOSPA_CACHE_DIR"):
        return Path(os.environ["ECOSPA_CACHE_DIR"])
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "ecospa" / "eval"


def _update(h, t: torch.Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes to the hash (no copy of a contiguous CPU tensor)."""
    t = t.detach()
    if t.device.type != "cpu" or not t.is_contiguous():
        t = t.to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    n = t.numel() * t.element_size()
    if n:
        h.update(memoryview((ctypes.c_char * n).from_address(t.data_ptr())))


def fingerprint(params, cfg) -> str:
    """SHA-256 of a model: every leaf's path, dtype, shape and bytes, and its config."""
    h = hashlib.sha256()
    paths, leaves, _ = optree.tree_flatten_with_path(params)
    for path, leaf in sorted(zip(paths, leaves), key=lambda pl: repr(pl[0])):
        h.update(repr(path).encode())
        if isinstance(leaf, torch.Tensor):
            _update(h, leaf)
        else:
            h.update(repr(leaf).encode())
    h.update(repr(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg).encode())
    return h.hexdigest()


def entry_key(model: str, ids: torch.Tensor, settings: dict) -> str:
    """SHA-256 of one evaluation: the model's ``fingerprint``, the token ids, the settings, the
    torch version and ``CACHE_VERSION``."""
    h = hashlib.sha256(f"{CACHE_VERSION}|{torch.__version__}|{model}|".encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    _update(h, ids)
    return h.hexdigest()


def _warn(msg: str) -> None:
    tqdm.write(f"warning: {msg}")


def lookup(key: str) -> Optional[float]:
    """The cached perplexity of ``key``, or None (absent, or ignored with a warning when it cannot
    be trusted: not JSON, another key inside, a perplexity that is not a finite number > 0)."""
    path = cache_dir() / f"{key}.json"
    try:
        raw = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        _warn(f"could not read the evaluation cache entry {path} ({err}); evaluating again")
        return None
    try:
        entry = json.loads(raw)
        ppl = entry["ppl"]
        ok = entry["key"] == key and type(ppl) in (int, float) and math.isfinite(ppl) and ppl > 0
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        _warn(f"ignoring the evaluation cache entry {path}: not an entry this version wrote for these "
              f"weights and windows; evaluating again (it is replaced)")
        return None
    return float(ppl)


def store(key: str, ppl: float, about: dict) -> None:
    """Write an entry atomically; a failure (read-only or full disk) is a warning, never an error."""
    path = cache_dir() / f"{key}.json"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps({"key": key, "ppl": ppl, **about}, indent=1, sort_keys=True))
    except OSError as err:
        _warn(f"could not write the evaluation cache entry {path} ({err}); the job goes on "
              f"(--no-eval-cache skips the cache)")


def cached(compute: Callable[[], float], model: Optional[str], ids: torch.Tensor, settings: dict,
           about: dict) -> tuple[float, bool]:
    """``(compute(), False)`` or ``(the cached number, True)``; ``model`` None: no cache at all.

    ``settings`` go into the key; ``about`` only into the entry (for a reader: the source, the model
    name)."""
    if model is None:
        return compute(), False
    key = entry_key(model, ids, settings)
    hit = lookup(key)
    if hit is not None:
        return hit, True
    ppl = compute()
    if math.isfinite(ppl):
        store(key, ppl, dict(about, settings=settings))
    return ppl, False


__all__ = ["cache_dir", "fingerprint", "entry_key", "lookup", "store", "cached", "CACHE_VERSION"]
