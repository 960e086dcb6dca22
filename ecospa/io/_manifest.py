"""The checkpoint manifest (``manifest.json``): its format versions, its own checksum and the
checks that turn any damaged, edited or foreign manifest into one clear ValueError.

``ecospa.io.checkpoint`` writes and reads checkpoints; this module only judges manifests (no
tensor is read here), so the rules a manifest must follow sit in one place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from pathlib import Path

import torch

from ecospa.func.families import FAMILIES

FORMAT = 2            # 2: the manifest carries the sha256 of its own content
READABLE = (1, 2)     # format 1 (no manifest checksum) is still read
MAX_MANIFEST_BYTES = 64 << 20
TREES = ("model", "optim", "state")
DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.uint8, torch.bool)}


def manifest_sha256(manifest: dict) -> str:
    """sha256 of the manifest's content without its own checksum (canonical JSON)."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError, RecursionError) as err:
        raise ValueError(f"manifest content cannot be checksummed ({err})") from err
    return hashlib.sha256(text.encode()).hexdigest()


def bad(root: Path, what: str) -> ValueError:
    """The one error for a manifest that breaks the rules (raise it)."""
    return ValueError(f"{root}/manifest.json is not a valid ecospa manifest: {what}; "
                      "restore it or use an earlier checkpoint")


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_spec(root: Path, spec, keys, depth: int = 0) -> None:
    """A tree structure from the manifest: exactly one of tensor / dict / tuple / value."""
    if depth > 64:
        raise bad(root, "a tree is nested more than 64 levels deep")
    if not isinstance(spec, dict) or len(spec) != 1:
        raise bad(root, f"a tree node is {type(spec).__name__} {str(spec)[:40]!r}, expected one of "
                         "{'tensor': key}, {'dict': {...}}, {'tuple': [...]}, {'value': x}")
    (kind, v), = spec.items()
    if kind == "tensor":
        if not isinstance(v, str) or v not in keys:
            raise bad(root, f"a tree refers to tensor {str(v)[:40]!r}, which the tensor list lacks")
    elif kind == "dict":
        if not isinstance(v, dict):
            raise bad(root, "a 'dict' node is not an object")
        for child in v.values():
            _check_spec(root, child, keys, depth + 1)
    elif kind == "tuple":
        if not isinstance(v, list):
            raise bad(root, "a 'tuple' node is not a list")
        for child in v:
            _check_spec(root, child, keys, depth + 1)
    elif kind != "value" or not (v is None or isinstance(v, (bool, int, float, str))):
        raise bad(root, f"unknown tree node {str(spec)[:40]!r}")


def _check_config(root: Path, family: str, fields) -> None:
    cls = FAMILIES[family].Config
    if not isinstance(fields, dict):
        raise bad(root, f"'config' is {type(fields).__name__}, expected an object")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise bad(root, f"config has fields {unknown[:5]} that {family}.Config does not know")
    for k, v in fields.items():
        hint = hints.get(k)
        allowed = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)
        if v is None and type(None) in allowed:
            continue
        ok = ((int in allowed and _is_int(v)) or (float in allowed and isinstance(v, (int, float))
              and not isinstance(v, bool)) or (bool in allowed and isinstance(v, bool))
              or (str in allowed and isinstance(v, str))
              or (tuple in allowed and isinstance(v, list)))  # e.g. rope_scaling pairs: the Config checks them
        if not ok:
            names = "/".join(getattr(a, "__name__", str(a)) for a in allowed)
            raise bad(root, f"config field {k!r} is {v!r}, expected {names}")
    if fields.get("name", family) != family:
        raise bad(root, f"config name {fields['name']!r} disagrees with family {family!r}")


