"""Data-parallel training with ``torch.distributed``: one process per device, started by torchrun.

    torchrun --nproc_per_node 2 -m ecospa train --preset tiny

``ecospa.train.train(cfg, parallel=...)`` takes one of two runtimes with the same methods:
- ``LOCAL`` (one process, no ``torch.distributed``): exactly the plain loop;
- ``DataParallel``: every rank holds the same parameter tree and takes its own rows of the same
  deterministic global batch. The gradients are averaged by ``DistributedDataParallel`` (its
  bucketing overlaps the all-reduce with the backward) over ``TreeModule``
  (``ecospa.train.tree_module``), a thin ``nn.Module`` whose forward rebuilds the tree from its
  ``nn.Parameter``s and calls the pure loss. The functional AdamW update then runs identically
  on every rank.

Why the ranks agree: the averaged gradient of B/W rows on each of W ranks is the gradient of
the global batch of B rows (the loss is a mean over equally many tokens per rank). So the coupled
Fisher ``v_j`` computed from it equals the single-process ``v_j`` and is the same on every rank;
pruning relies on that, and ``reduce_scores`` additionally averages the scores with one
all-reduce so that the kept units are the same on every rank by construction. After a pruning
round the step is rebuilt, which wraps a new DDP module around the smaller tree (DDP checks that
every rank's shapes agree). Checkpoints hold only the global state and are written by rank 0,
so a run can resume with any number of processes.
"""
from __future__ import annotations

import datetime
import os
import sys
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from ecospa._types import OptimizerProtocol
from ecospa.train.step import StepOut, evaluate, make_step
from ecospa.train.tree_module import NO_BUFFER_SYNC, TreeModule, same_shapes

