"""Load Hugging Face checkpoints (a local directory or a hub id) into ecospa parameter trees.

``load_hf(path) -> (family, cfg, params)`` reads config.json and the weights (model.safetensors,
sharded safetensors with an index, or pytorch_model.bin), picks the model family from
``model_type`` and converts with that family's ``HFFamily.from_hf``.

``HF_FAMILIES`` is the Hugging Face half of the family registry (``ecospa.func.families`` holds
the pure half under the same names): the converters and the ``model_type`` names each reads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Tuple

import torch
from safetensors.torch import load_file

from ecospa.func.families import FAMILIES, Family, family_of
from ecospa.io import hf_gpt2, hf_llama, hf_vit
from ecospa.io.hf_compact import from_hf_compact
from ecospa.io.hf_write import EXPORT_MARKER


@dataclass(frozen=True)
class HFFamily:
    """How one model family reads and writes ``transformers`` checkpoints."""

    family: Family
    model_types: tuple        # config.json ``model_type`` values this family reads
    from_hf: Callable         # (state_dict, config, dtype=None) -> (cfg, params)
    to_hf: Callable           # (params, cfg) -> (state_dict, config dict)
    save_hf: Callable         # (params, cfg, directory, extra_files=None, config_extra=None) -> directory


HF_FAMILIES = {
    "llama": HFFamily(FAMILIES["llama"], hf_llama.LLAMA_TYPES, hf_llama.from_hf, hf_llama.to_hf,
                      hf_llama.save_hf),
    "gpt2": HFFamily(FAMILIES["gpt2"], ("gpt2",), hf_gpt2.from_hf, hf_gpt2.to_hf, hf_gpt2.save_hf),
    "vit": HFFamily(FAMILIES["vit"], hf_vit.VIT_TYPES, hf_vit.from_hf, hf_vit.to_hf, hf_vit.save_hf),
}
MODEL_TYPES = {t: fam for fam in HF_FAMILIES.values() for t in fam.model_types}


def hf_family_of(cfg) -> HFFamily:
    """The HF converters of ``cfg``'s family."""
    return HF_FAMILIES[family_of(cfg).name]


def save_hf(params, cfg, directory: str, extra_files=None, config_extra=None) -> str:
    """Save ``params`` as a stock transformers directory (see ``hf_llama.save_hf``)."""
    return hf_family_of(cfg).save_hf(params, cfg, directory, extra_files, config_extra)

_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")


def _read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{directory!r} has no config.json; is it a Hugging Face model directory?")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path}: config.json must hold a JSON object, got "
                         f"{type(config).__name__}; is this a Hugging Face model directory?")
    return config


def _load_file(path: str) -> dict:
    """Tensors of one safetensors or torch pickle file; ValueError naming a corrupt file."""
    try:
        if path.endswith(".safetensors"):
            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors and torch raise their own error types
        raise ValueError(f"cannot read weights from {path} (truncated or corrupt file?): "
                         f"{type(err).__name__}: {err}") from err


def _shards(directory: str, index_name: str) -> list:
    index_path = os.path.join(directory, index_name)
    try:
        with open(index_path, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            RecursionError) as err:
        raise ValueError(f"cannot read the shard index {index_path}: {err}") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map tensor names to file names")
    files = sorted(set(weight_map.values()))
    root = os.path.realpath(directory)
    paths = []
    for name in files:
        path = os.path.realpath(os.path.join(root, name))
        if os.path.isabs(name) or ".." in name.replace("\\", "/").split("/") or \
                os.path.commonpath([root, path]) != root:
            raise ValueError(f"{index_path} lists the shard {name!r}, which is outside the model "
                             "directory; shard files must be plain names inside it")
        paths.append(path)
    missing = [f for f, p in zip(files, paths) if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"{index_path} lists shards that are not there: {missing[:3]}")
    return paths


def read_state_dict(directory: str) -> dict:
    """All weight tensors of an HF model directory, by HF name."""
    for name in _WEIGHT_FILES:
        if os.path.isfile(os.path.join(directory, name)):
            break
    else:
        raise ValueError(f"{directory!r} has none of {_WEIGHT_FILES}; no weights to load")
    if name.endswith(".index.json"):
        files = _shards(directory, name)
    else:
        files = [os.path.join(directory, name)]
    sd = {}
    for path in files:
        sd.update(_load_file(path))
    return sd


