"""Recompilation bound of the compiled training step, counted with dynamo's own counters:
one compile per new set of shapes (dense, then one per pruning round), none per step."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from ecospa.func import llama
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train

ROUNDS = 3
CFG = TrainConfig(
    model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
    batch_size=2, seq_len=16, steps=16, lr=1e-2, lr_warmup=2, eval_every=16, eval_batches=1,
    log_every=4, ckpt_every=0, compile=True,
    prune=PruneSchedule(warmup_steps=2, window=2, rounds=ROUNDS, every=3, sparsity=0.5))


def test_compiled_training_compiles_once_per_set_of_shapes(tmp_path, monkeypatch):
    """make_step compiles with torch.compile(dynamic=False); dynamo decides what to (re)compile,
    so its 'eager' backend (no codegen, seconds) counts the same compiles as inductor."""
    real_compile, calls = torch.compile, []

    def compile_eager(fn, **kw):
        compiled = real_compile(fn, **{**kw, "backend": "eager"})
        return lambda *a, **k: calls.append(1) or compiled(*a, **k)

    monkeypatch.setattr(torch, "compile", compile_eager)
    torch._dynamo.reset()
    counters.clear()
    out = train(CFG.__class__(**{**CFG.__dict__, "out": str(tmp_path / "run")}))
    assert len(out["rounds"]) == ROUNDS and out["steps"] == CFG.steps
    assert len(calls) == CFG.steps  # every step went through the compiled function
    shape_sets = 1 + ROUNDS  # dense, then every round changes the shapes
    # dynamo converted (compiled) a frame only for the first step of each set of shapes, into one
    # graph each (no graph breaks); the other steps were cache hits
    assert counters["frames"]["ok"] == counters["frames"]["total"] == shape_sets, dict(counters["frames"])
    assert counters["stats"]["unique_graphs"] == shape_sets, dict(counters["stats"])
