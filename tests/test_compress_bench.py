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
    monkeypatch.setattr(sys, "argv", [BENCH, "--model", str(tiny_gguf), "--no-recovery", "--levels", "0.4",
                                      "--eval-windows", "2", "--threads", "1", "--out", str(out)])
    runpy.run_path(BENCH, run_name="__main__")
    res = json.loads(out.read_text())
    assert res["complete"] is True
    variants = [r["variant"] for r in res["ablation"]]
    abl = runpy.run_path(BENCH)["ABLATION"]
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
    text = report["compress_section"](res, {}, res)
    for label in report["ABLATION_LABELS"].values():
        assert label in text
    assert "not applicable: allocation 'protect'" in text


@pytest.mark.slow
def test_recovery_rows_carry_the_curve(tiny_gguf, tmp_path, monkeypatch):  # noqa: F811
    out = tmp_path / "rec.json"
    monkeypatch.setattr(sys, "argv", [BENCH, "--model", str(tiny_gguf), "--ablation", "--recipes",
                                      "obs+refit+4xdata+distill", "--levels", "0.4", "--steps", "2",
                                      "--eval-at", "1", "2", "--eval-windows", "2", "--threads", "1",
                                      "--out", str(out)])
    runpy.run_path(BENCH, run_name="__main__")
    res = json.loads(out.read_text())
    (row,) = res["recovery"]
    assert res["complete"] is True and row["job"]["recon_batches"] == 32
    assert [c["step"] for c in row["curve"]] == [1, 2] and row["curve"][-1]["ppl"] == row["ppl_recovered"]
    text = runpy.run_path("benchmarks/report.py")["compress_section"]({}, res, None)
    assert "refit/obs on 32 batches" in text and "Recovery curve, 40% obs+refit+4xdata+distill" in text
