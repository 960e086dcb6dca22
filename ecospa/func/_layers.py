"""Pure building blocks shared by the model families."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 like the reference implementations, cast back."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def rope_tables(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype):
    """cos/sin [n_kv, T, P] from per-head kept frequencies inv_freq [n_kv, P]."""
    inv_freq = inv_freq.to(torch.promote_types(inv_freq.dtype, torch.float32))  # angles >= fp32
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
    ang = pos[None, :, None] * inv_freq[:, None, :]  # [n_kv, T, P]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., T, 2, P] where pair p is (x[..., 0, p], x[..., 1, p])."""
    x0, x1 = x.unbind(-2)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention. q [B, Hkv, G, T, dk], k [B, Hkv, T, dk], v [B, Hkv, T, dv].

    Returns [B, Hkv, G, T, dv]. ``scale`` is fixed by the ORIGINAL head dim so a pruned model
    computes exactly what the masked dense one does.
    """
    B, H, G, T, dk = q.shape
    q = rearrange(q, "b h g t d -> b (h g) t d")
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                         enable_gqa=G > 1)  # [B, H*G, T, dv]
    return rearrange(out, "b (h g) t d -> b h g t d", g=G)
