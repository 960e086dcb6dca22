"""Type aliases and the typed contracts shared across ecospa. A parameter tree holds only dicts,
tuples and tensors.

The two pluggable pieces are Protocols, optax style (pure functions over trees, state passed in
and returned, nothing mutated):
- ``EstimatorProtocol``: ``init(params) -> state``, ``update(state, params, grads) -> state``,
  ``scores(state) -> Scores`` (``ecospa.importance.Importance`` is one);
- ``OptimizerProtocol``: ``init(params) -> state``, ``update(grads, state, params) ->
  (params, state)`` (``ecospa.optim.Optimizer`` from ``adamw`` is one).
Anything with these members works in ``make_step``, ``fisher`` and the train loop.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol, Tuple, Union, runtime_checkable

import torch

Tensor = torch.Tensor
PathKey = Union[str, int]
Path = tuple  # tuple[PathKey, ...]: the address of one leaf, e.g. ("layers", 0, "wq")
Params = Any  # nested dict/tuple of tensors (a pytree)
TensorTree = Any  # any tree with the structure of Params (grads, AdamW moments, masks)
Scores = Mapping[str, Tensor]  # group name -> importance per unit, shape [n_blocks, n_units]
Keep = Mapping[str, Tensor]  # group name -> kept unit indices (int64), shape [n_blocks, k], sorted
State = Any  # an estimator's or optimizer's state: a NamedTuple of trees and counters


class InitFn(Protocol):
    """``init(params) -> state`` (estimators and optimizers alike)."""

    def __call__(self, params: Params) -> State: ...


class EstimatorUpdateFn(Protocol):
    """``update(state, params, grads) -> state``: fold in one batch's gradients."""

    def __call__(self, state: State, params: Params, grads: TensorTree) -> State: ...


class ScoresFn(Protocol):
    """``scores(state) -> {group name: [n_blocks, n_units]}``, higher = keep."""

    def __call__(self, state: State) -> Scores: ...


class OptimizerUpdateFn(Protocol):
    """``update(grads, state, params) -> (new_params, new_state)``, pure."""

    def __call__(self, grads: TensorTree, state: State, params: Params) -> Tuple[Params, State]: ...


class _Stateful(Protocol):
    @property
    def init(self) -> InitFn: ...


@runtime_checkable
class EstimatorProtocol(_Stateful, Protocol):
    """An importance estimator (``ecospa.importance.Importance`` or your own)."""

    @property
    def update(self) -> EstimatorUpdateFn: ...

    @property
    def scores(self) -> ScoresFn: ...


@runtime_checkable
class OptimizerProtocol(_Stateful, Protocol):
    """An optimizer, optax style (``ecospa.optim.adamw(...)`` or your own)."""

    @property
    def update(self) -> OptimizerUpdateFn: ...
