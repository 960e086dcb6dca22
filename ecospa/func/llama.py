"""LLaMA-style decoder as a pure function of a parameter tree.

RMSNorm, rotate-half RoPE, grouped-query attention (MHA when n_kv_heads == n_heads, MQA when 1),
SwiGLU MLP, tied or untied embeddings. Weights are stored in ``x @ W`` layout with explicit head
axes so that coupled units are plain tensor axes:

    embed    [V, D]                     lm_head [V, D] (absent when tied: embed is used twice)
    layers[i]:
      attn_norm [D]      wq [D, Hkv, G, 2, P]   wk [D, Hkv, 2, P]   inv_freq [Hkv, P]
      wv [D, Hkv, Dv]    wo [Hkv, G, Dv, D]     (bq [Hkv, G, 2, P], bk [Hkv, 2, P], bv [Hkv, Dv])
      mlp_norm [D]       w_gate [D, F]  w_up [D, F]  w_down [F, D]
    norm [D]

G = query heads per KV head; P = rotary pairs per head (head_dim / 2). Axis 3 of wq (2) holds
the two halves of the rotate-half layout, so the rotary pair p is (wq[..., 0, p], wq[..., 1, p]).
The forward reads P, Dv and F from the shapes, so pruned trees (with sizes that differ per layer)
run through the same function. Each layer carries the frequencies of its kept rotary pairs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from ecospa.func._layers import attention, merge_heads, project, rms_norm, rope_tables, rotate_pairs
from ecospa.groups import Group, Member


@dataclass(frozen=True)
class Config:
    """What the shapes cannot tell. ``head_dim`` is the ORIGINAL head dim (it fixes the scale)."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: Optional[int] = None
    ffn_dim: int = 172
    head_dim: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    attention_bias: bool = False
    max_seq_len: int = 2048
    init_std: float = 0.02
    name: str = field(default="llama", compare=False)

    def __post_init__(self):
        check_fields(self, ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"),
                     ("n_kv_heads", "head_dim"), ("norm_eps", "rope_theta"))
        kv = self.n_heads if self.n_kv_heads is None else self.n_kv_heads
        hd = self.dim // self.n_heads if self.head_dim is None else self.head_dim
        object.__setattr__(self, "n_kv_heads", kv)
        object.__setattr__(self, "head_dim", hd)
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={kv}")
        if hd % 2 or hd < 2:
            raise ValueError(f"head_dim={hd} must be even: RoPE rotates dims in pairs")


def check_fields(cfg, counts: tuple, optional_counts: tuple = (), positive: tuple = ()) -> None:
    """ValueError naming the field unless every count is a whole number >= 1 (None allowed for
    ``optional_counts``) and every ``positive`` field a finite number > 0."""
    for k in counts + optional_counts:
        v = getattr(cfg, k)
        if v is None and k in optional_counts:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{k} must be a whole number >= 1, got {v!r}")
    for k in positive:
        v = getattr(cfg, k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"{k} must be a finite number > 0, got {v!r}")


def _is_batched(x: torch.Tensor) -> bool:
    try:
        return bool(torch._C._functorch.is_batchedtensor(x))
    except (AttributeError, RuntimeError):
        return False


def check_tokens(tokens: torch.Tensor, vocab: int) -> None:
    """ValueError unless ``tokens`` are integer ids in [0, vocab): a negative id would silently
    index from the end of the embedding. Skipped while torch.compile traces (no graph break);
    on accelerators an asynchronous device assert (no host sync)."""
    if torch.compiler.is_compiling():
        return
    if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be integer ids, got dtype {tokens.dtype}")
    if tokens.numel() == 0 or tokens.device.type == "meta" or _is_batched(tokens):
        return  # no values to check (shape inference, or under vmap: per-example slices)
    if tokens.device.type != "cpu":
        torch._assert_async(((tokens >= 0) & (tokens < vocab)).all(),
                            "token id out of range [0, vocab_size)")
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"token id {bad} is outside [0, {vocab}) (the model's vocabulary); "
                         "was the text encoded with another tokenizer?")


def inv_freq(cfg: Config) -> torch.Tensor:
    """The rotary frequencies of one head, [head_dim / 2], float32 like transformers."""
    return 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32)
                                    / cfg.head_dim)


