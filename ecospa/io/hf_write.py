"""Export directories: ``write_hf`` writes config.json + model.safetensors (+ extra files)
atomically, and only ever replaces a directory that is new, empty or an intact earlier export
of ours (``check_export_target``)."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Mapping, Optional

from safetensors.torch import save_file

from ecospa.errors import UsageError
from ecospa.io.files import check_output_path, exclusive, publish_mode, sha256_file, write_errors

# Every export's config.json carries this key (transformers keeps unknown keys as attributes):
# the files ecospa wrote with their sizes and sha256. Only a directory whose config.json has it
# and whose other files match it exactly is ever replaced by a later export.
EXPORT_MARKER = "ecospa_export"
_EXPORT_KIND = "ecospa-hf-export"


def _is_under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def check_export_target(directory, flag: str = "the export directory") -> str:
    """The absolute path ``write_hf`` may write; UsageError (nothing touched) unless ``directory``
    is absent, an empty directory, or a previous export of ours (it holds ``EXPORT_MARKER`` and
    only the files that marker lists). Refused: files, paths under a file, symbolic links,
    non-empty foreign directories (``.``, a parent of the model, a home directory...) and any
    directory that holds the working directory."""
    raw = os.fspath(directory)
    if not raw:
        raise UsageError(f"{flag} is empty; give a directory path")
    path = check_output_path(raw, flag, " (an export never follows or replaces a link)")
    if not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise UsageError(f"{flag} {raw!r} is a file; give a directory path (it will hold config.json "
                     "and model.safetensors)")
    entries = sorted(os.listdir(path))
    ours = _marker_files(path) if entries else set()
    if ours is None:
        raise UsageError(f"{flag} {raw!r} is not an ecospa export (it holds {entries[:3]}"
                     f"{'...' if len(entries) > 3 else ''}, and no config.json with an intact "
                     f"{EXPORT_MARKER!r} record); an export replaces its directory, so choose a "
                     "new or empty one")
    if _is_under(os.path.realpath(os.getcwd()), os.path.realpath(path)):
        raise UsageError(f"{flag} {raw!r} holds the working directory; an export replaces its whole "
                     "directory, so choose a new or dedicated one")
    if not entries:
        return path
    foreign = [e for e in entries if e not in ours or not os.path.isfile(os.path.join(path, e))
               or os.path.islink(os.path.join(path, e))]
    if foreign:
        raise UsageError(f"{flag} {raw!r} is an earlier ecospa export, but also holds {foreign[:3]}, "
                     "which ecospa did not write; move them out or choose another directory")
    return path


def _marker_files(path: str):
    """The file names an ecospa export at ``path`` consists of, or None if it is not one: its
    config.json carries ``EXPORT_MARKER`` and every file listed there is intact (same size and
    sha256: weights that were edited or re-saved by another tool are not ours to delete)."""
    config = os.path.join(path, "config.json")
    if os.path.islink(config) or not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    info = info.get(EXPORT_MARKER) if isinstance(info, dict) else None
    files = info.get("files") if isinstance(info, dict) else None
    if not isinstance(info, dict) or info.get("kind") != _EXPORT_KIND or not isinstance(files, dict):
        return None
    for name, want in files.items():
        file = os.path.join(path, name)
        if not isinstance(name, str) or not name or os.sep in name or name.startswith(".") or \
                not isinstance(want, dict) or os.path.islink(file) or not os.path.isfile(file) or \
                os.path.getsize(file) != want.get("bytes") or sha256_file(file) != want.get("sha256"):
            return None
    return set(files) | {"config.json"}


def write_hf(sd: dict, conf: dict, directory: str, extra_files: Optional[Mapping[str, bytes]] = None,
             config_extra: Optional[Mapping] = None) -> str:
    """Write config.json (with the ecospa marker) + model.safetensors into ``directory`` atomically.

    The files go to a temporary sibling which is renamed into place, so ``directory`` is never
    half-written. ``directory`` may be absent, empty or an earlier ecospa export; anything else
    is refused with a UsageError before a byte is written (see ``check_export_target``).
    ``extra_files`` (name -> bytes: tokenizer.json, a modeling file) are written with the
    weights and listed in the marker like them; ``config_extra`` (the special token ids) is added
    to config.json.
    """
    conf = {**conf, **(config_extra or {})}
    directory = check_export_target(directory)
    parent = os.path.dirname(directory)
    try:
        os.makedirs(parent, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UsageError(f"cannot create {parent!r}: {err.strerror}") from err
    with exclusive(directory), write_errors(directory, "the previous export, if any, is unchanged"):
        recover_export(directory)
        _write_swap(sd, conf, directory, extra_files)
    return directory


def _write_swap(sd: dict, conf: dict, directory: str, extra_files) -> None:
    parent = os.path.dirname(directory)
    tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(directory) + "-", dir=parent)
    old = None
    try:
        weights = os.path.join(tmp, "model.safetensors")
        save_file(sd, weights, metadata={"format": "pt"})
        for name, data in (extra_files or {}).items():
            if not name or os.sep in name or name.startswith(".") or name in ("config.json", "model.safetensors"):
                raise ValueError(f"extra file name {name!r} is not allowed in an export")
            with open(os.path.join(tmp, name), "wb") as f:
                f.write(data)
        files = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                        "sha256": sha256_file(os.path.join(tmp, name))}
                 for name in ["model.safetensors", *(extra_files or {})]}
        marker = {"kind": _EXPORT_KIND, "files": files,
            "note": "written by ecospa; a later export replaces this directory only while it "
                    "holds just these files, unchanged"}
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**conf, EXPORT_MARKER: marker}, f, indent=2, sort_keys=True)
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as f:
                os.fsync(f.fileno())
            publish_mode(os.path.join(tmp, name))  # not the 0600 of a temporary file
        publish_mode(tmp)
        check_export_target(directory)  # again, right before the swap
        if os.path.isdir(directory) and os.listdir(directory):
            old = directory + ".old-" + os.path.basename(tmp)
            os.replace(directory, old)  # swap in the new dir, then drop the old export
        os.replace(tmp, directory)  # rename(2) also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(directory):
            os.replace(old, directory)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_leftovers(directory: str) -> tuple:
    """(temporary directories of killed exports to ``directory``, earlier exports set aside by
    a swap that did not finish: ``DIR.old-*``)."""
    parent, name = os.path.split(os.path.abspath(directory).rstrip(os.sep))
    if not os.path.isdir(parent):
        return [], []
    entries = sorted(os.listdir(parent))
    tmps = [os.path.join(parent, e) for e in entries if e.startswith(f".tmp-{name}-")]
    olds = [os.path.join(parent, e) for e in entries if e.startswith(f"{name}.old-")]
    real = lambda p: os.path.isdir(p) and not os.path.islink(p)  # noqa: E731
    return [p for p in tmps if real(p)], [p for p in olds if real(p)]


def interrupted_export(directory: str) -> Optional[str]:
    """The intact earlier export a killed swap left as ``DIR.old-*`` while nothing is at
    ``directory`` (what ``recover_export`` would put back), or None. Reads only."""
    if os.path.lexists(directory):
        return None
    intact = [o for o in export_leftovers(directory)[1] if _marker_files(o) is not None]
    return max(intact, key=os.path.getmtime) if intact else None


def recover_export(directory: str) -> Optional[str]:
    """Repair what a killed export to ``directory`` left (call it holding ``exclusive``): an
    export set aside between the swap's two renames goes back in place when nothing is there,
    and temporary directories of killed writes are removed. Returns the restored path or None."""
    tmps, olds = export_leftovers(directory)
    restored = interrupted_export(directory)
    if restored is not None:
        os.replace(restored, directory)
        olds.remove(restored)
    for left in tmps + olds:
        shutil.rmtree(left, ignore_errors=True)
    return restored


__all__ = ["EXPORT_MARKER", "check_export_target", "export_leftovers", "interrupted_export", "recover_export", "write_hf"]
