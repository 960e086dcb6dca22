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


def test_summary_line_names_the_best_lever_by_its_mean_over_seeds():
    """Each EcoSpa row is compared with the dense-small row of ITS seed; the lever with the lowest
    mean ratio wins even when another has the single best seed."""
    summary_lines = load("summary_report").summary_lines
    rows = [{"variant": "dense-small", "seed": 0, "val_ppl": 4.0},
            {"variant": "dense-small@seed1", "seed": 1, "val_ppl": 5.0},
            {"variant": "ecospa@a", "seed": 0, "val_ppl": 3.6, "train_flops": 60},   # 0.90
            {"variant": "ecospa@a-seed1", "seed": 1, "val_ppl": 6.0, "train_flops": 80},  # 1.20 -> mean 1.05
            {"variant": "ecospa@b", "seed": 0, "val_ppl": 4.0, "train_flops": 70},   # 1.00
            {"variant": "ecospa@b-seed1", "seed": 1, "val_ppl": 5.1, "train_flops": 90}]  # 1.02 -> mean 1.01
    levers = {"conditions": {"dense_train_flops": 100}, "rows": rows}
    line = summary_lines(None, None, None, None, None, None, levers)
    assert "(`b`) ends at 1.010x" in line and "0.800x the dense model's training FLOPs" in line and "2 seeds" in line