def init(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random parameters (normal(0, init_std) weights, unit norms). Deterministic in ``seed``."""
    g = torch.Generator().manual_seed(seed)
    D, Hkv, P, F_ = cfg.dim, cfg.n_kv_heads, cfg.head_dim // 2, cfg.ffn_dim
    G = cfg.n_heads // Hkv

    def w(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * cfg.init_std).to(dtype)

    def layer():
        p = {"attn_norm": torch.ones(D, dtype=dtype),
             "wq": w(D, Hkv, G, 2, P), "wk": w(D, Hkv, 2, P), "wv": w(D, Hkv, 2 * P),
             "wo": w(Hkv, G, 2 * P, D), "inv_freq": inv_freq(cfg).expand(Hkv, P).clone(),
             "mlp_norm": torch.ones(D, dtype=dtype),
             "w_gate": w(D, F_), "w_up": w(D, F_), "w_down": w(F_, D)}
        if cfg.attention_bias:
            p.update(bq=w(Hkv, G, 2, P), bk=w(Hkv, 2, P), bv=w(Hkv, 2 * P))
        return p

    params = {"embed": w(cfg.vocab_size, D), "layers": tuple(layer() for _ in range(cfg.n_layers)),
              "norm": torch.ones(D, dtype=dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = w(cfg.vocab_size, D)
    return params


def qkv(p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple:
    """Rotated q [B, Hkv, G, T, 2P], k [B, Hkv, T, 2P] and v [B, Hkv, T, Dv] of one layer, with
    the rotary tables cos/sin [Hkv, T, P] of the tokens' positions (the forward and the decoder)."""
    q, k, v = (project(x, p[w], p.get(b)) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    q = q.permute(0, 2, 3, 1, 4, 5)  # [B, T, Hkv, G, 2, P] -> [B, Hkv, G, T, 2, P] (a view; the rotation writes it out)
    k = k.permute(0, 2, 1, 3, 4)  # [B, Hkv, T, 2, P]
    v = v.transpose(1, 2)  # [B, Hkv, T, Dv]
    q = rotate_pairs(q, cos[:, None], sin[:, None])
    k = rotate_pairs(k, cos, sin)
    q = rearrange(q, "b h g t r p -> b h g t (r p)")  # rotate-half order: all r=0, then r=1
    k = rearrange(k, "b h t r p -> b h t (r p)")
    return q, k, v


def _attention(p: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    cos, sin = rope_tables(p["inv_freq"], x.shape[1], x.dtype)  # [Hkv, T, P]
    q, k, v = qkv(p, x, cos, sin)
    o = attention(q, k, v, cfg.head_dim ** -0.5)  # [B, Hkv, G, T, Dv]
    return merge_heads(o, p["wo"])


def _mlp(p: dict, x: torch.Tensor) -> torch.Tensor:
    return (F.silu(x @ p["w_gate"]) * (x @ p["w_up"])) @ p["w_down"]


def hidden(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Final hidden states [B, T, D] for tokens [B, T] (ids in [0, vocab); ValueError otherwise)."""
    check_tokens(tokens, params["embed"].shape[0])
    x = params["embed"][tokens]  # [B, T, D]
    for p in params["layers"]:
        x = x + _attention(p, rms_norm(x, p["attn_norm"], cfg.norm_eps), cfg)
        x = x + _mlp(p, rms_norm(x, p["mlp_norm"], cfg.norm_eps))
    return rms_norm(x, params["norm"], cfg.norm_eps)


def forward(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, T, V] for tokens [B, T]. Pure; sizes come from the tensors' shapes.

    Example: ``logits = llama.forward(llama.init(cfg), torch.zeros(1, 8, dtype=torch.long), cfg)``
    """
    head = params.get("lm_head", params["embed"])  # tied: one leaf used twice
    return hidden(params, tokens, cfg) @ head.T


def coupled_groups(cfg: Config) -> tuple:
    """qk, vo and mlp groups of every layer (see ``ecospa.groups``).

    qk: unit = rotary pair p of KV head h: wq[:, h, :, :, p] (all G query heads), wk[:, h, :, p],
        the biases, and inv_freq[h, p] (sliced, never masked).
    vo: unit = value dim e of KV head h: wv[:, h, e] and wo[h, :, e, :] (all G query heads).
    mlp: unit = hidden neuron j: w_gate[:, j], w_up[:, j], w_down[j, :].
    """
    groups = []
    for i in range(cfg.n_layers):
        L = ("layers", i)
        qk = [Member(L + ("wq",), 4, 1, "a"), Member(L + ("wk",), 3, 1, "b"),
              Member(L + ("inv_freq",), 1, 0, None, masked=False)]
        vo = [Member(L + ("wv",), 2, 1, "a"), Member(L + ("wo",), 2, 0, "b")]
        if cfg.attention_bias:
            qk += [Member(L + ("bq",), 3, 0, "a"), Member(L + ("bk",), 2, 0, "b")]
            vo += [Member(L + ("bv",), 1, 0, "a")]
        mlp = [Member(L + ("w_gate",), 1), Member(L + ("w_up",), 1, None, "a"),
               Member(L + ("w_down",), 0, None, "b")]
        groups += [Group(f"layers.{i}.qk", "qk", tuple(qk)), Group(f"layers.{i}.vo", "vo", tuple(vo)),
                   Group(f"layers.{i}.mlp", "mlp", tuple(mlp))]
    return tuple(groups)