def _local_dir(path_or_id: str) -> str:
    if os.path.isdir(path_or_id):
        return path_or_id
    if os.path.exists(path_or_id):
        raise ValueError(f"{path_or_id!r} is a file; give the model directory that holds it")
    if path_or_id.startswith((".", "/", "~")) or path_or_id.count("/") > 1:
        raise ValueError(f"no such model directory: {path_or_id!r}")
    # A hub id. Needs the network, so the test suite (offline) cannot exercise a download.
    try:
        return hub_dir(path_or_id)
    except ValueError as err:
        raise ValueError(f"{path_or_id!r} is not a local directory and could not be downloaded "
                         f"from the Hugging Face hub: {err}") from err


def _offline() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def hub_dir(repo_id: str) -> str:
    """Download (or find in the local cache) a hub model's config, weights and tokenizer files;
    the local directory. ValueError saying why not: huggingface_hub missing, offline mode, no
    network, unknown or gated repository."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as err:
        raise ValueError("downloading from the hub needs the huggingface_hub package: "
                         "pip install huggingface_hub (or pip install 'ecospa[hf]')") from err
    offline = _offline()
    try:
        return snapshot_download(repo_id, allow_patterns=[
            "*.json", "*.safetensors", "pytorch_model*.bin", "*.model", "*.txt"])
    except Exception as err:  # offline, unknown repo, gated model: all mean "cannot get it"
        why = ("offline mode is on (HF_HUB_OFFLINE) and the model is not in the local cache"
               if offline else "the download failed (no network, an unknown or a gated repository?)")
        raise ValueError(f"{why}: {type(err).__name__}: {' '.join(str(err).split())[:300]}") from err


def load_hf(path_or_id: str, dtype: torch.dtype = torch.float32) -> Tuple[str, object, dict]:
    """Load a Hugging Face checkpoint as (family, cfg, params).

    Args:
      path_or_id: a local directory (config.json + weights) or a hub id such as
        "HuggingFaceTB/SmolLM2-135M" (downloaded with huggingface_hub; needs the network).
      dtype: the dtype of the returned weights (rotary frequencies stay float32).
    Returns:
      ("llama", "gpt2" or "vit", the family's Config, params).
    Example:
      family, cfg, params = load_hf("path/to/model")
      logits = llama.forward(params, tokens, cfg)
    """
    directory = _local_dir(str(path_or_id))
    config = _read_config(directory)
    kind = config.get("model_type")
    if kind == "ecospa_llama":  # ecospa's compact export (per-layer sizes, remote code)
        name, convert = "llama", from_hf_compact
    elif not isinstance(kind, str) or kind not in MODEL_TYPES:
        raise ValueError(f"config.json: model_type {kind!r} is not supported; ecospa reads {sorted(MODEL_TYPES)}")
    else:
        name, convert = MODEL_TYPES[kind].family.name, MODEL_TYPES[kind].from_hf
    sd = read_state_dict(directory)
    # LLaMA's converter takes the tensors out of sd as it goes: one model in memory, not two
    more = {"consume": True} if convert is hf_llama.from_hf else {}
    try:
        cfg, params = convert(sd, config, dtype=dtype, **more)
    except ValueError as err:  # config and weights disagree: say which directory
        raise ValueError(f"{os.path.join(directory, 'config.json')} and its weights: {err}") from err
    return name, cfg, params


def _is_export(directory: str) -> bool:
    """Whether config.json carries ecospa's export marker."""
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            return EXPORT_MARKER in json.load(f)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError, TypeError):
        return False


def load_hf_tokenizer(path_or_id: str):
    """The model's tokenizer: a bare ``tokenizer.json``, or the one of an ecospa export (whose
    tokenizer_config.json only names its special tokens for transformers), through
    ``tokenizers``; otherwise ``transformers.AutoTokenizer`` (needs the ``hf`` extra). Never runs
    a directory's custom code (``trust_remote_code`` stays off)."""
    local = os.path.isdir(str(path_or_id))
    single = os.path.join(str(path_or_id), "tokenizer.json")
    if local and os.path.isfile(single) and (_is_export(str(path_or_id)) or not os.path.isfile(
            os.path.join(str(path_or_id), "tokenizer_config.json"))):
        try:
            from tokenizers import Tokenizer
        except ImportError as err:
            raise ValueError("loading a tokenizer needs `pip install ecospa[hf]`") from err
        return Tokenizer.from_file(single)
    try:
        from transformers import AutoTokenizer
    except ImportError as err:
        raise ValueError("loading a tokenizer needs `pip install ecospa[hf]`") from err
    return AutoTokenizer.from_pretrained(path_or_id, trust_remote_code=False)


__all__ = ["HFFamily", "HF_FAMILIES", "MODEL_TYPES", "hf_family_of", "save_hf", "load_hf", "load_hf_tokenizer",
           "read_state_dict", "hub_dir"]
