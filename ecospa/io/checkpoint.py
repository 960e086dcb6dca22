"""Checkpoints: a directory with safetensors files and a JSON manifest, written atomically.

    path/manifest.json       family, config, step, extra, tree structures, tensor shapes/dtypes,
                             byte size and sha256 of every file
    path/model.safetensors   params, keys are leaf paths ("layers.0.wq")
    path/optim.safetensors   AdamW moments ("mu.layers.0.wq", "nu.layers.0.wq"), if given
    path/state.safetensors   any other tensor tree (e.g. the importance state), if given

The tree structure (dicts, tuples of layers) is stored in the manifest, so a pruned tree whose
layers have different widths comes back exactly. Saving writes a sibling temporary directory and
swaps it in with renames: a failure while writing leaves the previous checkpoint untouched.

Format 2 (written now) also stores the sha256 of the manifest's own content
(``manifest_sha256``), so an edited manifest (layer order, head_dim, norm_eps, ...) does not load
silently; format 1 (the same without that checksum) is still read. A save killed between its
two renames leaves the previous checkpoint as ``.NAME.old-*`` (a kill after writing, the new one
as ``.NAME.tmp-*``); ``load`` then takes the newest leftover that is complete (its manifest and
every file's checksum verify), and the next successful save removes the leftovers.

The manifest's format, checksum and validity checks live in ``ecospa.io._manifest``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch
from safetensors import SafetensorError
import safetensors.torch

from ecospa._types import Params, TensorTree
from ecospa.func.families import FAMILIES, family_of
from ecospa.io._manifest import FORMAT, READABLE, bad, manifest_sha256, read_manifest, verify_own_checksum
from ecospa.io.files import fsync_file, sha256_file
from ecospa.optim import AdamWState

_manifest_sha256 = manifest_sha256  # (the name it had here; tests rebuild manifests with it)


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
    return sha256_file(path)


def _write_tensors(path: Path, tensors: dict) -> None:
    safetensors.torch.save_file(tensors, str(path))
    fsync_file(path)


def save(path, params: Params, cfg, *, opt_state: Optional[AdamWState] = None,
         extra: Optional[dict] = None, state: Optional[TensorTree] = None,
         step: Optional[int] = None) -> Path:
    """Write a checkpoint directory at ``path`` atomically (see the module docstring).

    Args:
      params: the (possibly pruned) parameter tree.
      cfg: the model's config dataclass; its family's name (``ecospa.func.families``) is stored.
      opt_state: AdamW state whose moments are saved next to the params.
      extra: JSON-serializable metadata returned by ``load``.
      state: any other tree of tensors and numbers (e.g. an importance estimator's state).
      step: the training step, stored in the manifest.
    Example: ``save("runs/x/checkpoint", params, cfg, opt_state=state, step=100)``
    """
    family = family_of(cfg).name
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
        try:  # the checksum covers the content as it will be read back
            manifest = json.loads(json.dumps(manifest))
        except (TypeError, ValueError) as err:
            raise ValueError(f"extra metadata must be JSON-serializable: {err}") from err
        manifest["manifest_sha256"] = manifest_sha256(manifest)
        text = json.dumps(manifest, indent=1)
        with open(tmp / "manifest.json", "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    for left in _leftovers(path):  # of earlier interrupted saves: this one is complete
        shutil.rmtree(left, ignore_errors=True)
    return path


def _leftovers(path: Path) -> list:
    """``.NAME.old-*`` / ``.NAME.tmp-*`` directories beside ``path`` (interrupted saves)."""
    if not path.parent.is_dir():
        return []
    found = [*path.parent.glob(f".{path.name}.old-*"), *path.parent.glob(f".{path.name}.tmp-*")]
    return sorted(p for p in found if p.is_dir() and not p.is_symlink())


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
    """``path`` itself, or else the newest complete leftover of an interrupted save."""
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{path} is a file, not a checkpoint directory")
    found = []
    for left in _leftovers(path):
        try:
            manifest = read_manifest(left)
            for name in manifest["trees"]:
                _verify_file(left, manifest, name)
            verify_own_checksum(left, manifest)
        except (ValueError, OSError):
            continue  # incomplete (killed while writing or while being removed): skip it
        step = manifest.get("step")
        found.append((step if step is not None else -1, (left / "manifest.json").stat().st_mtime, left))
    if found:
        return max(found)[2]
    extra = (f" (the {len(_leftovers(path))} leftover(s) of interrupted saves beside it are incomplete)"
             if _leftovers(path) else "")
    raise FileNotFoundError(f"{path}: no checkpoint directory here{extra}")


def _verify_file(root: Path, manifest: dict, name: str) -> Path:
    file = root / f"{name}.safetensors"
    want = manifest["files"][file.name]
    if not file.is_file():
        raise ValueError(f"{root}: {file.name} is missing (the manifest lists {sorted(manifest['files'])})")
    size = file.stat().st_size
    if size != want["bytes"] or _sha256(file) != want["sha256"]:
        raise ValueError(f"{file}: truncated or corrupt ({size} bytes, manifest says {want['bytes']} "
                         "with another checksum); restore it or use an earlier checkpoint")
    return file


def _read_tree(root: Path, manifest: dict, name: str):
    file = _verify_file(root, manifest, name)
    try:
        tensors = safetensors.torch.load_file(str(file))
    except (SafetensorError, OSError, RuntimeError, ValueError) as err:
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


def _check_family(root: Path, family: str, params) -> None:
    """The model tree has the leaves of the family the manifest names (its embedding at the top,
    its MLP input in every layer); a hand-edited manifest can claim another family."""
    fam = FAMILIES[family]
    layers = params.get("layers") if isinstance(params, dict) else None
    fits = (isinstance(params, dict) and fam.embed_leaf in params and isinstance(layers, (list, tuple))
            and all(isinstance(layer, dict) and fam.ffn_in in layer for layer in layers))
    if fits:
        return
    top = sorted(params)[:6] if isinstance(params, dict) else type(params).__name__
    other = [n for n, f in FAMILIES.items() if n != family and isinstance(params, dict) and f.embed_leaf in params]
    looks = f", which looks like a {other[0]!r} model" if other else ""
    raise ValueError(f"{root}: the manifest and the tensors disagree: manifest.json says family "
                     f"{family!r} (embedding {fam.embed_leaf!r}, MLP {fam.ffn_in!r}), but model.safetensors "
                     f"holds {top}{looks}; restore the manifest or use an earlier checkpoint")


def load_full(path) -> Checkpoint:
    """Everything ``save`` wrote: params, config, extra, optimizer state, state tree and step.

    ValueError (one line saying what is wrong) for a corrupt, edited or foreign checkpoint;
    FileNotFoundError when there is none at ``path``.
    """
    root = _resolve(Path(path))
    manifest = read_manifest(root)
    family = manifest["family"]
    try:
        cfg = FAMILIES[family].Config(**manifest["config"])
    except (TypeError, ValueError, ArithmeticError) as err:
        raise ValueError(f"{root}: config does not fit {family}.Config ({err})") from err
    params = _read_tree(root, manifest, "model")
    _check_family(root, family, params)
    opt = None
    if "optim" in manifest["trees"]:
        tree = _read_tree(root, manifest, "optim")
        if not isinstance(tree, dict) or set(tree) != set(AdamWState._fields):
            raise bad(root, f"the optimizer state needs the fields {list(AdamWState._fields)}")
        opt = AdamWState(**tree)
    state = _read_tree(root, manifest, "state") if "state" in manifest["trees"] else None
    verify_own_checksum(root, manifest)
    return Checkpoint(params, cfg, manifest.get("extra", {}), opt, state, manifest.get("step"))


def load_extra(path) -> dict:
    """The ``extra`` a checkpoint was saved with (of the newest complete leftover when ``path``
    is missing after a kill), read from its manifest without reading the tensors.

    ValueError for a corrupt manifest; FileNotFoundError when there is no checkpoint at ``path``.
    """
    return read_manifest(_resolve(Path(path))).get("extra", {})


def load(path):
    """``(params, cfg, extra)`` from a checkpoint directory; ValueError if it is corrupt.

    Example: ``params, cfg, extra = load("runs/train/checkpoint")``
    """
    ck = load_full(path)
    return ck.params, ck.cfg, ck.extra


__all__ = ["Checkpoint", "FAMILIES", "FORMAT", "READABLE", "save", "load", "load_full", "load_extra"]
