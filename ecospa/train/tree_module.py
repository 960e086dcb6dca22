"""``TreeModule``: a parameter tree as an ``nn.Module``, the one piece of ``torch.nn`` that
data-parallel training needs (``DistributedDataParallel`` averages gradients of ``nn.Parameter``s
only). Used by ``ecospa.train.runtime.DataParallel``; the rest of ecospa stays functional.
"""
from __future__ import annotations

import inspect
from typing import Callable, Optional

import optree
import torch
from torch import nn

from ecospa.optim import default_trainable

# The buffers (rotary frequencies) are the same on every rank: no broadcast before each forward.
# torch >= 2.13 names this option forward_sync_buffers and deprecates broadcast_buffers.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in
                  inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
                  else {"broadcast_buffers": False})


def _key(path) -> str:
    return "/".join(str(k) for k in path)  # nn.Module names may not contain "."


class TreeModule(nn.Module):
    """A parameter tree as an ``nn.Module``, so that DDP can average its gradients.

    Trainable leaves (``optim.default_trainable``) become ``nn.Parameter``s keyed by their path
    ("layers/0/wq"); the others (rotary ``inv_freq``) become buffers. ``forward(batch)`` rebuilds
    the tree from them and returns ``loss_fn(tree, batch)``.
    """

    def __init__(self, params, loss_fn: Callable):
        super().__init__()
        paths, leaves, self.spec = optree.tree_flatten_with_path(params, namespace="")
        self.keys = [_key(p) for p in paths]
        self.trainable = [default_trainable(tuple(p), x) for p, x in zip(paths, leaves)]
        self.weights = nn.ParameterDict()
        self.loss_fn = loss_fn
        for k, x, t in zip(self.keys, leaves, self.trainable):
            if t:
                self.weights[k] = nn.Parameter(x.detach().clone())
            else:
                self.register_buffer(k, x.detach().clone())

    def leaves(self) -> list:
        """The module's tensors in the tree's flatten order."""
        return [self.weights[k] if t else getattr(self, k) for k, t in zip(self.keys, self.trainable)]

    def tree(self):
        return optree.tree_unflatten(self.spec, self.leaves())

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.tree(), batch)

    @torch.no_grad()
    def load(self, params) -> None:
        """Copy ``params`` (the same structure and shapes) into the module."""
        new = self.spec.flatten_up_to(params)
        torch._foreach_copy_(self.leaves(), [x.detach() for x in new])

    def grads(self):
        """The gradients as a tree with the params' structure (zeros for buffers)."""
        out = [(x.grad if x.grad is not None else torch.zeros_like(x)) if t else torch.zeros_like(x)
               for x, t in zip(self.leaves(), self.trainable)]
        return optree.tree_unflatten(self.spec, out)


def same_shapes(params, module: Optional[TreeModule]) -> bool:
    """Whether ``module`` was built for a tree of ``params``' structure and shapes."""
    if module is None:
        return False
    leaves, spec = optree.tree_flatten(params, namespace="")
    return spec == module.spec and all(a.shape == b.shape for a, b in zip(leaves, module.leaves()))


__all__ = ["TreeModule", "same_shapes", "NO_BUFFER_SYNC"]