DEFAULT_TIMEOUT_S = 600.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s rows of a global batch [B, ...]: rows ``rank*B/W .. (rank+1)*B/W``.

    The W shards are disjoint and cover the batch in order. Raises ValueError if B is not
    divisible by W (unequal shards would weight the ranks' mean losses unequally).
    Example: ``shard_rows(torch.arange(8)[:, None], 1, 2)`` -> rows 4..7.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    check_divisible(batch.shape[0], world_size)
    b = batch.shape[0] // world_size
    return batch[rank * b:(rank + 1) * b]


def check_divisible(batch_size: int, world_size: int) -> None:
    """ValueError unless the global batch splits into equal per-rank shards."""
    if batch_size % world_size:
        raise ValueError(f"the global batch size {batch_size} is not divisible by the "
                         f"{world_size} processes; use a batch size that is a multiple of "
                         f"{world_size} (e.g. --batch-size {world_size * max(1, batch_size // world_size)})")


class Local:
    """The single-process runtime: the plain loop, no ``torch.distributed``."""

    rank, world_size, is_main = 0, 1, True

    def make_step(self, loss_fn: Callable, optimizer: OptimizerProtocol, compile: bool = False) -> Callable:
        return make_step(loss_fn, optimizer, compile)

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return batch

    def evaluate(self, loss_fn: Callable, params, batches) -> float:
        return evaluate(loss_fn, params, batches)

    def reduce_scores(self, scores: dict) -> dict:
        return scores

    def barrier(self) -> None:
        pass

    def close(self) -> None:
        pass


LOCAL = Local()


class DataParallel:
    """The multi-process runtime over an initialized process group (see ``init_from_env``)."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: str,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.timeout_s, self.is_main = timeout_s, rank == 0

    def make_step(self, loss_fn: Callable, optimizer: OptimizerProtocol, compile: bool = False) -> Callable:
        """``step(params, opt_state, batch) -> StepOut``, like ``ecospa.train.step.make_step``.

        ``batch`` is this rank's shard. The returned loss is the mean over all ranks and the
        grads are the all-ranks average, so both are the same on every rank. The DDP module is
        built around ``params`` on the first call (a collective: every rank must call it) and
        rebuilt if the shapes change; build a new step after pruning as with ``make_step``.
        """
        held = {"module": None, "ddp": None}

        def build(params):
            module = TreeModule(params, loss_fn)
            ids = [torch.device(self.device).index] if self.device.startswith("cuda") else None
            ddp = nn.parallel.DistributedDataParallel(module, device_ids=ids, **NO_BUFFER_SYNC)
            held.update(module=module, ddp=torch.compile(ddp, dynamic=False) if compile else ddp)

        def step(params, opt_state, batch):
            try:
                if not same_shapes(params, held["module"]):
                    build(params)
                else:
                    held["module"].load(params)
                module = held["module"]
                for p in module.weights.values():
                    p.grad = None
                loss = held["ddp"](batch)
                loss.backward()  # DDP averages the gradients over the ranks here
                grads = module.grads()
                new_params, new_state = optimizer.update(grads, opt_state, params)
                mean = loss.detach().clone()
                dist.all_reduce(mean)
                return StepOut(new_params, new_state, mean / self.world_size, grads)
            except Exception as err:
                print(f"ecospa: rank {self.rank} of {self.world_size} failed in the training step: "
                      f"{type(err).__name__}: {err}\n(if another rank failed first, its error is the "
                      f"cause; a collective waits at most {self.timeout_s:g} s, set by --dist-timeout)",
                      file=sys.stderr, flush=True)
                raise

        return step

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        return shard_rows(batch, self.rank, self.world_size)

    @torch.no_grad()
    def evaluate(self, loss_fn: Callable, params, batches) -> float:
        """Mean loss over the batches weighted by tokens; each rank scores its rows."""
        total = torch.zeros(2, dtype=torch.float64)
        for b in batches:
            rows = torch.tensor_split(b, self.world_size)[self.rank]
            if rows.shape[0]:
                total[0] += float(loss_fn(params, rows)) * rows[:, 1:].numel()
                total[1] += rows[:, 1:].numel()
        total = total.to(self.device)
        dist.all_reduce(total)
        return float(total[0] / total[1])

    def reduce_scores(self, scores: dict) -> dict:
        """The scores averaged over the ranks (one all-reduce): identical on every rank."""
        names = sorted(scores)
        flat = torch.cat([scores[k].reshape(-1).to(torch.float64) for k in names])
        dist.all_reduce(flat)
        flat = flat / self.world_size
        out, i = {}, 0
        for k in names:
            n = scores[k].numel()
            out[k] = flat[i:i + n].reshape(scores[k].shape).to(scores[k].dtype)
            i += n
        return out

    def barrier(self) -> None:
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[self.local_rank])
        else:
            dist.barrier()

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def init_from_env(device: str = "cpu", timeout_s: float = DEFAULT_TIMEOUT_S):
    """The runtime for this process: ``LOCAL`` unless torchrun started several processes.

    With WORLD_SIZE > 1 (set by torchrun with RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), it
    initializes the default process group: ``nccl`` for a CUDA device (each process takes
    ``cuda:LOCAL_RANK``), ``gloo`` for the CPU. A collective that waits longer than ``timeout_s``
    seconds (a rank died or hangs) raises instead of blocking forever.
    Returns:
      ``LOCAL``, or a ``DataParallel`` whose ``.device`` is the device this rank must use.
    Example: ``par = init_from_env("cuda"); train(replace(cfg, device=par.device), parallel=par)``
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return LOCAL
    missing = [k for k in _ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {missing} are not set; start the processes "
                           "with torchrun (torchrun --nproc_per_node N -m ecospa train ...)")
    if timeout_s <= 0:
        raise ValueError(f"the process-group timeout must be > 0 seconds, got {timeout_s}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.startswith("cuda"):
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {rank} needs cuda:{local_rank} but this node has "
                               f"{torch.cuda.device_count()} CUDA devices; lower --nproc_per_node "
                               "or train on --device cpu")
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DataParallel(rank, world, local_rank, device, timeout_s)


__all__ = ["LOCAL", "Local", "DataParallel", "TreeModule", "init_from_env", "shard_rows",
           "check_divisible", "DEFAULT_TIMEOUT_S"]
