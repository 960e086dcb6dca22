"""ViT / DeiT image classifier (an encoder) as a pure function of a parameter tree.

Pre-LN blocks with BIDIRECTIONAL attention (q/k/v biases), exact (erf) GELU MLP, LayerNorm; a
patch embedding (the stride-``patch_size`` convolution, written as one matmul over flattened
patches), a CLS token (and DeiT's distillation token), learned positions, and a classifier on the
CLS token (DeiT with teacher: the mean of the CLS and distillation classifiers). The blocks use
GPT-2's leaf names and ``x @ W`` layout, so the coupled groups are GPT-2's:

    w_patch [C*p*p, D]  b_patch [D]   cls [D]  (dist [D])   pos [N + 1 (+1), D]
    layers[i]:
      ln1_w, ln1_b [D]   wq, wk [D, H, Dk]  bq, bk [H, Dk]   wv [D, H, Dv]  bv [H, Dv]
      wo [H, Dv, D]  bo [D]   ln2_w, ln2_b [D]   w_in [D, F]  b_in [F]  w_out [F, D]  b_out [D]
    ln_f_w, ln_f_b [D]   head_w [D, n_classes]  head_b [n_classes]   (dist_head_w, dist_head_b)

Images are [B, C, H, W] floats with H = W = image_size; N = (image_size / patch_size)^2 patches,
flattened row by row (as ``conv.flatten(2).transpose(1, 2)``), each patch as (channel, row, col).
Dk, Dv and F are read from the shapes, so pruned trees run through the same forward. There is no
causal decoding (``Family.decoder`` is False): ``ecospa.func.decode`` refuses this family.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ecospa.func._block import Sublayer, block, passthrough, run
from ecospa.func._layers import affine, attention
from ecospa.func.gpt2 import _ln, coupled_groups, qkv, unit_sizes
from ecospa.func.llama import check_fields


@dataclass(frozen=True)
class Config:
    """What the shapes cannot tell. ``head_dim`` is the ORIGINAL head dim (it fixes the scale).

    ``distillation``: DeiT's distillation token (after the CLS token). ``teacher_head``: DeiT
    with teacher (``DeiTForImageClassificationWithTeacher``): a second classifier on the
    distillation token, logits = the mean of both heads (needs ``distillation``).
    """

    image_size: int = 8
    patch_size: int = 4
    n_channels: int = 1
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 4
    ffn_dim: Optional[int] = None
    n_classes: int = 10
    norm_eps: float = 1e-12
    init_std: float = 0.02
    head_dim: Optional[int] = None
    distillation: bool = False
    teacher_head: bool = False
    name: str = field(default="vit", compare=False)

    def __post_init__(self):
        check_fields(self, ("image_size", "patch_size", "n_channels", "dim", "n_layers", "n_heads",
                            "n_classes"), ("ffn_dim", "head_dim"), ("norm_eps",))
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} must be a multiple of n_heads={self.n_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size} (the patches tile the image)")
        for k in ("distillation", "teacher_head"):
            if not isinstance(getattr(self, k), bool):
                raise ValueError(f"{k} must be True or False, got {getattr(self, k)!r}")
        if self.teacher_head and not self.distillation:
            raise ValueError("teacher_head=True needs distillation=True (the head reads the "
                             "distillation token)")
        if self.ffn_dim is None:
            object.__setattr__(self, "ffn_dim", 4 * self.dim)
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)

    @property
    def n_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: CLS (and DeiT's distillation token)."""
        return 1 + self.distillation

    @property
    def seq_len(self) -> int:
        return self.n_prefix + self.n_patches


