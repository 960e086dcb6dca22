"""`benchmarks/pretrain.py --quick` (the CI smoke of the pre-training benchmark) writes a results
file that `benchmarks/report.py` turns into the README section and the figure."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name):
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCH / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


def test_quick_pretrain_writes_what_the_report_reads(tmp_path):
    threads = torch.get_num_threads()
    out = tmp_path / "pretrain.json"
    try:
        load("pretrain").main(["--quick", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    res = json.loads(out.read_text())
    variants = [r["variant"] for r in res["rows"]]
    assert variants == ["dense", "dense-small", "ecospa", "uncoupled", "magnitude", "random"]
    rows = {r["variant"]: r for r in res["rows"]}
    dense = rows["dense"]
    for name, r in rows.items():
        assert r["curve"] and r["curve"][-1][0] == res["conditions"]["steps"], name
        assert r["train_flops"] == r["curve"][-1][2] > 0
        if name != "dense":  # smaller at the end, so fewer FLOPs than dense
            assert r["params"] < dense["params"] and r["train_flops"] < dense["train_flops"]
    assert abs(rows["dense-small"]["params"] / rows["ecospa"]["params"] - 1) < 0.02
    report = load("report")
    section = report.pretrain_section(res)
    assert "| ecospa |" in section and "EcoSpa / dense-small" in section and "FLOPs / dense" in section
    report.plot_pretrain(res, str(tmp_path / "pretrain.png"))
    assert (tmp_path / "pretrain.png").stat().st_size > 1000
