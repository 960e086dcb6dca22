"""LLaMA-style decoder as a pure function of a parameter tree.

RMSNorm, rotate-half RoPE, grouped-query attention (MHA when n_kv_heads == n_heads, MQA when 1),
SwiGLU MLP, tied or untied embeddings. Weights are stored in ``x @ W`` layout with explicit head
axes so that coupled units are plain tensor axes:

    embed    [V, D]                     lm_head [V, D] (absent when tied: embed is used twice)
    layers[i]:
      attn_norm [D]      wq [D, Hkv, G, 2, P]   wk [D, Hkv, 2, P]   inv_freq [Hkv, P]
      wv [D, Hkv, Dv]    wo [Hkv, G, Dv, D]     (bq [Hkv, G, 2, P], bk [Hkv, 2, P], bv [Hkv, Dv])
      mlp_norm [D]       w_gate [D, F]  w_up [D, F]  w_down [F, D]
      (Qwen3, ``qk_norm``: q_norm [head_dim], k_norm [head_dim], per-head RMSNorm before RoPE)
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

from ecospa.func._block import Sublayer, attend, block, passthrough, run
from ecospa.func._layers import project, rms_norm, rope_tables, rotate_pairs
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
    rope_scaling: Optional[tuple] = None  # RoPE frequency scaling (see ``inv_freq``); a dict is accepted
    qk_norm: bool = False  # Qwen3: RMSNorm of each query/key head over the ORIGINAL head_dim, before RoPE
    name: str = field(default="llama", compare=False)

    def __post_init__(self):
        check_fields(self, ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"),
                     ("n_kv_heads", "head_dim"), ("norm_eps", "rope_theta"))
        object.__setattr__(self, "rope_scaling", _check_rope_scaling(self.rope_scaling))
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


ROPE_TYPES = {  # rope_type -> the parameters it needs (besides rope_type)
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "factors": ("factors",),  # llama.cpp's rope_freqs: frequency i divided by factors[i]
}


def _check_rope_scaling(spec) -> Optional[tuple]:
    """None (plain RoPE) or the scaling as sorted (key, value) pairs (hashable, JSON-safe via
    lists); ValueError naming what is wrong. Accepts a dict, pairs, or None/"default"."""
    if spec is None:
        return None
    try:
        d = dict(spec)
    except (TypeError, ValueError):
        raise ValueError(f"rope_scaling must be a dict like {{'rope_type': 'llama3', 'factor': 8.0, "
                         f"...}} or None, got {spec!r}") from None
    kind = d.get("rope_type", d.get("type", "default"))
    d.pop("type", None)
    if kind in (None, "default"):
        return None
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope type {kind!r} is not implemented (supported: default, "
                         f"{', '.join(ROPE_TYPES)}); ecospa cannot reproduce this model's positions")
    out = {"rope_type": kind}
    for key in ROPE_TYPES[kind]:
        v = d.get(key)
        if key == "factors":
            v = tuple(float(f) for f in v) if isinstance(v, (list, tuple)) else v
            if not isinstance(v, tuple) or not v or not all(math.isfinite(f) and f > 0 for f in v):
                raise ValueError(f"rope_scaling 'factors' must be a non-empty list of numbers > 0, got {v!r}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise ValueError(f"rope_scaling {kind!r} needs {key!r} as a number > 0, got {v!r}")
        out[key] = v
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError("rope_scaling llama3 needs high_freq_factor > low_freq_factor, got "
                         f"{out['high_freq_factor']} and {out['low_freq_factor']}")
    return tuple(sorted(out.items()))


def inv_freq(cfg: Config) -> torch.Tensor:
    """The rotary frequencies of one head, [head_dim / 2], float32 like transformers, with the
    config's scaling applied (``linear``: all divided by ``factor``; ``llama3``: long wavelengths
    divided by ``factor``, short ones kept, a smooth blend between; ``factors``: divided pair by
    pair, as llama.cpp's ``rope_freqs``). A pruned layer keeps these ORIGINAL (scaled) values of
    its kept pairs in its ``inv_freq`` leaf."""
    base = 1.0 / cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32)
                                    / cfg.head_dim)
    spec = dict(cfg.rope_scaling or ())
    kind = spec.get("rope_type")
    if kind is None:
        return base
    if kind == "linear":
        return base / spec["factor"]
    if kind == "factors":
        factors = torch.tensor(spec["factors"], dtype=torch.float32)
        if factors.shape != base.shape:
            raise ValueError(f"rope_scaling has {factors.numel()} factors for {base.numel()} rotary pairs")
        return base / factors
    # llama3 (as transformers' _compute_llama3_parameters, in float32)
    factor, lo, hi = spec["factor"], spec["low_freq_factor"], spec["high_freq_factor"]
    old = spec["original_max_position_embeddings"]
    wavelen = 2 * math.pi / base
    scaled = torch.where(wavelen > old / lo, base / factor, base)
    smooth = (old / wavelen - lo) / (hi - lo)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
    return torch.where(medium, blended, scaled)


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
        if cfg.qk_norm:  # one [head_dim] weight shared by every head, as in Qwen3 (never pruned)
            p.update(q_norm=torch.ones(cfg.head_dim, dtype=dtype), k_norm=torch.ones(cfg.head_dim, dtype=dtype))
        return p

    params = {"embed": w(cfg.vocab_size, D), "layers": tuple(layer() for _ in range(cfg.n_layers)),
              "norm": torch.ones(D, dtype=dtype)}
    if not cfg.tie_embeddings:
        params["lm_head"] = w(cfg.vocab_size, D)
    return params


def kept_slots(p: dict, cfg: Config) -> torch.Tensor:
    """The original rotary slot [Hkv, P] of each kept pair of a layer, read from its frequencies
    (each kept pair carries its original frequency in ``inv_freq``): arange for a dense layer."""
    return _slot_distance(p, cfg).argmin(-1)


def _slot_distance(p: dict, cfg: Config) -> torch.Tensor:
    """|log f_kept - log f_original| [Hkv, P_kept, P] between each kept pair's frequency and
    every slot of the model's RoPE table (float64)."""
    full = inv_freq(cfg).to(p["inv_freq"].device)
    return (p["inv_freq"].double().log()[..., None] - full.double().log()).abs()


