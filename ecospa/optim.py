"""Functional AdamW, optax style: a pair of pure functions over parameter trees.

    opt = adamw(1e-3)
    state = opt.init(params)
    params, state = opt.update(grads, state, params)

The state's moments ``mu``/``nu`` have exactly the params' structure, so the same coupled
``slice_units`` call that shrinks the params also shrinks the moments (``slice_state``), and
training continues after a pruning round without resetting the optimizer.

Speed: the update runs ``torch._foreach_*`` kernels over all leaves at once. The first op of each
chain allocates fresh outputs (``_foreach_mul``, ``_foreach_sqrt``); only those fresh tensors are
then updated in place, so the caller's params, grads and state are never modified.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import optree
import torch

from ecospa._tree import FP32_BUFFERS
from ecospa._types import InitFn, Keep, OptimizerUpdateFn, Params, Path, TensorTree
from ecospa.groups import Group
from ecospa.prune import slice_units

Schedule = Callable[[int], float]


class AdamWState(NamedTuple):
    count: int          # number of updates applied so far
    mu: TensorTree      # first moments, the params' structure and shapes
    nu: TensorTree      # second moments, the params' structure and shapes


class Optimizer(NamedTuple):
    """An optimizer as two pure functions (satisfies ``ecospa._types.OptimizerProtocol``)."""

    init: InitFn                 # (params) -> AdamWState
    update: OptimizerUpdateFn    # (grads, state, params) -> (new_params, new_state)


def default_trainable(path: Path, leaf: torch.Tensor) -> bool:
    """Every floating leaf except the buffers (``_tree.FP32_BUFFERS``: rotary frequencies)."""
    return bool(path) and path[-1] not in FP32_BUFFERS and leaf.is_floating_point()


def _check(value: float, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{what} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def global_norm(grads: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of all tensors together (a 0-d float tensor)."""
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    norms = [n.to(torch.float64) for n in torch._foreach_norm(list(grads))]  # mixed dtypes allowed
    return torch.linalg.vector_norm(torch.stack(norms))


def adamw(lr: Union[float, Schedule], b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
          weight_decay: float = 0.1, clip_norm: Optional[float] = 1.0,
          trainable: Callable[[Path, torch.Tensor], bool] = default_trainable) -> Optimizer:
    """AdamW with decoupled weight decay and global-norm gradient clipping.

    Args:
      lr: a float, or a schedule ``step -> lr`` called with the number of updates done so far.
      b1, b2, eps: Adam's moment decays and denominator epsilon (as in ``torch.optim.AdamW``).
      weight_decay: decoupled decay ``p -= lr * wd * p``; not applied to 1-D leaves
        (norm weights, biases).
      clip_norm: clip the gradients of trainable leaves to this global L2 norm (None: off).
      trainable: ``(path, leaf) -> bool``; other leaves (default: ``inv_freq``) are never changed.
    Returns:
      ``Optimizer(init, update)``; ``update(grads, state, params) -> (params, state)`` is pure.
      ``update(..., donate=True)`` computes the same numbers in the tensors of ``params``,
      ``state`` and ``grads`` themselves (JAX's buffer donation: no second copy of the model
      and its two moments; the donated trees must not be read afterwards except through the
      returned ones, and no other tree may share their tensors).
    Example:
      opt = adamw(warmup_cosine(1e-3, 100, 1000)); state = opt.init(params)
      params, state = opt.update(grads, state, params)
    """
    _check(b1, 0.0, 1.0 - 1e-12, "b1")
    _check(b2, 0.0, 1.0 - 1e-12, "b2")
    _check(eps, 0.0, math.inf, "eps")
    _check(weight_decay, 0.0, math.inf, "weight_decay")
    if clip_norm is not None:
        _check(clip_norm, 1e-12, math.inf, "clip_norm")
    schedule = lr if callable(lr) else (lambda step, v=_check(lr, 0.0, math.inf, "lr"): v)

    def init(params: Params) -> AdamWState:
        zeros = optree.tree_map(torch.zeros_like, params, namespace="")
        return AdamWState(0, zeros, optree.tree_map(torch.zeros_like, params, namespace=""))

    def update(grads: TensorTree, state: AdamWState, params: Params, donate: bool = False):
        paths, p_leaves, spec = optree.tree_flatten_with_path(params, namespace="")
        g_leaves, m_leaves, v_leaves = (spec.flatten_up_to(t) for t in (grads, state.mu, state.nu))
        train = [i for i, (path, p) in enumerate(zip(paths, p_leaves)) if trainable(tuple(path), p)]
        p, g = [p_leaves[i] for i in train], [g_leaves[i].to(p_leaves[i].dtype) for i in train]
        m, v = [m_leaves[i] for i in train], [v_leaves[i] for i in train]
        step = state.count + 1
        lr_now = float(schedule(state.count))
        decay = [1.0 - lr_now * weight_decay * (x.ndim > 1) for x in p]
        if clip_norm is not None and g:
            total = global_norm(g)
            # Same rule as torch.nn.utils.clip_grad_norm_: scale only when the norm exceeds it.
            scale = torch.clamp(clip_norm / (total + 1e-6), max=1.0).item()
            if donate:
                torch._foreach_mul_(g, scale)
            else:
                g = torch._foreach_mul(g, scale)
        if donate:  # the same ops, written into the given tensors
            new_m, new_v, new_p = m, v, p
            if p:
                torch._foreach_mul_(new_m, b1)
                torch._foreach_mul_(new_v, b2)
                torch._foreach_mul_(new_p, decay)
        else:
            new_m = torch._foreach_mul(m, b1) if m else []
            new_v = torch._foreach_mul(v, b2) if v else []
            new_p = torch._foreach_mul(p, decay) if p else []
        if p:
            torch._foreach_add_(new_m, g, alpha=1.0 - b1)
            torch._foreach_addcmul_(new_v, g, g, value=1.0 - b2)
            bias2, step_size = math.sqrt(1.0 - b2 ** step), -lr_now / (1.0 - b1 ** step)
            if donate:  # the same elementwise ops one leaf at a time: one leaf's denominator in memory
                for x, mx, vx in zip(new_p, new_m, new_v):
                    x.addcdiv_(mx, vx.sqrt().div_(bias2).add_(eps), value=step_size)
            else:
                denom = torch._foreach_sqrt(new_v)
                torch._foreach_div_(denom, bias2)
                torch._foreach_add_(denom, eps)
                torch._foreach_addcdiv_(new_p, new_m, denom, value=step_size)
        out_p, out_m, out_v = list(p_leaves), list(m_leaves), list(v_leaves)
        for j, i in enumerate(train):
            out_p[i], out_m[i], out_v[i] = new_p[j], new_m[j], new_v[j]
        unflat = lambda leaves: optree.tree_unflatten(spec, leaves)  # noqa: E731
        return unflat(out_p), AdamWState(step, unflat(out_m), unflat(out_v))

    return Optimizer(init, update)


def slice_state(state: AdamWState, groups: Sequence[Group], keep: Keep) -> AdamWState:
    """Slice the moments with the same coupled transform as the params (pure).

    Example:
      params = ecospa.slice_units(params, groups, keep)
      opt_state = slice_state(opt_state, groups, keep)
    """
    return AdamWState(state.count, slice_units(state.mu, groups, keep),
                      slice_units(state.nu, groups, keep))


__all__ = ["AdamWState", "Optimizer", "adamw", "default_trainable", "global_norm", "slice_state"]
