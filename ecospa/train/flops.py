"""Training FLOPs counted from the shapes a step actually uses (pure; no tensors are touched).

Convention (the usual "6N" accounting, made exact for pruned shapes):
- one multiply-add = 2 FLOPs;
- forward matmul FLOPs per token = 2 x (entries of every projection matrix of every layer:
  the family's ``matmuls``, e.g. llama wq wk wv wo w_gate w_up w_down) + 2 x vocab x dim for
  the output head (tied or not); the embedding lookup counts 0;
- attention per sequence and layer = 2 T^2 (n_heads x qk dim) for the scores q k^T plus
  2 T^2 (n_heads x v dim) for probs @ v, over the full T x T square (the causal mask is not
  discounted; that is what a dense SDPA kernel computes); qk / v dims are the KEPT ones;
- biases, norms, RoPE, softmax, the loss and the optimizer update are not counted (O(params) or
  O(T) per token, <1% at these shapes);
- a training step (forward + backward) = 3 x forward.
Because the counts read the current parameter shapes, a pruned model is counted at its pruned
size from the step after the round.
"""
from __future__ import annotations

from typing import Mapping

from ecospa.func.families import family as _family


def _shape(x) -> tuple:
    return tuple(x.shape)


def _numel(shape: tuple) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layer_dims(layer: Mapping, fam) -> tuple:
    """(matmul weight entries, n_heads * qk dim, n_heads * v dim) of one layer."""
    mat = sum(_numel(_shape(layer[k])) for k in fam.matmuls)
    h, g, dk, dv = fam.kv_dims(layer)
    return mat, h * g * dk, h * g * dv


def forward_flops(params: Mapping, family: str, batch_size: int, seq_len: int) -> int:
    """FLOPs of one forward pass over ``batch_size`` sequences of ``seq_len`` tokens."""
    fam = _family(family)
    tokens = batch_size * seq_len
    embed = _shape(params[fam.embed_leaf])
    head = _shape(params["lm_head"]) if "lm_head" in params else embed  # [V, D]
    total = 2 * tokens * _numel(head)
    for layer in params["layers"]:
        mat, qk, v = _layer_dims(layer, fam)
        total += 2 * tokens * mat + 2 * batch_size * seq_len * seq_len * (qk + v)
    return total


def train_step_flops(params: Mapping, family: str, batch_size: int, seq_len: int) -> int:
    """FLOPs of one training step (forward + backward = 3 x forward) at ``params``' shapes."""
    return 3 * forward_flops(params, family, batch_size, seq_len)


__all__ = ["forward_flops", "train_step_flops"]