def head_norm(x: torch.Tensor, w: torch.Tensor, eps: float, head_dim: int) -> torch.Tensor:
    """Qwen3's per-head RMSNorm of x [..., 2, P] (a head's kept pairs) with weight w [..., 2, P]
    (the shared [head_dim] weight gathered at the head's kept slots).

    The mean square divides by the ORIGINAL ``head_dim``, not by the kept 2P: a removed pair
    is exactly a zero pair of the dense head, so the pruned layer computes what masking the
    dense one does (float32 like transformers, cast back)."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    ms = xf.pow(2).sum(dim=(-2, -1), keepdim=True) / head_dim
    return w * (xf * torch.rsqrt(ms + eps)).to(x.dtype)


def qkv(p: dict, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cfg: Config) -> tuple:
    """Rotated q [B, Hkv, G, T, 2P], k [B, Hkv, T, 2P] and v [B, Hkv, T, Dv] of one layer, with
    the rotary tables cos/sin [Hkv, T, P] of the tokens' positions."""
    q, k, v = (project(x, p[w], p.get(b)) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))
    if "q_norm" in p:  # q [B, T, Hkv, G, 2, P], k [B, T, Hkv, 2, P]; weights [2, Hkv, P] -> [Hkv, 2, P]
        idx = kept_slots(p, cfg)
        wq, wk = (p[n].reshape(2, -1)[:, idx].transpose(0, 1) for n in ("q_norm", "k_norm"))
        q = head_norm(q, wq[:, None], cfg.norm_eps, cfg.head_dim)
        k = head_norm(k, wk, cfg.norm_eps, cfg.head_dim)
    q = q.permute(0, 2, 3, 1, 4, 5)  # [B, T, Hkv, G, 2, P] -> [B, Hkv, G, T, 2, P] (a view; the rotation writes it out)
    k = k.permute(0, 2, 1, 3, 4)  # [B, Hkv, T, 2, P]
    v = v.transpose(1, 2)  # [B, Hkv, T, Dv]
    q = rotate_pairs(q, cos[:, None], sin[:, None])
    k = rotate_pairs(k, cos, sin)
    q = rearrange(q, "b h g t r p -> b h g t (r p)")  # rotate-half order: all r=0, then r=1
    k = rearrange(k, "b h t r p -> b h t (r p)")
    return q, k, v


def _rope(p: dict, pos, T: int, dtype: torch.dtype) -> tuple:
    """cos/sin [Hkv, T, P] of the layer's kept frequencies at positions 0..T-1 (pos None: cached
    tables) or at the absolute positions ``pos`` [T] (decoding)."""
    if pos is None:
        return rope_tables(p["inv_freq"], T, dtype)
    inv = p["inv_freq"].to(torch.promote_types(p["inv_freq"].dtype, torch.float32))
    ang = pos.to(inv.dtype)[None, :, None] * inv[:, None, :]  # [Hkv, T, P]
    return ang.cos().to(dtype), ang.sin().to(dtype)


