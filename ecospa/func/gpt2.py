"""GPT-2-style decoder as a pure function of a parameter tree.

LayerNorm, learned positions, GELU (tanh) MLP, biases on every projection, tied embeddings.
Weights in ``x @ W`` layout with explicit head axes:

    wte [V, D] (also the LM head)   wpe [T_max, D]   ln_f_w, ln_f_b [D]
    layers[i]:
      ln1_w, ln1_b [D]   wq, wk [D, H, Dk]  bq, bk [H, Dk]   wv [D, H, Dv]  bv [H, Dv]
      wo [H, Dv, D]  bo [D]   ln2_w, ln2_b [D]   w_in [D, F]  b_in [F]  w_out [F, D]  b_out [D]

Dk, Dv and F are read from the shapes, so pruned trees run through the same forward.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ecospa.func._block import Sublayer, attend, block, passthrough, run
from ecospa.func._layers import affine, project
from ecospa.func.llama import check_fields, check_tokens
from ecospa.groups import Group, Member


@dataclass(frozen=True)
class Config:
    """What the shapes cannot tell. ``head_dim`` is the ORIGINAL head dim (it fixes the scale)."""

    vocab_size: int = 256
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: Optional[int] = None
    max_seq_len: int = 1024
    norm_eps: float = 1e-5
    init_std: float = 0.02
    head_dim: Optional[int] = None
    name: str = field(default="gpt2", compare=False)

    def __post_init__(self):
        check_fields(self, ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"),
                     ("ffn_dim", "head_dim"), ("norm_eps",))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 4 * self.dim)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        for k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")


def init(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random parameters (normal(0, init_std) weights and biases near zero, unit norms)."""
    g = torch.Generator().manual_seed(seed)
    D, H, E, F_ = cfg.dim, cfg.n_heads, cfg.head_dim, cfg.ffn_dim

    def w(*shape):
        return (torch.randn(*shape, generator=g, dtype=torch.float32) * cfg.init_std).to(dtype)

    def layer():
        return {"ln1_w": torch.ones(D, dtype=dtype), "ln1_b": torch.zeros(D, dtype=dtype),
                "wq": w(D, H, E), "bq": w(H, E), "wk": w(D, H, E), "bk": w(H, E),
                "wv": w(D, H, E), "bv": w(H, E), "wo": w(H, E, D), "bo": w(D),
                "ln2_w": torch.ones(D, dtype=dtype), "ln2_b": torch.zeros(D, dtype=dtype),
                "w_in": w(D, F_), "b_in": w(F_), "w_out": w(F_, D), "b_out": w(D)}

    return {"wte": w(cfg.vocab_size, D), "wpe": w(cfg.max_seq_len, D),
            "layers": tuple(layer() for _ in range(cfg.n_layers)),
            "ln_f_w": torch.ones(D, dtype=dtype), "ln_f_b": torch.zeros(D, dtype=dtype)}


def qkv(p: dict, x: torch.Tensor) -> tuple:
    """q, k [B, H, T, Dk] and v [B, H, T, Dv] of one layer."""
    return tuple(project(x, p[w], p[b]).transpose(1, 2) for w, b in (("wq", "bq"), ("wk", "bk"), ("wv", "bv")))


def _ln(x, w, b, eps):
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _attn(p: dict, x: torch.Tensor, pos, cfg: Config, cache=None, **opts) -> tuple:
    q, k, v = qkv(p, _ln(x, p["ln1_w"], p["ln1_b"], cfg.norm_eps))
    return attend(q[:, :, None], k, v, cfg.head_dim ** -0.5, pos, cache, **opts)  # one query head per KV head


def _mlp(p: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    x = _ln(x, p["ln2_w"], p["ln2_b"], cfg.norm_eps)
    return F.gelu(affine(x, p["w_in"], p["b_in"]), approximate="tanh")


SUBLAYERS = (Sublayer("attn", _attn, "wo", "bo"), Sublayer("mlp", passthrough(_mlp), "w_out", "b_out"))
layer = block(SUBLAYERS)  # (p, x, pos, cfg, cache=None, **opts) -> (x, cache)


def embed(params: dict, tokens: torch.Tensor, pos, cfg: Config) -> torch.Tensor:
    """Token + learned position embeddings [B, T, D] (positions 0..T-1, or ``pos`` [T])."""
    T = tokens.shape[1]
    check_tokens(tokens, params["wte"].shape[0])
    n = params["wpe"].shape[0]
    if pos is None:
        if T > n:
            raise ValueError(f"{T} tokens exceed the model's {n} learned positions (max_seq_len); "
                             "use shorter sequences")
        return params["wte"][tokens] + params["wpe"][:T]
    if not torch.compiler.is_compiling() and int(pos[-1]) >= n:
        raise ValueError(f"position {int(pos[-1])} is beyond the model's {n} learned positions; "
                         "shorten the prompt or the generation")
    return params["wte"][tokens] + params["wpe"][pos]


def final_norm(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return _ln(x, params["ln_f_w"], params["ln_f_b"], cfg.norm_eps)


def head(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, T, V] from the last layer's output (tied: ``wte`` is used twice)."""
    return final_norm(params, x, cfg) @ params["wte"].T


def kv_dims(p: dict) -> tuple:
    """(H, 1, Dk, Dv) of one layer, read from its weights: the cache and the FLOP counter."""
    return p["wk"].shape[1], 1, p["wk"].shape[2], p["wv"].shape[2]


def hidden(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Final hidden states [B, T, D] for tokens [B, T]."""
    return run(embed, layer, final_norm, params, tokens, cfg)[0]


def forward(params: dict, tokens: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, T, V] for tokens [B, T] (T <= max_seq_len). Pure; sizes from the shapes."""
    return run(embed, layer, head, params, tokens, cfg)[0]


def unit_sizes(cfg: Config) -> dict:
    """Dense units per head: query/key dims (qk) and value dims (vo)."""
    return {"qk": cfg.head_dim, "vo": cfg.head_dim}


def coupled_groups(cfg: Config) -> tuple:
    """qk, vo and mlp groups of every layer; biases go with their columns.

    The MLP's input side is behind GELU, so only its output side (w_out) is a linear factor.
    """
    groups = []
    for i in range(cfg.n_layers):
        L = ("layers", i)
        qk = (Member(L + ("wq",), 2, 1, "a"), Member(L + ("bq",), 1, 0, "a"),
              Member(L + ("wk",), 2, 1, "b"), Member(L + ("bk",), 1, 0, "b"))
        vo = (Member(L + ("wv",), 2, 1, "a"), Member(L + ("bv",), 1, 0, "a"),
              Member(L + ("wo",), 1, 0, "b"))
        mlp = (Member(L + ("w_in",), 1), Member(L + ("b_in",), 0), Member(L + ("w_out",), 0, None, "b"))
        groups += [Group(f"layers.{i}.qk", "qk", qk), Group(f"layers.{i}.vo", "vo", vo),
                   Group(f"layers.{i}.mlp", "mlp", mlp)]
    return tuple(groups)
