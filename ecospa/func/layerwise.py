"""Gradients of a next-token loss one layer at a time: the activation memory of ONE layer.

``torch.func.grad`` of a whole forward keeps every layer's activations (attention scores, MLP
hidden states, norms) until the backward pass reaches them, and the [B, T, V] logits with their
softmax: at SmolLM2-135M's shapes that is about as much memory as the model itself. This driver
keeps only what crosses a layer boundary:

    x_0 = embed(tokens); x_{l+1} = layer_l(x_l)          (no graph kept, only the L+1 boundaries)
    g_L = dLoss/dx_L                                      (the head, a few tokens at a time)
    for l = L-1 .. 0:  grads_l, g_l = vjp(layer_l at x_l)(g_{l+1})   (the layer is run again)

so one layer's forward is recomputed (the classic block recompute) and the peak holds the L+1
boundary activations [B, T, D], one layer's graph and ``head_chunk`` tokens' logits (rows x
positions). The result
is the gradient of the same loss, up to float summation order (tested against
``torch.func.grad``). Only the gradients of the layer leaves named in ``reads`` are kept; the
gradient of the embedding, the final norm and the head is not computed (calibration reads the
coupled groups' members, which live in the layers).

Family-agnostic: it reads only the ``Family`` record (embed, layer, head).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import optree
import torch
import torch.nn.functional as F

from ecospa import _memory
from ecospa._types import Params
from ecospa.func._block import run

HEAD_CHUNK = 128  # tokens (rows x positions) per head chunk: [B, 128 // B, V] logits at a time


def _chunks(x: torch.Tensor, head_chunk: int):
    """(first position, positions) of each head chunk of x [B, T, D]: about ``head_chunk`` tokens
    (rows x positions), at least one position."""
    B, T = x.shape[:2]
    step = max(1, head_chunk // B)
    return [(s, step) for s in range(0, T, step)]


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


class TokenLoss(NamedTuple):
    """A loss that is a sum over tokens divided by their number (cross-entropy, a distillation
    KL, a mix of them), written so that it can be evaluated a few tokens at a time.

    prepare: ``prepare(batch) -> ctx``, run once per batch without gradients (e.g. the teacher's
      final hidden states); ``lambda batch: None`` when nothing is needed.
    chunk: ``chunk(logits [B, t, V], batch [B, T+1], s, ctx) -> summed loss`` of the tokens
      s..s+t-1 (their logits given), float32; the driver divides by B*T.
    """
    prepare: Callable
    chunk: Callable


def _ce_chunk(logits, batch, s, ctx):
    t = logits.shape[1]
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1 + s:1 + s + t].flatten(),
                           reduction="sum")


CE = TokenLoss(lambda batch: None, _ce_chunk)  # lm_loss: mean next-token cross-entropy


def at_least_f32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 when it is of lower precision (bfloat16 logits under autocast, whose
    log_softmax CPU autocast leaves in bfloat16); float32 and float64 as they are."""
    return x.float() if x.is_floating_point() and torch.finfo(x.dtype).bits < 32 else x


def distill_loss(fam, cfg, teacher: Params, weight: float) -> TokenLoss:
    """``ecospa compress --distill``'s loss per token: (1 - weight) x cross-entropy + weight x
    KL(teacher || student) of the next-token distributions (weight 1: KL only). The teacher's
    final hidden states are computed once per batch (``prepare``, no gradient) and its logits a
    chunk at a time, so neither model's [B, T, V] logits are ever whole in memory."""
    def prepare(batch):
        return run(fam.embed, fam.layer, lambda p, x, c: x, teacher, batch[:, :-1], cfg)[0]

    def chunk(logits, batch, s, hidden):
        ref = fam.head(teacher, hidden[:, s:s + logits.shape[1]], cfg)
        kl = F.kl_div(F.log_softmax(at_least_f32(logits), -1).flatten(0, 1),
                      F.log_softmax(at_least_f32(ref), -1).flatten(0, 1), log_target=True, reduction="sum")
        if weight == 1.0:
            return kl
        return (1 - weight) * _ce_chunk(logits, batch, s, None) + weight * kl

    return TokenLoss(prepare, chunk)


