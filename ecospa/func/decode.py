"""Incremental decoding with a KV cache, as pure functions of (params, cache).

    cache = init_cache(params, cfg, batch=1, max_len=256)        # a pytree of zero tensors
    logits, cache = decode(params, cache, prompt, 0, cfg)         # prefill: T tokens at 0..T-1
    logits, cache = decode(params, cache, next_tok, T, cfg)       # one token at position T

The cache is fixed-size: per layer ``k [B, Hkv, max_len, Dk]`` and ``v [B, Hkv, max_len, Dv]``,
sized from that layer's (possibly pruned) weights, so Dk != Dv and widths that differ per layer
just work. ``pos`` may be an int or a 0-d integer tensor; with a tensor, ``torch.compile`` traces
one graph for every position (no recompile per token). Nothing is updated in place: ``decode``
returns a new cache and leaves the one it was given untouched (unless ``inplace=True``).

Both families are served: LLaMA (RoPE at absolute positions with each layer's kept frequencies,
GQA) and GPT-2 (learned positions). Logits equal the full forward's at the same positions.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from einops import rearrange

from ecospa.func import gpt2, llama
from ecospa.func.families import family_of
from ecospa.func._layers import merge_heads, rms_norm

Pos = Union[int, torch.Tensor]


def _family(cfg) -> str:
    return family_of(cfg).name


def _kv_shapes(p: dict, family: str) -> tuple[int, int, int]:
    """(Hkv, Dk, Dv) of one layer, read from its weights."""
    if family == "llama":
        _, h, _, n_pairs = p["wk"].shape
        return h, 2 * n_pairs, p["wv"].shape[2]
    return p["wk"].shape[1], p["wk"].shape[2], p["wv"].shape[2]


def init_cache(params: dict, cfg, batch: int, max_len: int, dtype: torch.dtype = None) -> dict:
    """An empty cache for ``batch`` sequences of up to ``max_len`` tokens (prompt + new ones)."""
    family = _family(cfg)
    if not 1 <= max_len <= cfg.max_seq_len:
        raise ValueError(f"max_len={max_len} must be in [1, max_seq_len={cfg.max_seq_len}]: "
                         "shorten the prompt or ask for fewer new tokens")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    embed = params["embed"] if family == "llama" else params["wte"]
    dtype = dtype or embed.dtype
    layers = []
    for p in params["layers"]:
        h, dk, dv = _kv_shapes(p, family)
        layers.append({"k": embed.new_zeros((batch, h, max_len, dk), dtype=dtype),
                       "v": embed.new_zeros((batch, h, max_len, dv), dtype=dtype)})
    return {"layers": tuple(layers)}


def _positions(pos: Pos, T: int, device) -> torch.Tensor:
    start = torch.as_tensor(pos, device=device, dtype=torch.long).reshape(())
    return start + torch.arange(T, device=device)


def _write(cache: torch.Tensor, new: torch.Tensor, positions: torch.Tensor, inplace: bool) -> torch.Tensor:
    """cache [B, H, L, E] with rows ``positions`` replaced by new [B, H, T, E]."""
    if inplace:
        return cache.index_copy_(2, positions, new.to(cache.dtype))
    return cache.index_copy(2, positions, new.to(cache.dtype))


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
            scale: float, end) -> torch.Tensor:
    """q [B, H, G, T, dk] at ``positions`` against the cache k [B, H, L, dk], v [B, H, L, dv].
    ``end`` (an int, eager only): slots past it are empty and skipped."""
    B, H, G, T, _ = q.shape
    if end is not None:
        k, v = k[:, :, :end], v[:, :, :end]
    L = k.shape[2]
    if end is not None and T == 1:
        allowed = None  # one new token over exactly the filled slots: nothing to mask
    else:
        allowed = torch.arange(L, device=q.device)[None, :] <= positions[:, None]  # [T, L] causal
    qf = rearrange(q, "b h g t d -> b (h g) t d")
    out = F.scaled_dot_product_attention(qf, k.to(q.dtype), v.to(q.dtype), attn_mask=allowed,
                                         scale=scale, enable_gqa=G > 1)
    return rearrange(out, "b (h g) t d -> b h g t d", g=G)


def _llama_layer(p: dict, c: dict, x: torch.Tensor, positions: torch.Tensor, cfg, inplace, end):
    inv = p["inv_freq"].to(torch.promote_types(p["inv_freq"].dtype, torch.float32))
    ang = positions.to(inv.dtype)[None, :, None] * inv[:, None, :]  # [Hkv, T, P] at the positions
    q, k, v = llama.qkv(p, rms_norm(x, p["attn_norm"], cfg.norm_eps), ang.cos().to(x.dtype),
                        ang.sin().to(x.dtype))
    c = {"k": _write(c["k"], k, positions, inplace), "v": _write(c["v"], v, positions, inplace)}
    o = _attend(q, c["k"], c["v"], positions, cfg.head_dim ** -0.5, end)
    x = x + merge_heads(o, p["wo"])
    return x + llama._mlp(p, rms_norm(x, p["mlp_norm"], cfg.norm_eps)), c


def _gpt2_layer(p: dict, c: dict, x: torch.Tensor, positions: torch.Tensor, cfg, inplace, end):
    q, k, v = gpt2.qkv(p, gpt2._ln(x, p["ln1_w"], p["ln1_b"], cfg.norm_eps))
    c = {"k": _write(c["k"], k, positions, inplace), "v": _write(c["v"], v, positions, inplace)}
    o = _attend(q[:, :, None], c["k"], c["v"], positions, cfg.head_dim ** -0.5, end)[:, :, 0]
    x = x + merge_heads(o, p["wo"], p["bo"])
    return x + gpt2._mlp(p, gpt2._ln(x, p["ln2_w"], p["ln2_b"], cfg.norm_eps)), c


def decode(params: dict, cache: dict, tokens: torch.Tensor, pos: Pos, cfg, inplace: bool = False) -> tuple:
    """Logits [B, T, V] of ``tokens`` [B, T] placed at positions pos..pos+T-1, and the new cache.

    Every position before ``pos`` must already be in ``cache`` (from earlier calls). The caller
    keeps pos + T <= the cache length; positions past it are not checked while compiling.
    ``inplace=True`` writes the new keys/values into the given cache's tensors instead of
    copying them (the caller donates the cache; ``generate`` does this, it owns its cache).
    """
    family = _family(cfg)
    T = tokens.shape[1]
    positions = _positions(pos, T, tokens.device)
    end = None
    if not torch.compiler.is_compiling():
        L = cache["layers"][0]["k"].shape[2]
        end = int(positions[-1]) + 1
        if int(positions[0]) < 0 or end > L:
            raise ValueError(f"positions {int(positions[0])}..{end - 1} do not fit a cache of "
                             f"{L} tokens; make the cache longer (init_cache max_len)")
        # eager: attend over the filled slots only (compiled: the whole cache, static shapes)
        table = params["embed"] if family == "llama" else params["wte"]
        llama.check_tokens(tokens, table.shape[0])
        if family == "gpt2" and end > params["wpe"].shape[0]:
            raise ValueError(f"position {end - 1} is beyond the model's {params['wpe'].shape[0]} "
                             "learned positions; shorten the prompt or the generation")
    if family == "llama":
        x = params["embed"][tokens]
        step, head = _llama_layer, params.get("lm_head", params["embed"])
    else:
        x = params["wte"][tokens] + params["wpe"][positions]
        step, head = _gpt2_layer, params["wte"]
    new_layers = []
    for p, c in zip(params["layers"], cache["layers"]):
        x, c = step(p, c, x, positions, cfg, inplace, end)
        new_layers.append(c)
    if family == "llama":
        x = rms_norm(x, params["norm"], cfg.norm_eps)
    else:
        x = gpt2._ln(x, params["ln_f_w"], params["ln_f_b"], cfg.norm_eps)
    return x @ head.T, {"layers": tuple(new_layers)}


__all__ = ["init_cache", "decode"]
