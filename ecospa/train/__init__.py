"""Sparse pre-training from scratch (``ecospa train``).

- ``step``: ``lm_loss``, ``make_step``, ``evaluate`` (shared with ``ecospa compress`` and ``eval``);
- ``config``: ``TrainConfig``, checked before anything runs; ``presets``: named configs;
- ``runtime``: one process (``LOCAL``) or data-parallel under torchrun (``DataParallel``);
- ``rundir``: the files a run owns in ``--out``; ``saving``: its checkpoints (save, resume);
- ``loop``: ``train(cfg)``: schedules, evaluation, metrics, checkpoints, exact resume.
"""
from ecospa._tree import count_params
from ecospa.train.config import TrainConfig, checkpoint_every, opt_lr
from ecospa.train.loop import CheckpointNotSaved, TrainingDiverged, train
from ecospa.train.step import StepOut, evaluate, lm_loss, make_step, peak_memory_mb

__all__ = ["TrainConfig", "TrainingDiverged", "CheckpointNotSaved", "checkpoint_every", "train",
           "make_step", "lm_loss", "evaluate", "count_params", "peak_memory_mb", "StepOut", "opt_lr"]
