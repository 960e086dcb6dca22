"""Helpers shared by the Hugging Face converters (``hf_llama``, ``hf_gpt2``) and the GGUF reader:
config.json values checked as untrusted input, and state-dict completeness checks."""
from __future__ import annotations

import math
from typing import Any, Mapping

MAX_SIZE = 2**31 - 1  # no dimension, head count or layer count of a real model is larger


def as_dict(config: Any) -> dict:
    """A plain dict from a transformers PretrainedConfig or a dict read from config.json."""
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"config must be a dict or a transformers config, got {type(config).__name__}")


def cfg_int(c: dict, key: str, default=None, lo: int = 1, hi: int = MAX_SIZE):
    """``c[key]`` as a whole number in [lo, hi] (``default`` when absent or null); ValueError
    naming the key for strings, floats, booleans or out-of-range values (config.json is input)."""
    v = c.get(key)
    if v is None:
        if default is None:
            raise ValueError(f"config has no {key!r}; is this the model's config.json?")
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError(f"config {key!r} must be a whole number, got {v!r} "
                         f"({type(v).__name__}); fix config.json")
    if not lo <= v <= hi:
        raise ValueError(f"config {key!r} = {v} is out of range [{lo}, {hi}]; fix config.json")
    return v


def cfg_float(c: dict, key: str, default: float) -> float:
    """``c[key]`` as a finite number > 0 (epsilons, rope_theta); ValueError naming the key."""
    v = c.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise ValueError(f"config {key!r} must be a finite number > 0, got {v!r}; fix config.json")
    return float(v)


def cfg_bool(c: dict, key: str, default=None):
    """``c[key]`` as a JSON boolean (a string such as "false" is an error, not True)."""
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise ValueError(f"config {key!r} must be true or false, got {v!r} ({type(v).__name__}); "
                         "fix config.json")
    return v


def cfg_str(c: dict, key: str, default=None):
    v = c.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise ValueError(f"config {key!r} must be a string, got {v!r}; fix config.json")
    return v


def check_layer_count(n_layers: int, n_tensors: int, per_layer: int, key: str) -> None:
    """A config cannot describe more layers than the checkpoint has tensors for (checked before
    anything is built per layer, so a crafted count cannot exhaust memory)."""
    if n_layers * per_layer > n_tensors:
        raise ValueError(f"config {key!r} = {n_layers}, but the checkpoint holds only {n_tensors} "
                         "tensors, fewer than one per layer; does config.json belong to these "
                         "weights?")


def check_layers_found(names, n_layers: int, key: str, prefix: str = "model.layers.",
                       fix: str = "") -> None:
    """The tensors under ``prefix`` + "N." must be for exactly layers 0..n_layers-1 (what
    ``config[key]`` declares): ValueError saying what was declared, what the tensors hold and
    how to fix it. A config naming fewer layers would otherwise load a truncated model."""
    found = sorted({int(n[len(prefix):].split(".", 1)[0]) for n in names
                    if n.startswith(prefix) and n[len(prefix):].split(".", 1)[0].isdigit()})
    if found == list(range(n_layers)):
        return
    held = (f"{len(found)} layers ({prefix}0 to {prefix}{len(found) - 1})"
            if found == list(range(len(found))) else
            f"tensors for the layers {found[:6]}{'...' if len(found) > 6 else ''} (numbered with gaps)")
    raise ValueError(f"the config declares {key} = {n_layers}, but the weights hold {held}; "
                     f"set {key}{fix} to {len(found)} to match the weights, or use the config.json "
                     "that was written with them")


def check_state_dict(sd: dict, expected: dict) -> None:
    """ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = [k for k in expected if k not in sd]
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}; "
                         "does config.json belong to these weights?")
    extra = [k for k in sd if k not in expected]
    if extra:
        raise ValueError(f"checkpoint has tensors the config does not describe, e.g. {extra[:3]}")
    for k, shape in expected.items():
        if tuple(sd[k].shape) != tuple(shape):
            raise ValueError(f"tensor {k!r} has shape {tuple(sd[k].shape)}, the config implies "
                             f"{tuple(shape)}; does config.json belong to these weights?")


def uniform_width(widths: list, config_key: str) -> int:
    """The one MLP width every layer shares; ValueError if transformers' single ``config_key`` can't hold them."""
    if len(set(widths)) > 1:
        raise ValueError(f"MLP widths differ across layers ({widths}); transformers' config has "
                         f"one {config_key}. Prune the MLP with a uniform sparsity to export")
    return widths[0]


__all__ = ["MAX_SIZE", "as_dict", "cfg_int", "cfg_float", "cfg_bool", "cfg_str", "check_layer_count",
           "check_layers_found", "check_state_dict", "uniform_width"]
