"""Importance estimators: one constructor signature, one contract, optax style.

Every constructor is ``name(groups, *, seed=0, **its own keyword options)`` (``EstimatorFactory``;
deterministic estimators ignore ``seed``), so ``ESTIMATORS[name](groups, seed=seed)`` builds any
of them. Every estimator is ``Importance(init, update, scores)`` (``ecospa._types.EstimatorProtocol``):
    state  = est.init(params)
    state  = est.update(state, params, grads)   # once per batch, with the step's own gradients
    scores = est.scores(state)                  # {group name: [n_blocks, n_units]}, higher = keep

The coupled empirical Fisher uses the first-order effect of removing unit j,
``v_j = sum over j's indices of W * dL/dW``, which is the derivative of the loss with respect to
a virtual mask on the inner dimension and can be read from either linear side of the pair.
Its importance is the mean (or an exponential moving average) of ``v_j ** 2`` over batches.

The state is always ``ImportanceState(stat, count)`` with ``stat`` {group name: [n_blocks,
n_units]}: small, so checkpoints stay small. Static estimators (magnitude, norm_product, random)
keep the scores of the params they last saw, never the params themselves.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Protocol, Sequence

import optree
import torch

from ecospa._tree import get_path, map_paths
from ecospa._types import (EstimatorProtocol, EstimatorUpdateFn, InitFn, Params, Scores, ScoresFn,
                           TensorTree)
from ecospa.groups import Group, Member


class Importance(NamedTuple):
    """An estimator: three pure functions (satisfies ``ecospa._types.EstimatorProtocol``)."""

    init: InitFn                 # (params) -> state
    update: EstimatorUpdateFn    # (state, params, grads) -> state
    scores: ScoresFn             # (state) -> Scores
    # The paths of ``grads`` that ``update`` reads (None: any). ``fisher`` differentiates only
    # these leaves and passes None for the others: the coupled Fisher needs the gradients of
    # one side of each group (wk, wo, w_down), not a second copy of the whole model.
    reads: Optional[tuple] = None


class EstimatorFactory(Protocol):
    """The one constructor signature: ``ESTIMATORS[name](groups, seed=seed)``."""

    def __call__(self, groups: Sequence[Group], *, seed: int = 0) -> Importance: ...


class ImportanceState(NamedTuple):
    stat: dict           # group name -> accumulated statistic [n_blocks, n_units] (float64)
    count: int           # number of updates so far


def _per_unit(x: torch.Tensor, m: Member, power: int = 1) -> torch.Tensor:
    """Sum x (a member-shaped tensor) over every axis but (block, unit): [n_blocks, n_units]."""
    if power != 1:
        x = x.pow(power)
    front = ([m.block_axis] if m.block_axis is not None else []) + [m.unit_axis]
    rest = [a for a in range(x.ndim) if a not in front]
    y = x.permute(*front, *rest).reshape(*[x.shape[a] for a in front], -1).sum(-1)
    return y if m.block_axis is not None else y[None]


def unit_dots(params: Params, grads: TensorTree, groups: Sequence[Group], side: str = "b") -> dict:
    """v_j = sum of W * dL/dW over unit j's indices of the members on ``side`` ("a" or "b")."""
    out = {}
    for g in groups:
        members = g.side(side)
        if not members:
            raise ValueError(f"group {g.name!r} has no side-{side!r} member (a linear factor)")
        v = 0
        for m in members:
            w, gw = get_path(params, m.path), get_path(grads, m.path)
            v = v + _per_unit(w.detach().double() * gw.detach().double(), m)
        out[g.name] = v
    return out


def _accumulating(per_batch, finish, ema: Optional[float] = None,
                  reads: Optional[tuple] = None) -> Importance:
    def init(params):
        return ImportanceState({}, 0)

    def update(state, params, grads):
        new = per_batch(params, grads)
        stat = {}
        for name, x in new.items():
            old = state.stat.get(name)
            if old is None or old.shape != x.shape:
                stat[name] = x  # first batch, or the group was pruned since: start afresh
            elif ema is None:
                stat[name] = old + x
            else:
                stat[name] = ema * old + (1.0 - ema) * x
        return ImportanceState(stat, state.count + 1)

    def scores(state):
        if state.count == 0:
            raise ValueError("no batches were accumulated: call update() at least once")
        n = 1 if ema is not None else state.count
        return {name: finish(x / n) for name, x in state.stat.items()}

    return Importance(init, update, scores, reads)