def layer_grad_and_value(fam, cfg, loss: TokenLoss = CE, reads: Optional[Sequence] = None,
                         head_chunk: int = HEAD_CHUNK, frozen: Sequence[str] = ()) -> Callable:
    """``fn(params, batch [B, T+1]) -> (grads, loss)``: like ``torch.func.grad_and_value`` of
    ``loss`` over the family's forward, with one layer's activations in memory (module docstring).

    ``reads``: leaf paths ("layers", i, name) whose gradient is wanted; every other leaf is None
    in the result, and the embedding/head gradient is not computed. None: every leaf, the
    embedding, norms and head included (a training step), with a tied embedding's two uses summed.
    ``frozen`` (with reads=None): top-level leaves (e.g. ``fam.embed_leaf``) that are held fixed:
    their gradient is not computed and they are absent from ``grads`` (whose keys are then the
    params' others): ``torch.func.grad_and_value`` of ``lambda rest: loss({**rest, **fixed})``.
    """
    wanted = layer_reads(reads)
    if reads is not None and wanted is None:
        raise ValueError("with reads, layer_grad_and_value computes the gradients of layer leaves "
                         "only (paths ('layers', i, name)); give reads=None for every leaf")
    frozen = frozenset(frozen)
    if "layers" in frozen:
        raise ValueError("frozen names top-level leaves outside 'layers' (e.g. the embedding)")
    if frozen and reads is not None:
        raise ValueError("frozen applies to a training step's gradient (reads=None)")
    if head_chunk < 1:
        raise ValueError(f"head_chunk must be >= 1, got {head_chunk}")

    def fn(params: Params, batch: torch.Tensor):
        tokens = batch[:, :-1]
        n_tokens = tokens.numel()
        layers = params["layers"]
        top = {k: v for k, v in params.items() if k != "layers" and k not in frozen} \
            if reads is None else {}
        with torch.no_grad():
            ctx = loss.prepare(batch)
            _memory.trim()  # the teacher's freed activations (ecospa._memory)
            xs = [fam.embed(params, tokens, None, cfg)]
            for p in layers:
                xs.append(fam.layer(p, xs[-1], None, cfg)[0])
        _memory.trim()  # the forward's freed temporaries, between the kept boundary activations
        x_last = xs.pop()
        g = torch.empty_like(x_last)
        top_grads, value = None, torch.zeros((), dtype=torch.float32)
        for s, step in _chunks(x_last, head_chunk):  # dLoss/dx_L (and the head's gradient), a few tokens at a time
            xc = x_last[:, s:s + step]

            def head_loss(top_p, xc, s=s):
                logits = fam.head({**params, **top_p}, xc, cfg)
                return loss.chunk(logits, batch, s, ctx) / n_tokens

            part, vjp = torch.func.vjp(head_loss, top, xc)
            gtop, g[:, s:s + step] = vjp(torch.ones_like(part))
            value = value + part.detach().float()
            if top_grads is None:
                top_grads = gtop
            elif top:  # summed into the first chunk's (fresh) tensors: no new head-sized buffer per chunk
                torch._foreach_add_(optree.tree_leaves(top_grads, namespace=""),
                                    optree.tree_leaves(gtop, namespace=""))
            del vjp, part, gtop
        del x_last
        got = {}
        for i in range(len(layers) - 1, -1, -1):
            p = layers[i]
            names = set(p) if wanted is None else wanted.get(i, set())
            missing = names - set(p)
            if missing:
                raise KeyError(f"layer {i} has no leaf {sorted(missing)}")
            x = xs.pop()

            def run_layer(sub, x, p=p):
                return fam.layer({**p, **sub}, x, None, cfg)[0]

            _, vjp = torch.func.vjp(run_layer, {k: p[k] for k in names}, x)
            gsub, g = vjp(g)
            got[i] = gsub
            del vjp, x
        if reads is not None:
            grads = optree.tree_map_with_path(
                lambda path, _: got.get(path[1], {}).get(path[2])
                if len(path) == 3 and path[0] == "layers" else None, params, namespace="")
            return grads, value
        _, vjp = torch.func.vjp(lambda top_p: fam.embed({**params, **top_p}, tokens, None, cfg), top)
        _memory.trim()  # before the step's peak: the embedding's [V, D] gradient beside every other
        (gembed,) = vjp(g)
        del vjp, g
        # summed into the head's (fresh) gradient tensors: a tied embedding's [V, D] gradient is not
        # allocated a third time at the step's peak
        grads = {k: top_grads[k].add_(gembed[k]) for k in top}
        del gembed
        grads["layers"] = type(layers)(got[i] for i in range(len(layers)))
        return grads, value

    return fn


def chunked_loss(fam, cfg, loss: TokenLoss = CE, head_chunk: int = HEAD_CHUNK) -> Callable:
    """``loss_fn(params, batch [B, T+1]) -> mean loss`` (float32 scalar, no gradient): the value of
    ``lm_loss(fam.forward, cfg)`` (for ``CE``; up to float summation order) with ``head_chunk``
    tokens' logits in memory at a time instead of all [B, T, V] and their log-softmax: what an
    evaluation of a large-vocabulary model needs (SmolLM2: 49152 x 4 bytes per token)."""
    if head_chunk < 1:
        raise ValueError(f"head_chunk must be >= 1, got {head_chunk}")

    @torch.no_grad()
    def loss_fn(params: Params, batch: torch.Tensor) -> torch.Tensor:
        ctx = loss.prepare(batch)
        x = run(fam.embed, fam.layer, lambda p, x, c: x, params, batch[:, :-1], cfg)[0]
        B, T = x.shape[:2]
        total = torch.zeros((), dtype=torch.float32)
        for s, step in _chunks(x, head_chunk):
            total += loss.chunk(fam.head(params, x[:, s:s + step], cfg), batch, s, ctx).float()
        return total / (B * T)

    return loss_fn


def lm_layer_grads(fam, cfg, reads: Sequence, head_chunk: int = HEAD_CHUNK) -> Callable:
    """``grad_fn(params, batch [B, T+1]) -> grads``: the gradient of ``lm_loss`` (mean next-token
    cross-entropy, float32) with respect to the layer leaves in ``reads`` (paths
    ("layers", i, name)), in a tree of the params' structure with None at every other leaf.

    The same values as ``torch.func.grad(lm_loss(fam.forward, cfg))`` restricted to ``reads``
    (up to summation order), with the activation memory of one layer (see the module docstring).
    ``head_chunk``: tokens (rows x positions, at least one position) whose logits are
    materialized at a time (the loss is a mean over tokens, so its gradient with respect to
    each token's hidden state is independent).
    """
    if layer_reads(reads) is None:
        raise ValueError("lm_layer_grads computes the gradients of layer leaves only "
                         "(paths ('layers', i, name)); use torch.func.grad for other leaves")
    fn = layer_grad_and_value(fam, cfg, CE, reads, head_chunk)
    return lambda params, batch: fn(params, batch)[0]


__all__ = ["TokenLoss", "CE", "at_least_f32", "distill_loss", "chunked_loss", "layer_grad_and_value", "lm_layer_grads", "layer_reads", "HEAD_CHUNK"]
