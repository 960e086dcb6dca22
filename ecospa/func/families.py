"""The model families, one ``Family`` record each, and the registry every dispatch site uses.

    fam = family_of(cfg)                  # by the config's type: llama.Config -> FAMILIES["llama"]
    logits = fam.forward(params, tokens, cfg)
    fam = FAMILIES[manifest["family"]]    # by name: checkpoints store ``fam.name``

A ``Family`` holds what is pure (config class, init, the block and its sublayers, embed/head,
coupled groups, the tree's layout). Drivers dispatch through it and never name a family; an
unknown family is an error. The Hugging Face half of a family (converters, ``model_type`` names) lives one layer up,
in ``ecospa.io.hf.HF_FAMILIES``, keyed by the same name: ``func`` imports nothing from ``io``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ecospa.func import gpt2, llama, vit


@dataclass(frozen=True)
class Family:
    """One model family: everything the drivers (forward, decode, reconstruct, pad/compact, the
    FLOP counter, the exporters) need, so that none of them names a family.

    The block is written once, as ``sublayers`` (``ecospa.func._block``); ``layer`` runs them with
    an optional key/value cache. Padding and compaction read the coupled groups plus three hooks.
    """

    name: str                  # stored in checkpoints' manifests and in ``Config.name``
    Config: type
    init: Callable             # (cfg, seed=0, dtype=float32) -> params
    forward: Callable          # (params, tokens [B, T], cfg) -> logits [B, T, V]
    coupled_groups: Callable   # (cfg) -> tuple[Group]
    embed: Callable            # (params, tokens, pos, cfg) -> x [B, T, D]
    layer: Callable            # (p, x, pos, cfg, cache=None, **opts) -> (x, cache)
    head: Callable             # (params, x, cfg) -> logits (final norm included)
    sublayers: tuple           # the layer's residual branches (``Sublayer``), in order
    kv_dims: Callable          # (layer p) -> (Hkv, G, Dk, Dv): cache shapes and attention FLOPs
    embed_leaf: str            # the token-embedding leaf (its dtype is the model's)
    ffn_in: str                # the MLP's input weight [D, F] (its width is the layer's F)
    matmuls: tuple             # the layer's projection-matrix leaves (the FLOP counter)
    unit_sizes: Callable       # (cfg) -> {group kind: dense units per block} for "qk", "vo"
    slots: Callable = lambda p, cfg: {}          # (p, cfg) -> {kind: [H, k] original slot of each kept unit}
    dense_buffers: Callable = lambda p, cfg, slots: {}  # (p, cfg, slots) -> {leaf: dense value} of unmasked members
    decoder: bool = True       # causal LM over token ids; False: an encoder (no cache, no decoding)


def _module_family(name: str, module, **kw) -> Family:
    return Family(name, module.Config, module.init, module.forward, module.coupled_groups,
                  module.embed, module.layer, module.head, module.SUBLAYERS, module.kv_dims,
                  **kw)


FAMILIES = {
    "llama": _module_family("llama", llama, embed_leaf="embed", ffn_in="w_up",
                            matmuls=("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"),
                            unit_sizes=llama.unit_sizes, slots=llama.slots,
                            dense_buffers=llama.dense_buffers),
    "gpt2": _module_family("gpt2", gpt2, embed_leaf="wte", ffn_in="w_in",
                           matmuls=("wq", "wk", "wv", "wo", "w_in", "w_out"),
                           unit_sizes=gpt2.unit_sizes),
    "vit": _module_family("vit", vit, embed_leaf="w_patch", ffn_in="w_in",
                          matmuls=("wq", "wk", "wv", "wo", "w_in", "w_out"),
                          unit_sizes=vit.unit_sizes, decoder=False),
}


def family_of(cfg) -> Family:
    """The family whose ``Config`` ``cfg`` is; ValueError for anything else."""
    for fam in FAMILIES.values():
        if isinstance(cfg, fam.Config):
            return fam
    raise ValueError(f"unknown model config type {type(cfg).__name__}; expected one of "
                     f"{', '.join(f'{n}.Config' for n in FAMILIES)}")


def family(name: str) -> Family:
    """The family called ``name`` ("llama", "gpt2", "vit"); ValueError naming the known ones."""
    if not isinstance(name, str) or name not in FAMILIES:
        raise ValueError(f"unknown model family {str(name)[:40]!r}; expected one of {sorted(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["Family", "FAMILIES", "family_of", "family"]
