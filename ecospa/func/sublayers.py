"""Each family's blocks as residual sublayers ending in one output projection.

A block is ``x -> x + inner(p, x) @ W_out (+ b_out)`` twice (attention, then MLP), where
``inner`` is everything up to the output projection: the attention output of every query head
(flattened to [B, T, K]), or the MLP's hidden activation [B, T, F]. ``W_out``'s leading axes
flatten to K in the same order. Layer-wise reconstruction (``ecospa.func.reconstruct``) runs the
model one sublayer at a time through these; ``test_sublayers`` checks that running them in order
is exactly the family's forward.

    x = embed(params, tokens, cfg)
    for p in params["layers"]:
        for s in SUBLAYERS[family]:
            x = x + s.apply(p, s.inner(p, x, cfg))
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from ecospa.func import gpt2, llama
from ecospa.func._layers import attention, rms_norm, rope_tables


@dataclass(frozen=True)
class Sublayer:
    """One residual branch: ``inner`` [B, T, K], then the output projection ``out`` (+ ``bias``)."""

    name: str                  # "attn" or "mlp"
    inner: Callable            # (layer params, x [B, T, D], cfg) -> [B, T, K]
    out: str                   # output weight leaf; its leading axes flatten to K, last is D
    bias: Optional[str] = None  # output bias leaf [D], if the family has one

    def weight(self, p: dict) -> torch.Tensor:
        """The output projection as a [K, D] matrix (a view of the leaf)."""
        w = p[self.out]
        return w.reshape(-1, w.shape[-1])

    def apply(self, p: dict, h: torch.Tensor) -> torch.Tensor:
        y = h @ self.weight(p)
        return y + p[self.bias] if self.bias else y


def _llama_attn(p, x, cfg):
    x = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    cos, sin = rope_tables(p["inv_freq"], x.shape[1], x.dtype)
    o = attention(*llama.qkv(p, x, cos, sin), cfg.head_dim ** -0.5)  # [B, Hkv, G, T, Dv]
    return rearrange(o, "b h g t e -> b t (h g e)")


def _llama_mlp(p, x, cfg):
    x = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    return F.silu(x @ p["w_gate"]) * (x @ p["w_up"])


def _gpt2_attn(p, x, cfg):
    q, k, v = gpt2.qkv(p, gpt2._ln(x, p["ln1_w"], p["ln1_b"], cfg.norm_eps))
    o = attention(q[:, :, None], k, v, cfg.head_dim ** -0.5)[:, :, 0]  # [B, H, T, Dv]
    return rearrange(o, "b h t e -> b t (h e)")


def _gpt2_mlp(p, x, cfg):
    x = gpt2._ln(x, p["ln2_w"], p["ln2_b"], cfg.norm_eps)
    return F.gelu(x @ p["w_in"] + p["b_in"], approximate="tanh")


def _llama_embed(params, tokens, cfg):
    llama.check_tokens(tokens, params["embed"].shape[0])
    return params["embed"][tokens]


def _gpt2_embed(params, tokens, cfg):
    gpt2.check_tokens(tokens, params["wte"].shape[0])
    return params["wte"][tokens] + params["wpe"][: tokens.shape[1]]


SUBLAYERS = {
    "llama": (Sublayer("attn", _llama_attn, "wo"), Sublayer("mlp", _llama_mlp, "w_down")),
    "gpt2": (Sublayer("attn", _gpt2_attn, "wo", "bo"), Sublayer("mlp", _gpt2_mlp, "w_out", "b_out")),
}
EMBED = {"llama": _llama_embed, "gpt2": _gpt2_embed}

__all__ = ["Sublayer", "SUBLAYERS", "EMBED"]
