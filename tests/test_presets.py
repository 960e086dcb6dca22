"""Each published preset's exact pipeline (train() with its own optimizer settings, LR shape,
estimator and PruneSchedule) at toy size on CPU, offline (pydoc text, byte tokenizer), so the
presets keep running before a GPU and C4 / WikiText are at hand."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from ecospa.func.families import family
from ecospa.train import presets, train
from ecospa.train.flops import train_step_flops

KEPT_AS_PUBLISHED = ("lr", "min_lr_ratio", "weight_decay", "b1", "b2", "clip_norm", "estimator", "seed",
                     "compile")


def test_published_list_is_the_presets():
    assert set(presets.PUBLISHED) <= set(presets.PRESETS)
    assert {n for n in presets.PRESETS if n.startswith(("llama-", "gpt2-")) and n != "gpt2-tiny"} == \
        set(presets.PUBLISHED)


@pytest.mark.parametrize("name", presets.PUBLISHED)
def test_shrunk_preset_pipeline_runs(name, tmp_path):
    full = presets.get(name)
    cfg = dataclasses.replace(presets.shrink(full), out=str(tmp_path / name))
    for k in KEPT_AS_PUBLISHED:
        assert getattr(cfg, k) == getattr(full, k), k
    assert cfg.model.name == full.model.name
    assert getattr(cfg.model, "tie_embeddings", None) == getattr(full.model, "tie_embeddings", None)
    p, q = cfg.prune, full.prune
    assert (p.rounds, p.ramp, p.sparsity, p.budget) == (q.rounds, q.ramp, q.sparsity, q.budget)
    assert len(p.rounds_at()) == q.rounds and p.rounds_at()[-1][0] < cfg.steps

    r = train(cfg, progress=False)

    assert [s for s, _, _ in r["rounds"]] == [s for s, _ in p.rounds_at()]
    assert r["reached"]["rounds"] == q.rounds
    for kind, got in r["reached"]["sparsity"].items():  # 50% of every kind's units, up to rounding
        assert abs(got - q.sparsity) <= 0.25, (kind, got)
    assert r["kept_params"] < r["dense_params"]
    assert all(math.isfinite(x) for x in r["losses"]) and math.isfinite(r["val_ppl"])
    assert r["losses"][-1] < r["losses"][0]
    fam = family(cfg.model.name)
    dense = train_step_flops(fam.init(cfg.model, 0), cfg.model.name, cfg.batch_size, cfg.seq_len)
    final = train_step_flops(r["params"], cfg.model.name, cfg.batch_size, cfg.seq_len)
    first = p.rounds_at()[0][0]
    assert final < dense and first * dense + (cfg.steps - first) * final < r["train_flops"] < cfg.steps * dense
    lines = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert sum(1 for m in lines if m.get("event") == "prune") == q.rounds
    assert (tmp_path / name / "checkpoint").exists()


def test_small_preset_is_the_capacity_regime_data():
    cfg = presets.get("small")
    assert cfg.data == "stdlib" and cfg.prune.budget == 0.5 and cfg.prune.rounds_at()[-1][0] < cfg.steps