def _side_paths(groups: Sequence[Group], side: str) -> tuple:
    """The leaf paths of every group's side-``side`` members (what ``unit_dots`` reads)."""
    return tuple(dict.fromkeys(m.path for g in groups for m in g.side(side)))


def coupled_fisher(groups: Sequence[Group], *, seed: int = 0, ema: Optional[float] = None,
                   side: str = "b") -> Importance:
    """Coupled empirical Fisher: mean (or EMA with factor ``ema``) of v_j**2 per unit."""
    groups = tuple(groups)
    return _accumulating(lambda p, g: {k: v ** 2 for k, v in unit_dots(p, g, groups, side).items()},
                         lambda x: x, ema, _side_paths(groups, side))


def taylor(groups: Sequence[Group], *, seed: int = 0, side: str = "b") -> Importance:
    """First-order Taylor: |mean over batches of v_j|."""
    groups = tuple(groups)
    return _accumulating(lambda p, g: unit_dots(p, g, groups, side), torch.abs,
                         reads=_side_paths(groups, side))


def uncoupled(groups: Sequence[Group], *, seed: int = 0, side: str = "a") -> Importance:
    """Each matrix alone: the per-weight empirical Fisher sum((W * dL/dW)**2) of one side's
    first weight, ignoring its partner (the usual per-matrix structured criterion)."""
    groups = tuple(groups)

    def per_batch(params, grads):
        out = {}
        for g in groups:
            m = (g.side(side) or g.side("b"))[0]
            w, gw = get_path(params, m.path), get_path(grads, m.path)
            out[g.name] = _per_unit(w.detach().double() * gw.detach().double(), m, power=2)
        return out
    reads = tuple(dict.fromkeys((g.side(side) or g.side("b"))[0].path for g in groups))
    return _accumulating(per_batch, lambda x: x, reads=reads)


def _static(fn: Callable[[Params], dict]) -> Importance:
    """An estimator that needs no gradients: the scores of the params it last saw (at ``init`` or
    the last ``update``). The state holds those scores, not a copy of the params."""
    def scores(state):
        legacy = state.stat.get("params")
        if isinstance(legacy, (Mapping, tuple, list)):  # a checkpoint from before: it held the params
            return fn(legacy)
        return dict(state.stat)

    return Importance(lambda params: ImportanceState(fn(params), 0),
                      lambda state, params, grads: ImportanceState(fn(params), state.count + 1),
                      scores, reads=())


def _side_norm(params, g: Group, side: str) -> torch.Tensor:
    members = g.side(side)
    if not members:
        raise ValueError(f"group {g.name!r} has no side-{side!r} member")
    return sum(_per_unit(get_path(params, m.path).detach().double(), m, 2) for m in members).sqrt()


def magnitude(groups: Sequence[Group], *, seed: int = 0, side: str = "b") -> Importance:
    """One-side weight magnitude: the L2 norm of the unit's slice of one side."""
    groups = tuple(groups)
    return _static(lambda p: {g.name: _side_norm(p, g, side) for g in groups})


def norm_product(groups: Sequence[Group], *, seed: int = 0) -> Importance:
    """Product of the two sides' norms, ||a_j|| * ||b_j|| (falls back to side b alone)."""
    groups = tuple(groups)

    def fn(p):
        return {g.name: _side_norm(p, g, "b") * (_side_norm(p, g, "a") if g.side("a") else 1.0)
                for g in groups}
    return _static(fn)


def random(groups: Sequence[Group], *, seed: int = 0) -> Importance:
    """Uniform random scores (deterministic in ``seed``)."""
    groups = tuple(groups)

    def fn(p):
        gen = torch.Generator().manual_seed(seed)
        return {g.name: torch.rand(*g.sizes(p), generator=gen, dtype=torch.float64) for g in groups}
    return _static(fn)


ESTIMATORS: Mapping[str, EstimatorFactory] = {
    "fisher": coupled_fisher, "taylor": taylor, "uncoupled": uncoupled,
    "magnitude": magnitude, "norm_product": norm_product, "random": random}