def _attn(p: dict, x: torch.Tensor, pos, cfg: Config, cache=None, **opts) -> tuple:
    x = rms_norm(x, p["attn_norm"], cfg.norm_eps)
    q, k, v = qkv(p, x, *_rope(p, pos, x.shape[1], x.dtype), cfg)
    return attend(q, k, v, cfg.head_dim ** -0.5, pos, cache, **opts)


def _mlp(p: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    x = rms_norm(x, p["mlp_norm"], cfg.norm_eps)
    return F.silu(x @ p["w_gate"]) * (x @ p["w_up"])


SUBLAYERS = (Sublayer("attn", _attn, "wo"), Sublayer("mlp", passthrough(_mlp), "w_down"))
layer = block(SUBLAYERS)  # (p, x, pos, cfg, cache=None, **opts) -> (x, cache)


def embed(params: dict, tokens: torch.Tensor, pos, cfg: Config) -> torch.Tensor:
    """Token embeddings [B, T, D] (ids in [0, vocab); ValueError otherwise). RoPE is in the layers."""
    check_tokens(tokens, params["embed"].shape[0])
    return params["embed"][tokens]


def final_norm(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return rms_norm(x, params["norm"], cfg.norm_eps)


def head(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, T, V] from the last layer's output (tied: the embedding is used twice)."""
    return final_norm(params, x, cfg) @ params.get("lm_head", params["embed"]).T


def kv_dims(p: dict) -> tuple:
    """(Hkv, G, Dk, Dv) of one layer, read from its weights: the cache and the FLOP counter."""
    _, h, g, _, n_pairs = p["wq"].shape
    return h, g, 2 * n_pairs, p["wv"].shape[2]


def hidden(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Final hidden states [B, T, D] for tokens [B, T] (ids in [0, vocab); ValueError otherwise)."""
    return run(embed, layer, final_norm, params, tokens, cfg)[0]


def forward(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, T, V] for tokens [B, T]. Pure; sizes come from the tensors' shapes.

    Example: ``logits = llama.forward(llama.init(cfg), torch.zeros(1, 8, dtype=torch.long), cfg)``
    """
    return run(embed, layer, head, params, tokens, cfg)[0]


def unit_sizes(cfg: Config) -> dict:
    """Dense units per KV head: rotary pairs (qk) and value dims (vo)."""
    return {"qk": cfg.head_dim // 2, "vo": cfg.head_dim}


def slots(p: dict, cfg: Config) -> dict:
    """The original rotary slot [Hkv, P_kept] of each kept pair, found from its frequency in
    ``inv_freq`` (nearest in log space): padding puts each pair back where RoPE expects it."""
    d = _slot_distance(p, cfg)
    idx = d.argmin(-1)
    if bool((d.amin(-1) > 1e-4).any()):
        raise ValueError("a layer's inv_freq holds frequencies that are not in the model's RoPE "
                         "table (rope_theta/head_dim in the config do not match the weights)")
    for row in idx:
        if row.unique().numel() != row.numel():
            raise ValueError("two kept rotary pairs of one head map to the same frequency slot")
    return {"qk": idx}


def dense_buffers(p: dict, cfg: Config, slots: dict) -> dict:
    """The unpruned value of the layer's buffers: every head's full frequency table."""
    full = inv_freq(cfg).to(p["inv_freq"])
    return {"inv_freq": full.expand(p["inv_freq"].shape[0], full.shape[0]).clone()}


def coupled_groups(cfg: Config) -> tuple:
    """qk, vo and mlp groups of every layer (see ``ecospa.groups``).

    qk: unit = rotary pair p of KV head h: wq[:, h, :, :, p] (all G query heads), wk[:, h, :, p],
        the biases, and inv_freq[h, p] (sliced, never masked). Qwen3's q/k norms are one shared
        [head_dim] weight, never pruned: each head reads it at its kept pairs' slots (from
        inv_freq), and its divisor stays the original head_dim (a masked pair is zero).
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
        groups += [Group(f"layers.{i}.qk", "qk", tuple(qk), sides_agree=not cfg.qk_norm),
                   Group(f"layers.{i}.vo", "vo", tuple(vo)),
                   Group(f"layers.{i}.mlp", "mlp", tuple(mlp))]
    return tuple(groups)
