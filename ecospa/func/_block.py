"""The one way a family is written: residual sublayers, a block built from them, and a driver.

A family module defines its blocks ONCE, as residual sublayers ending in one output projection:

    x -> x + inner(p, x, pos, cfg, cache) @ W_out (+ b_out)

``inner`` is everything up to the output projection: the attention output of every query head
flattened to [B, T, K] (which reads and writes the layer's key/value cache when one is given),
or the MLP's hidden activation [B, T, F]. The block ``layer = block(SUBLAYERS)`` runs them in
order; ``run`` drives embed -> layers -> head. The full forward (no cache), the cached decoder
(``ecospa.func.decode``), layer-wise reconstruction (one sublayer at a time) and the obs scores
all go through these same functions, so they cannot drift apart.

    x = embed(params, tokens, pos, cfg)
    for p in params["layers"]:
        x, cache = layer(p, x, pos, cfg, cache)        # cache=None: plain causal forward
    logits = head(params, x, cfg)

``pos`` is None (positions 0..T-1, the training forward) or a [T] tensor of absolute positions
(decoding). A cache is one layer's ``{"k": [B, Hkv, L, Dk], "v": [B, Hkv, L, Dv]}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from ecospa.func._layers import affine, attention


@dataclass(frozen=True)
class Sublayer:
    """One residual branch: ``fn`` gives the inner activations [B, T, K] (and the cache), then the
    output projection ``out`` (+ ``bias``)."""

    name: str                  # "attn" or "mlp"
    fn: Callable               # (layer params, x [B, T, D], pos, cfg, cache, **opts) -> ([B, T, K], cache)
    out: str                   # output weight leaf; its leading axes flatten to K, last is D
    bias: Optional[str] = None  # output bias leaf [D], if the family has one

    def weight(self, p: dict) -> torch.Tensor:
        """The output projection as a [K, D] matrix (a view of the leaf)."""
        w = p[self.out]
        return w.reshape(-1, w.shape[-1])

    def inner(self, p: dict, x: torch.Tensor, cfg) -> torch.Tensor:
        """The inner activations [B, T, K] of the plain forward (positions 0..T-1, no cache)."""
        return self.fn(p, x, None, cfg, None)[0]

    def apply(self, p: dict, h: torch.Tensor) -> torch.Tensor:
        """The branch's output [B, T, D] from its inner activations."""
        return affine(h, self.weight(p), p[self.bias] if self.bias else None)

    def run(self, p: dict, x: torch.Tensor, pos, cfg, cache=None, **opts) -> tuple:
        h, cache = self.fn(p, x, pos, cfg, cache, **opts)
        return x + self.apply(p, h), cache


def block(sublayers: tuple) -> Callable:
    """The layer function ``(p, x, pos, cfg, cache=None, **opts) -> (x, cache)`` of ``sublayers``
    run in order (the cache passes through those that do not use it)."""
    def layer(p: dict, x: torch.Tensor, pos, cfg, cache=None, **opts) -> tuple:
        for s in sublayers:
            x, cache = s.run(p, x, pos, cfg, cache, **opts)
        return x, cache
    return layer


def run(embed: Callable, layer: Callable, head: Callable, params: dict, tokens: torch.Tensor, cfg,
        pos=None, cache: Optional[dict] = None, **opts) -> tuple:
    """(logits [B, T, V], new cache or None): embed, every layer (with its cache), head."""
    x = embed(params, tokens, pos, cfg)
    if cache is None:
        for p in params["layers"]:
            x, _ = layer(p, x, pos, cfg)
        return head(params, x, cfg), None
    new = []
    for p, c in zip(params["layers"], cache["layers"]):
        x, c = layer(p, x, pos, cfg, c, **opts)
        new.append(c)
    return head(params, x, cfg), {"layers": tuple(new)}


def _write(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, inplace: bool) -> torch.Tensor:
    """cache [B, H, L, E] with rows ``positions`` replaced by new [B, H, T, E]."""
    if inplace:
        return cache.index_copy_(2, positions, new.to(cache.dtype))
    return cache.index_copy(2, positions, new.to(cache.dtype))


def _attend_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                  scale: float, end) -> torch.Tensor:
    """q [B, H, G, T, dk] at ``positions`` against the cache k [B, H, L, dk], v [B, H, L, dv].
    ``end`` (an int, eager only): slots past it are empty and skipped."""
    G = q.shape[2]
    if end is not None:
        k, v = k[:, :, :end], v[:, :, :end]
    L = k.shape[2]
    if end is not None and q.shape[3] == 1:
        allowed = None  # one new token over exactly the filled slots: nothing to mask
    else:
        allowed = torch.arange(L, device=q.device)[None, :] <= positions[:, None]  # [T, L] causal
    qf = rearrange(q, "b h g t d -> b (h g) t d")
    # enable_gqa is a constant: with dynamic shapes (compiled_decoder) G > 1 would be symbolic;
    # with G == 1 the query and key head counts are equal and nothing is repeated
    out = F.scaled_dot_product_attention(qf, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed,
                                         scale=scale, enable_gqa=True)
    return rearrange(out, "b (h g) t d -> b h g t d", g=G)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, pos, cache=None, *,
           end=None, inplace: bool = False) -> tuple:
    """Causal attention of q [B, Hkv, G, T, dk] over k [B, Hkv, T, dk], v [B, Hkv, T, dv] and
    everything already in ``cache``; returns ([B, T, Hkv*G*dv] heads flattened, new cache).

    Without a cache: plain causal attention over the T tokens. With one: k, v are written at
    ``pos`` (a new cache, or the given one with ``inplace=True``) and q attends to every slot up
    to its own position.
    """
    if cache is None:
        o = attention(q, k, v, scale)
    else:
        cache = {"k": _write(cache["k"], k, pos, inplace), "v": _write(cache["v"], v, pos, inplace)}
        o = _attend_cache(q, cache["k"], cache["v"], pos, scale, end)
    return rearrange(o, "b h g t e -> b t (h g e)"), cache


def passthrough(fn: Callable) -> Callable:
    """A sublayer function that uses no cache, from ``fn(p, x, cfg) -> [B, T, K]``."""
    def inner(p, x, pos, cfg, cache=None, **opts):
        return fn(p, x, cfg), cache
    inner.__name__ = getattr(fn, "__name__", "inner")
    return inner


def positions(pos, T: int, device) -> torch.Tensor:
    """Absolute positions [T] of T tokens starting at ``pos`` (an int or a 0-d tensor)."""
    start = torch.as_tensor(pos, device=device, dtype=torch.long).reshape(())
    return start + torch.arange(T, device=device)


__all__ = ["Sublayer", "block", "run", "attend", "passthrough", "positions"]