def microbatched(grad_fn: Callable, micro_batch: Optional[int]) -> Callable:
    """``grad_fn(params, batch)`` (any function returning a tree of tensors: ``torch.func.grad``,
    ``grad_and_value``) computed ``micro_batch`` rows of the batch at a time and averaged with
    the parts' row counts as weights: the batch's result when the loss is a mean over rows of
    equal length (``lm_loss``, the distillation loss), only the summation order differs. The
    activations kept for a backward pass are those of ``micro_batch`` rows, not of the batch.
    None, or a batch of at most ``micro_batch`` rows: ``grad_fn`` itself, unchanged."""
    if not micro_batch:
        return grad_fn

    def run(params, batch):
        rows = batch.shape[0] if torch.is_tensor(batch) and batch.ndim >= 1 else None
        if rows is None or rows <= micro_batch:
            return grad_fn(params, batch)
        total = None
        for part in batch.split(micro_batch):
            g = grad_fn(params, part)
            w = part.shape[0] / rows
            if total is None:
                total = optree.tree_map(lambda x: x.mul_(w), g, namespace="")
            else:
                optree.tree_map(lambda a, x: a.add_(x, alpha=w), total, g, namespace="")
            del g
        return total

    return run


def _grad_of(loss_fn: Callable, reads: Optional[tuple]) -> Callable:
    """``torch.func.grad(loss_fn)``, or with ``reads`` (leaf paths) the gradient of those leaves
    only, in a tree of the params' structure with None elsewhere: the same values (the same
    backward ops produce them), without the memory and work of the other leaves' gradients."""
    if reads is None:
        return torch.func.grad(loss_fn)
    paths = tuple(tuple(p) for p in reads)

    def grad_fn(params, batch):
        if not paths:  # the estimator reads no gradient (magnitude, random, ...)
            return optree.tree_map(lambda x: None, params, namespace="")

        def partial(sub):
            return loss_fn(map_paths(params, {p: (lambda _, x=x: x) for p, x in zip(paths, sub)}), batch)

        got = dict(zip(paths, torch.func.grad(partial)(tuple(get_path(params, p) for p in paths))))
        return optree.tree_map_with_path(lambda path, _: got.get(tuple(path)), params, namespace="")

    return grad_fn


def fisher(loss_fn: Callable, params: Params, groups: Sequence[Group], batches: Iterable,
           estimator: Optional[EstimatorProtocol] = None,
           on_batch: Optional[Callable[[int, Optional[int]], None]] = None,
           micro_batch: Optional[int] = None, grad_fn: Optional[Callable] = None) -> Scores:
    """Coupled empirical Fisher scores from calibration batches.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, pure.
      params: the model's parameter tree (unchanged).
      groups: coupled groups.
      batches: an iterable of batches for ``loss_fn``.
      estimator: another ``Importance`` to accumulate instead of the coupled Fisher.
      on_batch: ``on_batch(i, n)`` after batch i (1-based) of n (None when ``batches`` has no
        length), e.g. to show progress; the scores do not depend on it.
      micro_batch: differentiate this many rows of a batch at a time and average the gradients
        weighted by rows: the batch's gradient when ``loss_fn`` is a mean over rows of equal
        length (``lm_loss``), with the activation memory of ``micro_batch`` rows. None: whole batches.
      grad_fn: ``grad_fn(params, batch) -> grads`` computing the gradient of ``loss_fn`` another
        way, e.g. one layer at a time (``ecospa.func.layerwise.lm_layer_grads``, which must be
        given the estimator's ``reads``); None: ``torch.func.grad(loss_fn)``.
    Returns:
      {group name: importance per unit [n_blocks, n_units]}.
    Example:
      scores = ecospa.fisher(lambda p, b: loss(p, b), params, groups, batches)
    """
    est = estimator or coupled_fisher(groups)
    grad_fn = microbatched(grad_fn or _grad_of(loss_fn, getattr(est, "reads", None)), micro_batch)
    state = est.init(params)
    n = len(batches) if hasattr(batches, "__len__") else None
    for i, batch in enumerate(batches, 1):
        state = est.update(state, params, grad_fn(params, batch))
        if on_batch is not None:
            on_batch(i, n)
    return est.scores(state)
