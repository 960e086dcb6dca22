"""A run's checkpoints: saved at the schedule's steps with a diagnosis when they cannot be, and
loaded back for ``--resume`` only when they hold a complete, finite training state.

Non-finite parameters are never saved (``TrainingDiverged`` names the last good checkpoint);
a failed periodic save warns and training goes on; a failed final save is ``CheckpointNotSaved``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import optree
import torch
from tqdm.auto import tqdm

from ecospa.errors import UsageError, whole
from ecospa.io import checkpoint
from ecospa.train.config import TrainConfig, check_resumable, config_from_json, config_json


class TrainingDiverged(ValueError):
    """The loss or the parameters became NaN or inf; the last good checkpoint is left intact
    (nothing non-finite is ever saved)."""


class CheckpointNotSaved(OSError):
    """The final checkpoint could not be written; the message names the one that is intact."""


def all_finite(tree) -> bool:
    """Whether every floating-point tensor in ``tree`` is finite (one device sync)."""
    xs = [x for x in optree.tree_leaves(tree, namespace="") if torch.is_tensor(x) and x.is_floating_point()]
    if not xs:
        return True
    try:  # the norms are finite unless a value is NaN/inf or so large that its norm overflows
        norms = torch._foreach_norm(xs)
        if bool(torch.isfinite(torch.stack([n.float().to(norms[0].device) for n in norms])).all()):
            return True
    except (RuntimeError, AttributeError, TypeError):  # mixed devices, an older torch
        pass
    # the exact check: a float16 tensor of a million 100s is finite although its norm is inf
    return all(bool(torch.isfinite(x).all()) for x in xs)


class Checkpointer:
    """Saves a run's state to ``path`` (rank 0 only; every rank waits) and remembers the last
    step that is safely on disk, for the error messages."""

    def __init__(self, path: Path, cfg: TrainConfig, parallel, every: int, last_saved: Optional[int]):
        self.path, self.cfg, self.par, self.every, self.last_saved = path, cfg, parallel, every, last_saved

    def where(self) -> str:
        """Where the run can be continued from, for an error message."""
        if self.last_saved is None:
            return (f"no checkpoint was written (checkpoints every {self.every} steps)" if self.every
                    else "no checkpoint was written (--ckpt-every 0: only at the end)")
        return f"the last good checkpoint (step {self.last_saved}) in {self.path} is intact"

    def save(self, step: int, final: bool, params, opt_state, imp, extra: dict, teacher=None) -> None:
        """``teacher``: a self-distillation snapshot in use, saved beside the importance state
        (``{"importance": ..., "teacher": ...}``) so a resume continues with it."""
        if not all_finite(params):  # never written as "last good"
            raise TrainingDiverged(f"the parameters are NaN or inf at step {step}; not saved; "
                                   f"{self.where()}. Try a lower learning rate (now {self.cfg.lr}).")
        extra = {"train_config": config_json(self.cfg), **extra}
        if self.par.is_main:  # the checkpoint holds only the global state: written once
            try:
                checkpoint.save(self.path, params, self.cfg.model, opt_state=opt_state,
                                state=tuple(imp) if teacher is None else {"importance": tuple(imp),
                                                                          "teacher": teacher},
                                extra=extra, step=step)
            except Exception as err:  # noqa: BLE001  (disk full, read-only, a missing module, ...)
                last = self.last_saved
                kept = (f"the previous checkpoint (step {last}) in {self.path} is intact"
                        if last is not None else "no checkpoint has been written yet")
                what = f"could not save the checkpoint at step {step} ({type(err).__name__}: {err}); {kept}"
                if final:
                    raise CheckpointNotSaved(f"{what}. Fix the cause and run again"
                                             + (" with --resume" if last is not None else "")
                                             ) from err
                tqdm.write(f"warning: {what}; training goes on and saves again at the next "
                           "checkpoint", file=sys.stderr)
            else:
                self.last_saved = step
        self.par.barrier()


def _no_checkpoint(err: FileNotFoundError) -> UsageError:
    return UsageError(f"--resume: {err}: there is no checkpoint to continue from; start a new "
                      "run without --resume (with --overwrite if the directory holds an "
                      "unfinished one)")


def _train_config(ckpt_path: Path, extra: dict) -> dict:
    """The run's saved ``TrainConfig`` (JSON); UsageError for a checkpoint not written by train."""
    if not isinstance(extra.get("train_config"), dict):
        raise UsageError(f"--resume: {ckpt_path} was not written by `ecospa train` (it holds no "
                         "training state; `ecospa compress` writes such checkpoints): evaluate or "
                         "compress it instead, or start a new run in another --out")
    return extra["train_config"]


def stored_config(ckpt_path: Path) -> TrainConfig:
    """The settings the run in ``ckpt_path`` was made with (read from the manifest only), which
    ``--resume`` continues with; UsageError when there is no train checkpoint there."""
    try:
        extra = checkpoint.load_extra(ckpt_path)
    except FileNotFoundError as err:
        raise _no_checkpoint(err) from err
    return config_from_json(_train_config(ckpt_path, extra))


def _importance_ok(state, extra: dict) -> bool:
    """The checkpoint's state tree: the importance state, or, while self-distilling (``extra``'s
    "distill" set), {"importance": ..., "teacher": params tree}."""
    if isinstance(extra.get("distill"), dict):
        return (isinstance(state, dict) and set(state) == {"importance", "teacher"}
                and isinstance(state["importance"], (tuple, list)) and isinstance(state["teacher"], dict))
    return isinstance(state, (tuple, list))


def load_for_resume(ckpt_path: Path, cfg: TrainConfig) -> checkpoint.Checkpoint:
    """The checkpoint to continue from, checked: complete, finite, and made with settings that
    ``cfg`` continues exactly (``check_resumable``)."""
    try:
        ck = checkpoint.load_full(ckpt_path)
    except FileNotFoundError as err:
        raise _no_checkpoint(err) from err
    extra = ck.extra
    saved = _train_config(ckpt_path, extra)
    state_ok = (isinstance(extra.get("dense"), dict) and whole(extra.get("dense_params"))
                and isinstance(extra.get("rounds_done"), list) and ck.opt_state is not None
                and _importance_ok(ck.state, extra) and whole(ck.step) and ck.step >= 0)
    if not state_ok:
        raise ValueError(f"{ckpt_path}: the training state in the checkpoint is incomplete "
                         "(dense sizes, rounds, optimizer or importance state, step)")
    if not all_finite(ck.params):
        raise ValueError(f"{ckpt_path} holds NaN or inf parameters (written after the loss diverged, "
                         "by an ecospa before issue 9's fix); start a new run (--overwrite) with a "
                         "lower learning rate")
    check_resumable(cfg, saved, ck.step)
    return ck


__all__ = ["TrainingDiverged", "CheckpointNotSaved", "Checkpointer", "all_finite", "load_for_resume",
           "stored_config"]
