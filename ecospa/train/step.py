"""One training step, one loss, one evaluation: the pieces every loop in ecospa shares.

    loss_fn = lm_loss(family.forward, cfg)          # next-token cross-entropy, float32
    step = make_step(loss_fn, optim.adamw(3e-3))     # grads from torch.func.grad_and_value
    params, opt_state, loss, grads = step(params, opt_state, batch)
    mean_nll = evaluate(loss_fn, params, eval_batches(val_ids, 16, 128))

``ecospa train`` (``ecospa.train.loop``), ``ecospa compress``'s recovery and ``ecospa eval``
all use these, so the same params and windows give the same loss and perplexity everywhere.
"""
from __future__ import annotations

import resource
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from ecospa._types import OptimizerProtocol, State
from ecospa.importance import ESTIMATORS, microbatched


def lm_loss(forward: Callable, model_cfg) -> Callable:
    """``loss_fn(params, batch)``: next-token cross-entropy on batch [B, T+1] (float32)."""
    def loss_fn(params, batch):
        logits = forward(params, batch[:, :-1], model_cfg)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
    return loss_fn


def self_distill_loss(forward: Callable, model_cfg, teacher, weight: float) -> Callable:
    """``loss_fn(params, batch)``: ``(1 - weight) x`` next-token cross-entropy ``+ weight x``
    KL(teacher || model) of the next-token distributions, both means over tokens (float32).
    ``teacher``: a frozen params tree of the same family (it may be wider: a snapshot taken
    before a pruning round); its logits get no gradient."""
    def loss_fn(params, batch):
        inputs = batch[:, :-1]
        logits = forward(params, inputs, model_cfg).flatten(0, 1).float()  # [B*T, V]
        with torch.no_grad():
            ref = forward(teacher, inputs, model_cfg).flatten(0, 1).float().detach()
        kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                      reduction="batchmean")
        return (1 - weight) * F.cross_entropy(logits, batch[:, 1:].flatten()) + weight * kl
    return loss_fn


class StepOut(NamedTuple):
    params: Any
    opt_state: State
    loss: torch.Tensor
    grads: Any


def make_step(loss_fn: Callable, optimizer: OptimizerProtocol, compile: bool = False,
              micro_batch: Optional[int] = None,
              grad_and_value: Optional[Callable] = None, donate: bool = False) -> Callable:
    """``step(params, opt_state, batch) -> StepOut(params, opt_state, loss, grads)``, pure.

    ``compile=True`` compiles the loss-and-gradient function with ``torch.compile`` (the
    optimizer's foreach update stays eager). Build a new step after pruning: shapes change.
    ``micro_batch``: differentiate that many rows at a time and average (``importance.microbatched``):
    the same step for a loss that is a mean over rows, with the activation memory of fewer rows.
    ``grad_and_value``: ``(params, batch) -> (grads, loss)`` of ``loss_fn`` computed another way
    (e.g. one layer at a time, ``ecospa.func.layerwise.layer_grad_and_value``); None:
    ``torch.func.grad_and_value(loss_fn)``.
    ``donate=True``: the optimizer updates ``params`` and ``opt_state`` in place
    (``optimizer.update(..., donate=True)``, e.g. ``ecospa.optim.adamw``): the same numbers without
    a second copy of the model and its moments; the step's inputs must not be read afterwards and
    must share no tensor with another tree (a teacher); the returned grads are the clipped ones.
    """
    grad_fn = grad_and_value or torch.func.grad_and_value(loss_fn)
    if compile:
        grad_fn = torch.compile(grad_fn, dynamic=False)
    grad_fn = microbatched(grad_fn, micro_batch)

    def step(params, opt_state, batch):
        grads, loss = grad_fn(params, batch)
        if donate:
            new_params, new_state = optimizer.update(grads, opt_state, params, donate=True)
        else:
            new_params, new_state = optimizer.update(grads, opt_state, params)
        return StepOut(new_params, new_state, loss.detach(), grads)

    return step


def peak_memory_mb(device: str) -> float:
    """Peak memory: CUDA allocator peak on GPU, the process's max RSS on CPU."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


@torch.no_grad()
def evaluate(loss_fn: Callable, params, batches) -> float:
    """Mean loss over fixed batches, weighted by tokens."""
    total = n = 0.0
    for b in batches:
        total += float(loss_fn(params, b)) * b[:, 1:].numel()
        n += b[:, 1:].numel()
    return total / n


def estimator_for(name: str, groups, seed: int):
    """The estimator ``name`` (a key of ``ESTIMATORS``); every one takes the same arguments."""
    return ESTIMATORS[name](groups, seed=seed)


__all__ = ["lm_loss", "self_distill_loss", "StepOut", "make_step", "evaluate", "peak_memory_mb", "estimator_for"]
