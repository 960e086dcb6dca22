"""Pure building blocks shared by the model families."""
from __future__ import annotations

import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from einops import rearrange


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 like the reference implementations, cast back."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] @ w [D, N] (+ b [N]) as one matmul over the flattened leading axes; the bias
    fused into it (addmm, like nn.Linear) instead of a separate pass over the output."""
    if b is None:
        return x @ w
    return torch.addmm(b, x.flatten(0, -2), w).unflatten(0, x.shape[:-1])


def project(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., D] @ w [D, *S] (+ b [*S]) -> [..., *S] as ONE matmul on the flattened weight (a view
    of the coupled layout, no copy): the kernel a dense nn.Linear runs, instead of einsum's
    batched matmul and permute copies."""
    return affine(x, w.flatten(1), None if b is None else b.flatten()).unflatten(-1, w.shape[1:])


def merge_heads(o: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """Output projection: o [B, *H, T, E] (head axes *H, then tokens, then head dim) with
    w [*H, E, D] (+ b [D]) -> [B, T, D], one matmul over the flattened heads (like o_proj)."""
    nh = w.ndim - 2
    o = o.movedim(nh + 1, 1)  # [B, T, *H, E]
    return affine(o.flatten(2), w.flatten(0, nh), b)


def _rope_tables(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype):
    inv_freq = inv_freq.to(torch.promote_types(inv_freq.dtype, torch.float32))  # angles >= fp32
    pos = torch.arange(seq_len, device=inv_freq.device, dtype=inv_freq.dtype)
    ang = pos[None, :, None] * inv_freq[:, None, :]  # [n_kv, T, P]
    return ang.cos().to(dtype), ang.sin().to(dtype)


_ROPE_CACHE: "OrderedDict[int, tuple]" = OrderedDict()
_ROPE_CACHE_SIZE = 256  # entries (one per layer and length); tables are small


def _cacheable(t: torch.Tensor) -> bool:
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled() or t.requires_grad:
        return False
    try:  # under torch.func transforms (grad, vmap) the tensor is a wrapper: recompute
        return not torch._C._functorch.is_functorch_wrapped_tensor(t)
    except (AttributeError, RuntimeError):  # pragma: no cover
        return False


def rope_tables(inv_freq: torch.Tensor, seq_len: int, dtype: torch.dtype):
    """cos/sin [n_kv, T, P] from per-head kept frequencies inv_freq [n_kv, P].

    Eager calls on a plain tensor reuse the tables of the last call with the same tensor (same
    object, unmodified: its version counter), length and dtype, instead of rebuilding them in
    every layer of every forward. Traced (torch.compile) and transformed (grad, vmap) calls
    compute them: there they are part of the graph.
    """
    if not _cacheable(inv_freq):
        return _rope_tables(inv_freq, seq_len, dtype)
    key = (id(inv_freq), seq_len, dtype)
    hit = _ROPE_CACHE.get(key)
    if hit is not None and hit[0]() is inv_freq and hit[1] == inv_freq._version:
        _ROPE_CACHE.move_to_end(key)
        return hit[2]
    with torch.no_grad():
        tables = _rope_tables(inv_freq, seq_len, dtype)
    _ROPE_CACHE[key] = (weakref.ref(inv_freq), inv_freq._version, tables)
    while len(_ROPE_CACHE) > _ROPE_CACHE_SIZE:
        _ROPE_CACHE.popitem(last=False)
    return tables


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on x [..., T, 2, P] where pair p is (x[..., 0, p], x[..., 1, p])."""
    x0, x1 = x.unbind(-2)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
              causal: bool = True) -> torch.Tensor:
    """Causal (or, with ``causal=False``, bidirectional: encoders such as ViT) attention.
    q [B, Hkv, G, T, dk], k [B, Hkv, T, dk], v [B, Hkv, T, dv].

    Returns [B, Hkv, G, T, dv]. ``scale`` is fixed by the ORIGINAL head dim so a pruned model
    computes exactly what the masked dense one does.
    """
    B, H, G, T, dk = q.shape
    q = rearrange(q, "b h g t d -> b (h g) t d")
    gqa = True if G > 1 else False  # noqa: SIM210 (a Python bool: G may be a SymInt when compiled dynamic)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                         enable_gqa=gqa)  # [B, H*G, T, dv]
    return rearrange(out, "b (h g) t d -> b h g t d", g=G)
