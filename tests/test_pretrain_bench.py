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


def test_search_table_compares_at_the_last_common_evaluation():
    """Runs cut at a deadline (conditions: only a note, the preset's model) and full runs together:
    one line per configuration, dense vs dense-small at the last step both evaluated."""
    mod = load("pretrain")
    full = {"model": {"dim": 64, "n_layers": 2, "ffn_dim": 96}, "seq_len": 32, "batch_size": 4, "lr": 1e-3,
            "steps": 300}
    cut = {"lr": 1e-3, "steps": 600, "note": "cut at the deadline"}
    runs = [{"variant": "dense", "curve": [[100, 10.0, 1], [200, 8.0, 2], [300, 6.0, 3]], "conditions": full},
            {"variant": "dense-small", "curve": [[100, 10.5, 1], [200, 8.8, 2], [300, 6.6, 3]], "conditions": full},
            {"variant": "dense", "curve": [[100, 9.0, 1]], "conditions": cut},
            {"variant": "dense-small", "curve": [[100, 9.9, 1], [200, 7.0, 2]], "conditions": cut},
            {"variant": "dense", "curve": [[100, 1.0, 1]], "conditions": dict(full, lr=3e-3)}]  # no partner
    table = mod.search_table(runs)
    assert len(table) == 2
    a, b = table
    assert (a["dim"], a["compared at step"], a["tokens (M)"]) == (64, 300, 300 * 4 * 32 / 1e6)
    assert a["small / dense"] == 6.6 / 6.0 and a["small/dense by step"] == "100: 1.050; 200: 1.100; 300: 1.100"
    assert (b["dim"], b["planned steps"], b["compared at step"]) == (128, 600, 100)  # the preset's model
    assert b["small / dense"] == 9.9 / 9.0
