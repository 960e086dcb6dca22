"""Gradients of a next-token loss one layer at a time: the activation memory of ONE layer.

``torch.func.grad`` of a whole forward keeps every layer's activations (attention scores, MLP
hidden states, norms) until the backward pass reaches them, and the [B, T, V] logits with their
softmax: at SmolLM2-135M's shapes that is about as much memory as the model itself. This driver
keeps only what crosses a layer boundary:

    x_0 = embed(tokens); x_{l+1} = layer_l(x_l)          (no graph kept, only the L+1 boundaries)
    g_L = dLoss/dx_L                                      (the head, a few tokens at a time)
    for l = L-1 .. 0:  grads_l, g_l = vjp(layer_l at x_l)(g_{l+1})   (the layer is run again)

so one layer's forward is recomputed (the classic block recompute) and the peak holds the L+1
boundary activations [B, T, D], one layer's graph and ``head_chunk`` tokens' logits. The result
is the gradient of the same loss, up to float summation order (tested against
``torch.func.grad``). Only the gradients of the layer leaves named in ``reads`` are kept; the
gradient of the embedding, the final norm and the head is not computed (calibration reads the
coupled groups' members, which live in the layers).

Family-agnostic: it reads only the ``Family`` record (embed, layer, head).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import optree
import torch
import torch.nn.functional as F

from ecospa._types import Params

HEAD_CHUNK = 128  # tokens per head chunk: [B, 128, V] logits (and their gradient) at a time


def layer_reads(reads: Optional[Sequence]) -> Optional[dict]:
    """{layer index: leaf names} for ``reads`` (leaf paths), or None when a path is not a layer
    leaf ("layers", i, name): such a gradient needs the whole backward pass."""
    if reads is None:
        return None
    out: dict = {}
    for path in reads:
        path = tuple(path)
        if len(path) != 3 or path[0] != "layers" or not isinstance(path[1], int):
            return None
        out.setdefault(path[1], set()).add(path[2])
    return out


def lm_layer_grads(fam, cfg, reads: Sequence, head_chunk: int = HEAD_CHUNK) -> Callable:
    """``grad_fn(params, batch [B, T+1]) -> grads``: the gradient of ``lm_loss`` (mean next-token
    cross-entropy, float32) with respect to the layer leaves in ``reads`` (paths
    ("layers", i, name)), in a tree of the params' structure with None at every other leaf.

    The same values as ``torch.func.grad(lm_loss(fam.forward, cfg))`` restricted to ``reads``
    (up to summation order), with the activation memory of one layer (see the module docstring).
    ``head_chunk``: tokens whose logits are materialized at a time (the loss is a mean over
    tokens, so its gradient with respect to each token's hidden state is independent).
    """
    wanted = layer_reads(reads)
    if wanted is None:
        raise ValueError("lm_layer_grads computes the gradients of layer leaves only "
                         "(paths ('layers', i, name)); use torch.func.grad for other leaves")
    if head_chunk < 1:
        raise ValueError(f"head_chunk must be >= 1, got {head_chunk}")

    def grad_fn(params: Params, batch: torch.Tensor):
        tokens, targets = batch[:, :-1], batch[:, 1:]
        n_tokens = targets.numel()
        layers = params["layers"]
        with torch.no_grad():
            xs = [fam.embed(params, tokens, None, cfg)]
            for p in layers[:-1] if layers else ():
                xs.append(fam.layer(p, xs[-1], None, cfg)[0])
            x_last = fam.layer(layers[-1], xs[-1], None, cfg)[0] if layers else xs[0]
        g = torch.empty_like(x_last)
        T = x_last.shape[1]
        for s in range(0, T, head_chunk):  # dLoss/dx_L, a few tokens' logits at a time
            xc = x_last[:, s:s + head_chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                logits = fam.head(params, xc, cfg)
                part = F.cross_entropy(logits.flatten(0, 1).float(),
                                       targets[:, s:s + head_chunk].flatten(), reduction="sum")
                g[:, s:s + head_chunk] = torch.autograd.grad(part / n_tokens, xc)[0]
            del logits, part, xc
        del x_last
        got = {}
        for i in range(len(layers) - 1, -1, -1):
            p = layers[i]
            names = wanted.get(i, set())
            missing = names - set(p)
            if missing:
                raise KeyError(f"layer {i} has no leaf {sorted(missing)}")
            x = xs.pop()

            def run(sub, x, p=p):
                return fam.layer({**p, **sub}, x, None, cfg)[0]

            sub = {k: p[k] for k in names}
            _, vjp = torch.func.vjp(run, sub, x)
            gsub, g = vjp(g)
            for k, v in gsub.items():
                got[(i, k)] = v
            del vjp, gsub, x
        return optree.tree_map_with_path(
            lambda path, _: got.get((path[1], path[2])) if len(path) == 3 and path[0] == "layers"
            else None, params, namespace="")

    return grad_fn


__all__ = ["lm_layer_grads", "layer_reads", "HEAD_CHUNK"]
