"""Checkpoints: a directory with safetensors files and a JSON manifest, written atomically.

    path/manifest.json       family, config, step, extra, tree structures, tensor shapes/dtypes,
                             byte size and sha256 of every file
    path/model.safetensors   params, keys are leaf paths ("layers.0.wq")
    path/optim.safetensors   AdamW moments ("mu.layers.0.wq", "nu.layers.0.wq"), if given
    path/state.safetensors   any other tensor tree (e.g. the importance state), if given

The tree structure (dicts, tuples of layers) is stored in the manifest, so a pruned tree whose
layers have different widths comes back exactly. Saving writes a sibling temporary directory and
swaps it in with renames: a failure while writing leaves the previous checkpoint untouched.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from ecospa._types import Params, TensorTree
from ecospa.func import gpt2, llama
from ecospa.optim import AdamWState

FAMILIES = {"llama": llama.Config, "gpt2": gpt2.Config}
FORMAT = 1
_DTYPES = {str(d): d for d in (torch.float64, torch.float32, torch.float16, torch.bfloat16,
                               torch.int64, torch.int32, torch.uint8, torch.bool)}


class Checkpoint(NamedTuple):
    params: Params
    cfg: Any                       # llama.Config or gpt2.Config
    extra: dict                    # the caller's JSON metadata
    opt_state: Optional[AdamWState]
    state: Optional[TensorTree]    # the extra tensor tree given to save(state=...)
    step: Optional[int]


def _encode(tree, prefix: str, out: dict):
    """JSON structure of ``tree``; its tensors go to ``out`` under dotted path keys."""
    if torch.is_tensor(tree):
        if prefix in out:
            raise ValueError(f"two leaves map to the key {prefix!r}; dict keys may not contain '.'")
        out[prefix] = tree.detach().contiguous()
        return {"tensor": prefix}
    join = (lambda k: f"{prefix}.{k}" if prefix else str(k))  # noqa: E731
    if isinstance(tree, dict):
        if not all(isinstance(k, str) for k in tree):
            raise ValueError(f"{prefix or 'tree'}: only string dict keys can be saved")
        return {"dict": {k: _encode(v, join(k), out) for k, v in tree.items()}}
    if isinstance(tree, (tuple, list)):
        return {"tuple": [_encode(v, join(i), out) for i, v in enumerate(tree)]}
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return {"value": tree}
    raise ValueError(f"{prefix or 'tree'}: cannot save a {type(tree).__name__} "
                     "(trees hold dicts, tuples, tensors and plain numbers)")


def _decode(spec, tensors: dict):
    if "tensor" in spec:
        return tensors[spec["tensor"]]
    if "dict" in spec:
        return {k: _decode(v, tensors) for k, v in spec["dict"].items()}
    if "tuple" in spec:
        return tuple(_decode(v, tensors) for v in spec["tuple"])
    return spec["value"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_tensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file
    save_file(tensors, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save(path, params: Params, cfg, *, opt_state: Optional[AdamWState] = None,
         extra: Optional[dict] = None, state: Optional[TensorTree] = None,
         step: Optional[int] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Args:
      params: the (possibly pruned) parameter tree.
      cfg: the model's config dataclass; ``cfg.name`` ("llama"/"gpt2") names the family.
      opt_state: AdamW state whose moments are saved next to the params.
      extra: JSON-serializable metadata returned by ``load``.
      state: any other tree of tensors and numbers (e.g. an importance estimator's state).
      step: the training step, stored in the manifest.
    Example: ``save("runs/x/checkpoint", params, cfg, opt_state=state, step=100)``
    """
    family = getattr(cfg, "name", None)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    trees = {"model": params}
    if opt_state is not None:
        trees["optim"] = opt_state._asdict()
    if state is not None:
        trees["state"] = state
    manifest = {"format": FORMAT, "family": family, "config": dataclasses.asdict(cfg), "step": step,
                "extra": extra or {}, "trees": {}, "tensors": {}, "files": {}}
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        for name, tree in trees.items():
            tensors: dict = {}
            manifest["trees"][name] = _encode(tree, "", tensors)
            manifest["tensors"][name] = {k: [list(v.shape), str(v.dtype)] for k, v in tensors.items()}
            file = tmp / f"{name}.safetensors"
            _write_tensors(file, {k: v.cpu() for k, v in tensors.items()})
            manifest["files"][file.name] = {"bytes": file.stat().st_size, "sha256": _sha256(file)}
        try:
            text = json.dumps(manifest, indent=1)
        except TypeError as err:
            raise ValueError(f"extra metadata must be JSON-serializable: {err}") from err
        with open(tmp / "manifest.json", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def _swap_in(tmp: Path, path: Path) -> None:
    """Replace ``path`` by ``tmp``. A crash between the two renames leaves the old checkpoint as
    ``.NAME.old-*``, which ``load`` falls back to."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if not (path / "manifest.json").is_file():
        raise ValueError(f"{path} exists and is not an ecospa checkpoint; refusing to replace it")
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _resolve(path: Path) -> Path:
    if path.is_dir():
        return path
    olds = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
    if len(olds) == 1 and (olds[0] / "manifest.json").is_file():
        return olds[0]  # a save was interrupted between its two renames
    raise FileNotFoundError(f"{path}: no checkpoint directory here")


def _read_tree(root: Path, manifest: dict, name: str):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    file = root / f"{name}.safetensors"
    want = manifest["files"].get(file.name)
    if want is None or not file.is_file():
        raise ValueError(f"{root}: {file.name} is missing (the manifest lists {sorted(manifest['files'])})")
    size = file.stat().st_size
    if size != want["bytes"] or _sha256(file) != want["sha256"]:
        raise ValueError(f"{file}: truncated or corrupt ({size} bytes, manifest says {want['bytes']} "
                         "with another checksum); restore it or use an earlier checkpoint")
    try:
        tensors = load_file(str(file))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{file}: not a readable safetensors file ({err})") from err
    expected = manifest["tensors"][name]
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))[:5]
        raise ValueError(f"{file}: tensors disagree with the manifest (differing keys {diff})")
    for k, (shape, dtype) in expected.items():
        if list(tensors[k].shape) != shape or str(tensors[k].dtype) != dtype:
            raise ValueError(f"{file}: tensor {k!r} is {tuple(tensors[k].shape)} {tensors[k].dtype}, "
                             f"the manifest says {tuple(shape)} {dtype}")
    return _decode(manifest["trees"][name], tensors)


def load_full(path) -> Checkpoint:
    """Everything ``save`` wrote: params, config, extra, optimizer state, state tree and step."""
    root = _resolve(Path(path))
    try:
        manifest = json.loads((root / "manifest.json").read_text())
        family, fields = manifest["family"], manifest["config"]
        manifest["trees"], manifest["tensors"], manifest["files"]  # noqa: B018  (must exist)
    except FileNotFoundError as err:
        raise ValueError(f"{root}: manifest.json is missing; not an ecospa checkpoint") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{root}/manifest.json is truncated or corrupt ({err})") from err
    if family not in FAMILIES:
        raise ValueError(f"{root}: unknown model family {family!r}; expected one of {sorted(FAMILIES)}")
    try:
        cfg = FAMILIES[family](**fields)
    except TypeError as err:
        raise ValueError(f"{root}: config does not fit {family}.Config ({err})") from err
    params = _read_tree(root, manifest, "model")
    opt = None
    if "optim" in manifest["trees"]:
        opt = AdamWState(**_read_tree(root, manifest, "optim"))
    state = _read_tree(root, manifest, "state") if "state" in manifest["trees"] else None
    return Checkpoint(params, cfg, manifest["extra"], opt, state, manifest.get("step"))


def load(path):
    """``(params, cfg, extra)`` from a checkpoint directory; ValueError if it is corrupt.

    Example: ``params, cfg, extra = load("runs/train/checkpoint")``
    """
    ck = load_full(path)
    return ck.params, ck.cfg, ck.extra


__all__ = ["Checkpoint", "FAMILIES", "save", "load", "load_full"]