def read_manifest(root: Path) -> dict:
    """The manifest at ``root``, checked: format, own checksum (format >= 2), structure."""
    file = root / "manifest.json"
    try:
        size = file.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise bad(root, f"{size} bytes, more than any manifest needs ({MAX_MANIFEST_BYTES})")
        manifest = json.loads(file.read_bytes())
    except FileNotFoundError as err:
        raise ValueError(f"{root}: manifest.json is missing; not an ecospa checkpoint") from err
    except (ValueError, RecursionError) as err:  # JSONDecodeError, bad UTF-8, absurd nesting
        if isinstance(err, ValueError) and str(err).startswith(str(root)):
            raise
        raise ValueError(f"{root}/manifest.json is truncated or corrupt ({str(err)[:200]})") from err
    if not isinstance(manifest, dict):
        raise bad(root, f"it holds a {type(manifest).__name__}, not an object")
    fmt = manifest.get("format")
    if not _is_int(fmt):
        raise bad(root, f"no format version (format: {str(fmt)[:20]!r})")
    if fmt not in READABLE:
        if fmt > FORMAT:
            raise ValueError(f"{root}: checkpoint format {fmt} was written by a newer ecospa; this "
                             f"version reads formats {READABLE[0]}-{READABLE[-1]}: upgrade ecospa")
        raise bad(root, f"unknown format {fmt}")
    missing = [k for k in ("family", "config", "trees", "tensors", "files") if k not in manifest]
    if missing:
        raise bad(root, f"keys {missing} are missing")
    family = manifest["family"]
    if not isinstance(family, str) or family not in FAMILIES:
        raise ValueError(f"{root}/manifest.json: unknown model family {str(family)[:40]!r}; expected one of "
                         f"{sorted(FAMILIES)}")
    _check_config(root, family, manifest["config"])
    step, extra = manifest.get("step"), manifest.get("extra", {})
    if step is not None and not _is_int(step):
        raise bad(root, f"step is {str(step)[:20]!r}, expected a whole number")
    if not isinstance(extra, dict):
        raise bad(root, f"'extra' is {type(extra).__name__}, expected an object")
    trees, tensors, files = manifest["trees"], manifest["tensors"], manifest["files"]
    for name, v in (("trees", trees), ("tensors", tensors), ("files", files)):
        if not isinstance(v, dict):
            raise bad(root, f"{name!r} is {type(v).__name__}, expected an object")
    if "model" not in trees or not set(trees) <= set(TREES) or set(tensors) != set(trees):
        raise bad(root, f"trees {sorted(trees)[:5]} / tensor lists {sorted(tensors)[:5]}: expected "
                         f"'model' and optionally 'optim', 'state' in both")
    for name in trees:
        entries = tensors[name]
        if not isinstance(entries, dict):
            raise bad(root, f"the tensor list of {name!r} is not an object")
        for k, v in entries.items():
            if not (isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
                    and all(_is_int(n) and n >= 0 for n in v[0]) and isinstance(v[1], str) and v[1] in DTYPES):
                raise bad(root, f"tensor {k[:40]!r} of {name!r}: expected [[sizes...], dtype], "
                                 f"got {str(v)[:60]}")
        _check_spec(root, trees[name], entries)
        want = files.get(f"{name}.safetensors")
        if not (isinstance(want, dict) and _is_int(want.get("bytes")) and want["bytes"] >= 0
                and isinstance(want.get("sha256"), str)):
            raise bad(root, f"no size and checksum for {name}.safetensors")
    return manifest


def verify_own_checksum(root: Path, manifest: dict) -> None:
    """Format >= 2: the manifest's content matches the checksum it was written with. (Checked
    after the more specific checks, so a damaged file is named as such.)"""
    if manifest["format"] >= 2 and manifest.get("manifest_sha256") != manifest_sha256(manifest):
        raise ValueError(f"{root}/manifest.json was edited or is corrupt: its checksum does not "
                         "match its content; restore it or use an earlier checkpoint")


__all__ = ["FORMAT", "READABLE", "MAX_MANIFEST_BYTES", "TREES", "DTYPES", "bad", "manifest_sha256",
           "read_manifest", "verify_own_checksum"]
