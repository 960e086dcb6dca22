"""benchmarks/compress.py runs end to end (on a tiny GGUF model, every ablation row) and writes a
complete results file that benchmarks/report.py turns into the README's tables."""
import json
import runpy
import sys

import pytest

pytest.importorskip("gguf")
from test_compress import tiny_gguf  # noqa: E402,F401  (the fixture)

BENCH = "benchmarks/compress.py"


@pytest.mark.slow
def test_ablation_rows_and_report(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "abl.json"
    abl = runpy.run_path(BENCH)["ABLATION"]
    monkeypatch.setattr(sys, "argv", [BENCH, "--model", str(tiny_gguf), "--no-recovery", "--levels", "0.4",
                                      "--ablation", *abl, "--workers", "1",
                                      "--eval-windows", "2", "--threads", "1", "--out", str(out)])
    runpy.run_path(BENCH, run_name="__main__")
    res = json.loads(out.read_text())
    assert res["complete"] is True
    variants = [r["variant"] for r in res["ablation"]]
    assert variants == list(abl)
    by = {r["variant"]: r for r in res["ablation"]}
    # a 2-layer model has no layer left to prune once its first and last are protected
    assert "too few" in by.pop("protect+obs+refit")["error"]
    for r in by.values():
        assert r["ppl_pydoc"] > 1 and r["ppl_stdlib"] > 1, r
        assert r["group_fraction_removed"] == pytest.approx(0.4, abs=0.1), r
    # the same Fisher counts: the obs rows differ from fisher+refit only in WHICH units are kept
    assert by["obs+refit"]["kept_params"] == by["fisher+refit"]["kept_params"] == by["obs+refit+4xdata"]["kept_params"] \
        == by["obs+refit+ridge1"]["kept_params"]
    assert by["obs+refit+ridge1"]["ppl_pydoc"] != by["obs+refit"]["ppl_pydoc"]  # the ridge reached the refit
    report = runpy.run_path("benchmarks/report.py")
    text = report["compress_section"](res)
    for label in report["ABLATION_LABELS"].values():
        assert label in text
    assert "not applicable: allocation 'protect'" in text


@pytest.mark.slow
def test_recovery_rows_carry_the_curve(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "rec.json"
    monkeypatch.setattr(sys, "argv", [BENCH, "--model", str(tiny_gguf), "--ablation", "--recipes",
                                      "obs+refit+4xdata+distill", "--levels", "0.4", "--steps", "2",
                                      "--eval-at", "1", "2", "--eval-windows", "2", "--threads", "1",
                                      "--workers", "1", "--out", str(out)])
    runpy.run_path(BENCH, run_name="__main__")
    res = json.loads(out.read_text())
    (row,) = res["recovery"]
    assert res["complete"] is True and row["job"]["recon_batches"] == 32
    assert [c["step"] for c in row["curve"]] == [1, 2] and row["curve"][-1]["ppl"] == row["ppl_recovered"]
    text = runpy.run_path("benchmarks/report.py")["compress_section"](res)
    assert "obs+refit+4xdata+distill (refit/obs on 32 batches)" in text
    c = row["curve"]
    assert f"1: {c[0]['ppl']:.2f} / {c[0]['ppl_extra']['stdlib']:.2f}; 2: {c[1]['ppl']:.2f}" in text


def test_job_default_recipe_is_the_jobs_defaults():
    """The benchmark's 'job-default' row must measure what `ecospa compress --budget F` does."""
    from ecospa.jobs.compress import Job
    recipe = runpy.run_path(BENCH)["RECIPES"]["job-default"]
    job = Job("smollm2-135m", budget=0.5)
    assert {k: getattr(job, k) for k in recipe} == recipe
    levers = {"estimator", "allocation", "rank_by", "reconstruct", "recon_batches", "ridge", "recon_target",
              "distill", "distill_weight", "lr_schedule", "warmup"}
    assert levers <= set(recipe)


@pytest.mark.slow
def test_workers_give_the_rows_of_one_process(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    """--workers 2 runs the tasks in separate processes: the same rows (bit for bit) in the same
    order as one process, and a recipe@level runs at that level only."""
    res = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}.json"
        monkeypatch.setattr(sys, "argv", [
            BENCH, "--model", str(tiny_gguf), "--levels", "0.4", "--ablation", "fisher", "uniform",
            "--rows-per-task", "2", "--recipes", "distill@0.4", "--steps", "1", "--eval-windows", "1",
            "--threads", "1", "--workers", str(workers), "--out", str(out)])
        runpy.run_path(BENCH, run_name="__main__")
        res[workers] = json.loads(out.read_text())
    one, two = res[1], res[2]
    assert one["complete"] and two["complete"] and two["conditions"]["workers"] == 2
    assert [(r["variant"], r["level"]) for r in one["recovery"]] == [("distill", 0.4)]
    assert [(r["variant"], r["level"]) for r in one["ablation"]] == [("fisher", 0.4), ("uniform", 0.4)]
    for part, keys in (("ablation", ("ppl_pydoc", "ppl_stdlib", "kept_params")),
                       ("recovery", ("ppl_pruned", "ppl_reconstructed", "ppl_recovered", "ppl_stdlib"))):
        assert [(r["variant"], r["level"]) for r in one[part]] == [(r["variant"], r["level"]) for r in two[part]]
        for a, b in zip(one[part], two[part], strict=True):
            assert {k: a[k] for k in keys} == {k: b[k] for k in keys}, (a, b)


def test_recipes_at_a_level_are_checked(tmp_path, monkeypatch, capsys):
    for bad in ("nosuch", "distill@0.3", "distill@x"):
        monkeypatch.setattr(sys, "argv", [BENCH, "--levels", "0.5", "--recipes", bad, "--out", str(tmp_path / "x.json")])
        with pytest.raises(SystemExit) as e:
            runpy.run_path(BENCH, run_name="__main__")
        assert e.value.code == 2 and "--recipes" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_lever_table_compares_the_rows_it_names():
    """Each lever's line is (row without it -> row with it) at the same level, on both texts."""
    report = runpy.run_path("benchmarks/report.py")
    abl = [{"part": "ablation", "variant": v, "level": 0.5, "ppl_pydoc": p, "ppl_stdlib": q, "kept_params": 1e6}
           for v, p, q in (("fisher", 40.0, 30.0), ("fisher+refit", 20.0, 33.0))]
    abl.append({"part": "ablation", "variant": "fisher+refit", "level": 0.25, "ppl_pydoc": 9.0,
                "ppl_stdlib": 9.0, "kept_params": 1e6})  # no 'fisher' row at 25%: no line
    rec = [{"part": "recovery", "variant": "distill", "level": 0.5, "steps": 80, "ppl_pruned": 40.0,
            "ppl_recovered": 16.0, "ppl_stdlib": 15.0, "seconds": 60.0}]
    res = {"ablation": abl, "recovery": rec, "dense": {"pydoc": 10.0, "stdlib": 5.0},
           "conditions": {"command": "python benchmarks/compress.py"}, "complete": True}
    lines = report["_lever_rows"](res)
    assert lines == ["| 50% | layer-wise ridge refit | 40.00 → 20.00 (0.50x) | 30.00 → 33.00 (1.10x) |",
                     "| 50% | 80 distilled recovery steps alone | 40.00 → 16.00 (0.40x) | 30.00 → 15.00 (0.50x) |"]
    text = report["compress_section"](res)
    assert "Each lever alone" in text and lines[0] in text


def test_verdict_says_met_or_missed_with_the_value():
    report = runpy.run_path("benchmarks/report.py")
    rec = [{"part": "recovery", "variant": "job-default", "level": 0.5, "steps": 80, "ppl_pruned": 90.0,
            "ppl_reconstructed": 30.0, "ppl_recovered": 17.0, "ppl_stdlib": 10.0, "seconds": 1.0}]
    peers = [{"level": 0.5, "steps": 80, "block_fraction_removed": 0.5, "ppl_pruned": 900.0, "ppl_recovered": 25.0}]
    res = {"ablation": [], "recovery": rec, "peers": peers, "dense": {"pydoc": 14.0, "stdlib": 8.0}}
    v = report["compress_verdict"](res)
    assert v == ["50% removed, after pruning and refit <= 35: 30.000 (met)",
                 "50% removed, after recovery <= 16.5: 17.000 (**MISSED**)",
                 "50% removed, after recovery / Torch-Pruning's best <= 0.65: 0.680 (**MISSED**)",
                 "50% removed, stdlib after recovery / dense <= 1.5: 1.250 (met)"]
