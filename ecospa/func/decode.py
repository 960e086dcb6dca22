"""Incremental decoding with a KV cache, as pure functions of (params, cache).

    cache = init_cache(params, cfg, batch=1, max_len=256)        # a pytree of zero tensors
    logits, cache = decode(params, cache, prompt, 0, cfg)         # prefill: T tokens at 0..T-1
    logits, cache = decode(params, cache, next_tok, T, cfg)       # one token at position T

The cache is fixed-size: per layer ``k [B, Hkv, max_len, Dk]`` and ``v [B, Hkv, max_len, Dv]``,
sized from that layer's (possibly pruned) weights, so Dk != Dv and widths that differ per layer
just work. ``pos`` may be an int or a 0-d integer tensor; with a tensor, ``torch.compile`` traces
one graph for every position (no recompile per token). Nothing is updated in place: ``decode``
returns a new cache and leaves the one it was given untouched (unless ``inplace=True``).

Every family is served through its one block function (``Family.layer`` with a cache; see
``ecospa.func._block``): the decoder names no family. Logits equal the full forward's at the
same positions.
"""
from __future__ import annotations

from typing import Union

import torch

from ecospa.func._block import positions as _positions
from ecospa.func._block import run
from ecospa.func.families import family_of

Pos = Union[int, torch.Tensor]


def _decoder(cfg):
    """The family of ``cfg``; ValueError for an encoder (it has no causal decoding)."""
    fam = family_of(cfg)
    if not fam.decoder:
        raise ValueError(f"the {fam.name!r} family is an encoder (bidirectional attention over a "
                         "whole input): it has no key/value cache and no token-by-token decoding")
    return fam


def init_cache(params: dict, cfg, batch: int, max_len: int, dtype: torch.dtype = None) -> dict:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + new ones)."""
    fam = _decoder(cfg)
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]: "
                         "shorten the prompt or ask for fewer new tokens")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    embed = params[fam.embed_leaf]
    dtype = dtype or embed.dtype
    layers = []
    for p in params["layers"]:
        h, _, dk, dv = fam.kv_dims(p)
        layers.append({"k": embed.new_zeros((batch, h, max_len, dk), dtype=dtype),
                       "v": embed.new_zeros((batch, h, max_len, dv), dtype=dtype)})
    return {"layers": tuple(layers)}


def decode(params: dict, cache: dict, tokens: torch.Tensor, pos: Pos, cfg, inplace: bool = False) -> tuple:
    """Logits [B, T, V] of ``tokens`` [B, T] placed at positions pos..pos+T-1, and the new cache.

    Every position before ``pos`` must already be in ``cache`` (from earlier calls). The caller
    keeps pos + T <= the cache length; positions past it are not checked while compiling.
    ``inplace=True`` writes the new keys/values into the given cache's tensors instead of
    copying them (the caller donates the cache; ``generate`` does this, it owns its cache).
    """
    fam = _decoder(cfg)
    positions = _positions(pos, tokens.shape[1], tokens.device)
    end = None
    if not torch.compiler.is_compiling():
        L = cache["layers"][0]["k"].shape[2]
        end = int(positions[-1]) + 1
        if int(positions[0]) < 0 or end > L:
            raise ValueError(f"positions {int(positions[0])}..{end - 1} do not fit a cache of "
                             f"{L} tokens; make the cache longer (init_cache max_len)")
        # eager: attend over the filled slots only (compiled: the whole cache, static shapes)
    return run(fam.embed, fam.layer, fam.head, params, tokens, cfg, positions, cache,
               end=end, inplace=inplace)


def _regional(fam, compile_kw: dict):
    """``fam.layer`` compiled once with dynamic shapes and no duck sizing (two widths that happen
    to be equal, or equal to the batch, would otherwise be assumed equal and recompile when they
    differ in the next layer)."""
    from torch.fx.experimental import _config as fx_config
    compiled = torch.compile(fam.layer, fullgraph=True, dynamic=True, **compile_kw)

    def layer(*args, **kw):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args, **kw)

    return layer


def compiled_decoder(cfg, **compile_kw):
    """A ``decode`` with the same signature whose LAYER function is compiled once, with dynamic
    shapes: one graph for the prefill and one for the one-token step, shared by every layer, even
    when pruning gave each layer its own widths (compiling the whole decoder unrolls the layers
    and specializes a graph on each one's shapes: minutes on CPU for a 30-layer model). The
    embedding and the head run eagerly (a lookup and one matmul). Logits equal ``decode``'s.

    ``compile_kw`` goes to ``torch.compile`` (e.g. ``backend="eager"`` in tests).
    """
    fam = _decoder(cfg)
    layer = _regional(fam, compile_kw)

    def step(params: dict, cache: dict, tokens: torch.Tensor, pos: Pos, cfg, inplace: bool = False) -> tuple:
        positions = _positions(pos, tokens.shape[1], tokens.device)
        L = cache["layers"][0]["k"].shape[2]
        if int(positions[0]) < 0 or int(positions[-1]) >= L:
            raise ValueError(f"positions {int(positions[0])}..{int(positions[-1])} do not fit a cache "
                             f"of {L} tokens; make the cache longer (init_cache max_len)")
        x = fam.embed(params, tokens, positions, cfg)
        new = []
        for p, c in zip(params["layers"], cache["layers"]):
            x, c = layer(p, x, positions, cfg, c, inplace=inplace)  # whole cache, causal mask
            new.append(c)
        return fam.head(params, x, cfg), {"layers": tuple(new)}

    return step


def compiled_forward(cfg, **compile_kw):
    """``forward(params, tokens, cfg) -> logits``, the family's full forward with its LAYER
    function compiled once with dynamic shapes (regional compilation): one graph shared by every
    layer whatever its pruned widths, where ``torch.compile(family.forward)`` unrolls the layers
    and specializes on each one's shapes (first call, 30 SmolLM2 layers pruned to 50%, 2 idle CPU
    cores: 6.5 s here vs 29.3 s whole; ``benchmarks/compile_decode.py --fresh --modes forward
    forward-layer``). Widths of 0 or 1 are
    specialized by dynamo (a layer that keeps one unit gets its own graph). For inference: the
    compiled layer is not differentiated through ``torch.func`` transforms. Works for encoders
    (ViT) too. ``compile_kw`` goes to ``torch.compile``.
    """
    fam = family_of(cfg)
    layer = _regional(fam, compile_kw)

    def forward(params: dict, tokens: torch.Tensor, cfg) -> torch.Tensor:
        return run(fam.embed, layer, fam.head, params, tokens, cfg)[0]

    return forward


__all__ = ["init_cache", "decode", "compiled_decoder", "compiled_forward"]
