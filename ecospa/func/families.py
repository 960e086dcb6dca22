"""The model families, one ``Family`` record each, and the registry every dispatch site uses.

    fam = family_of(cfg)                  # by the config's type: llama.Config -> FAMILIES["llama"]
    logits = fam.forward(params, tokens, cfg)
    fam = FAMILIES[manifest["family"]]    # by name: checkpoints store ``fam.name``

A ``Family`` holds what is pure (config class, init, forward, coupled groups, the tree's
layout). The Hugging Face half of a family (converters, ``model_type`` names) lives one layer up,
in ``ecospa.io.hf.HF_FAMILIES``, keyed by the same name: ``func`` imports nothing from ``io``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ecospa._tree import FP32_BUFFERS
from ecospa.func import gpt2, llama


@dataclass(frozen=True)
class Family:
    """One model family: everything that dispatches on the kind of model."""

    name: str                  # stored in checkpoints' manifests and in ``Config.name``
    Config: type
    init: Callable             # (cfg, seed=0, dtype=float32) -> params
    forward: Callable          # (params, tokens [B, T], cfg) -> logits [B, T, V]
    coupled_groups: Callable   # (cfg) -> tuple[Group]
    embed: str                 # the token-embedding leaf (its dtype is the model's)
    ffn_in: str                # the MLP's input weight [D, F] (its width is the layer's F)
    buffers: frozenset = frozenset()  # leaf names that are buffers (never trained, kept >= fp32)


FAMILIES = {
    "llama": Family("llama", llama.Config, llama.init, llama.forward, llama.coupled_groups,
                    embed="embed", ffn_in="w_up", buffers=FP32_BUFFERS),
    "gpt2": Family("gpt2", gpt2.Config, gpt2.init, gpt2.forward, gpt2.coupled_groups,
                   embed="wte", ffn_in="w_in"),
}


def family_of(cfg) -> Family:
    """The family whose ``Config`` ``cfg`` is; ValueError for anything else."""
    for fam in FAMILIES.values():
        if isinstance(cfg, fam.Config):
            return fam
    raise ValueError(f"unknown model config type {type(cfg).__name__}; expected one of "
                     f"{', '.join(f'{n}.Config' for n in FAMILIES)}")


def family(name: str) -> Family:
    """The family called ``name`` ("llama", "gpt2"); ValueError naming the known ones."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"unknown model family {str(name)[:40]!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


def is_buffer(path) -> bool:
    """Whether the leaf at ``path`` is a buffer (rotary frequencies), not a trained weight."""
    return bool(path) and path[-1] in FP32_BUFFERS


__all__ = ["Family", "FAMILIES", "family_of", "family", "is_buffer"]