def init(cfg: Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict:
    """Random parameters (normal(0, init_std) weights and biases, unit norms). Deterministic."""
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

    C, p = cfg.n_channels, cfg.patch_size
    params = {"w_patch": w(C * p * p, D), "b_patch": w(D), "cls": w(D)}
    if cfg.distillation:
        params["dist"] = w(D)
    params.update(pos=w(cfg.seq_len, D), layers=tuple(layer() for _ in range(cfg.n_layers)),
                  ln_f_w=torch.ones(D, dtype=dtype), ln_f_b=torch.zeros(D, dtype=dtype),
                  head_w=w(D, cfg.n_classes), head_b=w(cfg.n_classes))
    if cfg.teacher_head:
        params.update(dist_head_w=w(D, cfg.n_classes), dist_head_b=w(cfg.n_classes))
    return params


def _attn(p: dict, x: torch.Tensor, pos, cfg: Config, cache=None, **opts) -> tuple:
    if cache is not None:
        raise ValueError("ViT is an encoder (bidirectional attention): it has no key/value cache")
    q, k, v = qkv(p, _ln(x, p["ln1_w"], p["ln1_b"], cfg.norm_eps))  # [B, H, T, E]
    o = attention(q[:, :, None], k, v, cfg.head_dim ** -0.5, causal=False)  # [B, H, 1, T, Dv]
    return o[:, :, 0].transpose(1, 2).flatten(2), None  # [B, T, H*Dv]


def _mlp(p: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    x = _ln(x, p["ln2_w"], p["ln2_b"], cfg.norm_eps)
    return F.gelu(affine(x, p["w_in"], p["b_in"]))  # exact (erf) GELU, ViT's "gelu"


SUBLAYERS = (Sublayer("attn", _attn, "wo", "bo"), Sublayer("mlp", passthrough(_mlp), "w_out", "b_out"))
layer = block(SUBLAYERS)  # (p, x, pos, cfg, cache=None, **opts) -> (x, cache)


def check_images(images: torch.Tensor, cfg: Config) -> None:
    """ValueError unless ``images`` is a float tensor [B, n_channels, image_size, image_size]."""
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        kind = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a floating-point tensor [B, C, H, W], got {kind}")
    want = (cfg.n_channels, cfg.image_size, cfg.image_size)
    if images.ndim != 4 or tuple(images.shape[1:]) != want:
        raise ValueError(f"images must be [B, {want[0]}, {want[1]}, {want[2]}] (batch, channels, "
                         f"height, width: square, the model's image_size), got {list(images.shape)}")


def patches(images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """[B, C, S, S] -> [B, N, C*p*p]: patches row by row, each flattened as (channel, row, col)."""
    B, C, S = images.shape[0], cfg.n_channels, cfg.image_size
    p, n = cfg.patch_size, S // cfg.patch_size
    x = images.reshape(B, C, n, p, n, p).permute(0, 2, 4, 1, 3, 5)  # [B, n, n, C, p, p]
    return x.reshape(B, n * n, C * p * p)


def embed(params: dict, images: torch.Tensor, pos, cfg: Config) -> torch.Tensor:
    """Patch embeddings after the CLS (and distillation) token, plus learned positions:
    [B, seq_len, D]. ``pos`` must be None (an encoder sees the whole image at once)."""
    if pos is not None:
        raise ValueError("ViT is an encoder: it embeds whole images, not tokens at positions")
    check_images(images, cfg)
    x = affine(patches(images.to(params["w_patch"].dtype), cfg), params["w_patch"], params["b_patch"])
    prefix = [params["cls"]] + ([params["dist"]] if cfg.distillation else [])
    prefix = torch.stack(prefix).expand(x.shape[0], -1, -1)
    return torch.cat((prefix, x), dim=1) + params["pos"]


def final_norm(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    return _ln(x, params["ln_f_w"], params["ln_f_b"], cfg.norm_eps)


def head(params: dict, x: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, n_classes] from the last layer's output: the classifier on the CLS token (with
    a teacher head: the mean of it and the distillation classifier on the distillation token)."""
    x = final_norm(params, x, cfg)
    logits = affine(x[:, 0], params["head_w"], params["head_b"])
    if cfg.teacher_head:
        logits = (logits + affine(x[:, 1], params["dist_head_w"], params["dist_head_b"])) / 2
    return logits


def kv_dims(p: dict) -> tuple:
    """(H, 1, Dk, Dv) of one layer, read from its weights (the FLOP counter).

    ``train.flops.forward_flops(params, "vit", B, cfg.seq_len)`` counts the blocks exactly; its
    "head" term is here the patch projection (``embed_leaf`` = ``w_patch``) over every token,
    i.e. it also counts the CLS/distillation tokens' share (1-2 of ``seq_len``) and leaves out the
    classifier (D x n_classes per image): both small next to the blocks."""
    return p["wk"].shape[1], 1, p["wk"].shape[2], p["wv"].shape[2]


def hidden(params: dict, images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Final hidden states [B, seq_len, D] (CLS first) for images [B, C, S, S]."""
    return run(embed, layer, final_norm, params, images, cfg)[0]


def forward(params: dict, images: torch.Tensor, cfg: Config) -> torch.Tensor:
    """Logits [B, n_classes] for images [B, C, S, S]. Pure; sizes come from the shapes.

    Example: ``logits = vit.forward(vit.init(cfg), torch.zeros(2, 1, 8, 8), cfg)``
    """
    return run(embed, layer, head, params, images, cfg)[0]


__all__ = ["Config", "init", "forward", "embed", "head", "layer", "SUBLAYERS", "kv_dims", "hidden",
           "unit_sizes", "coupled_groups", "patches", "check_images"]
