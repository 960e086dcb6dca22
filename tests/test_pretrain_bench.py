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


def _captured(tmp_path, argv):
    """pretrain.main(argv) with ``run`` replaced by a spy: the TrainConfig each variant would train
    and the results file it writes (no training)."""
    mod = load("pretrain")
    seen = []

    def spy(cfg, name, out_root):
        seen.append(cfg)
        return {"variant": name, "params": 1, "dense_params": 2, "val_ppl": 3.0, "train_flops": 4,
                "curve": [], "rounds": [], "seed": cfg.seed, "steps": cfg.steps,
                "tokens_per_s_final": 5.0, "wall_s": 6.0}

    mod.run = spy
    threads = torch.get_num_threads()
    out = tmp_path / "p.json"
    try:
        mod.main(["--preset", "small", "--out", str(out), "--variants", "ecospa", *argv])
    finally:
        torch.set_num_threads(threads)
    return seen, json.loads(out.read_text())


def test_every_schedule_lever_flag_reaches_the_schedule_it_trains(tmp_path):
    """The issue-27 levers of the benchmark, each at a non-default value, reach the PruneSchedule
    the run trains with (and the results file's conditions), with --gradual spreading the rounds
    over the run like ``schedule.gradual`` and not dropping the other levers."""
    from ecospa.schedule import gradual
    argv = ["--steps", "1000", "--rounds", "5", "--window", "30", "--ramp", "linear", "--rewarm", "7",
            "--moments", "reset", "--decay-steps", "20", "--distill-steps", "60", "--distill-weight", "0.3",
            "--carry", "0.4", "--gradual", "0.2", "0.6", "--budget", "0.4", "--seed", "3", "--tag", "t"]
    (cfg,), res = _captured(tmp_path, argv)
    s = cfg.prune
    want = gradual(1000, 5, 0.2, 0.6, window=30, ramp="linear", rewarm=7, moments="reset", decay_steps=20,
                   distill_steps=60, distill_weight=0.3, carry=0.4, budget=0.4, sparsity=None,
                   multiple_of=s.multiple_of)
    assert s == want
    assert (s.warmup_steps, s.every) == (200 - 30, 100)  # first round at 20% of 1000, then (0.6-0.2)*1000/4
    assert cfg.steps == 1000 and cfg.seed == 3
    assert res["rows"][0]["variant"] == "ecospa@t"
    assert res["conditions"]["schedule"]["carry"] == 0.4 and res["conditions"]["seed"] == 3


def test_schedule_flags_without_gradual_keep_the_preset_timing(tmp_path):
    """Without --gradual the preset's rounds stay where they are and each flag still lands."""
    from ecospa.train import presets
    base = presets.get("small").prune
    (cfg,), _ = _captured(tmp_path, ["--steps", "900", "--decay-steps", "25", "--carry", "0.7",
                                     "--prune-start", "123", "--every", "77"])
    s = cfg.prune
    assert (s.decay_steps, s.carry, s.warmup_steps, s.every) == (25, 0.7, 123, 77)
    assert (s.rounds, s.window, s.ramp, s.budget, s.sparsity) == (base.rounds, base.window, base.ramp, 0.5, None)
