"""Type aliases shared across ecospa. A parameter tree holds only dicts, tuples and tensors."""
from __future__ import annotations

from typing import Any, Mapping, Union

import torch

Tensor = torch.Tensor
PathKey = Union[str, int]
Path = tuple  # tuple[PathKey, ...]: the address of one leaf, e.g. ("layers", 0, "wq")
Params = Any  # nested dict/tuple of tensors (a pytree)
TensorTree = Any  # any tree with the structure of Params (grads, AdamW moments, masks)
Scores = Mapping[str, Tensor]  # group name -> importance per unit, shape [n_blocks, n_units]
Keep = Mapping[str, Tensor]  # group name -> kept unit indices (int64), shape [n_blocks, k], sorted
