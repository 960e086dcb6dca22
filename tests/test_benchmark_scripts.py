"""Benchmark scripts answer --help without working, and quick modes never replace the committed
results (issue 25 item 8: ``report.py --help`` regenerated everything, ``generate.py --quick``
overwrote the SmolLM2 numbers in results/generate.json)."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.glob("*.py") if '__name__ == "__main__"' in p.read_text())


def _digests() -> dict:
    """sha256 of every file under benchmarks/results and of README.md (report.py writes it)."""
    files = [p for p in (BENCH / "results").rglob("*") if p.is_file()] + [ROOT / "README.md"]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_every_script_is_found():
    assert {"generate.py", "report.py", "speed.py", "pretrain.py"} <= {p.name for p in SCRIPTS}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_help_answers_and_changes_nothing(script):
    before = _digests()
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("usage:"), out.stdout[:500]
    assert _digests() == before, f"{script.name} --help changed files"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCH))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCH))
    return module


def test_generate_quick_mode_writes_its_own_file():
    gen = _module("generate")
    full, quick = gen.results_path(quick=False), gen.results_path(quick=True)
    assert full == os.path.join(str(BENCH), "results", "generate.json")
    assert quick != full and os.path.dirname(quick) == os.path.dirname(full)
    assert gen.results_path(quick=True, out="/tmp/x.json") == "/tmp/x.json"  # --out wins


def test_vit_digits_quick_runs_and_writes_its_own_file(tmp_path):
    """The ViT digits demo end to end in a few steps (dense, pruned, small): the pruned model and
    the small dense one have the same block parameters, about half the dense ones."""
    pytest.importorskip("sklearn")
    import json

    import torch
    bench = _module("vit_digits")
    assert bench.results_path(quick=True) == os.path.join(str(BENCH), "results", "vit_digits_quick.json")
    assert bench.results_path(quick=False) == os.path.join(str(BENCH), "results", "vit_digits.json")
    out = tmp_path / "q.json"
    threads = torch.get_num_threads()
    bench.main(["--quick", "--out", str(out), "--threads", str(threads)])
    assert torch.get_num_threads() == threads
    res = json.loads(out.read_text())
    params = res["block_params"]
    assert params["pruned"] == params["small_from_scratch"] < params["dense"]
    # half of every coupled group's units; LayerNorms and the output biases stay whole
    assert 0.45 < params["pruned"] / params["dense"] < 0.6
    for k in ("dense", "dense_finetuned", "pruned", "small_from_scratch"):
        assert 0.0 <= res["summary"][k]["mean"] <= 1.0
    assert res["conditions"]["device"] == "cpu" and res["conditions"]["torch_threads"] == threads


def test_compile_decode_quick_compiles_one_layer_graph_per_shape_kind(tmp_path):
    """The per-layer compiled decoder (dynamo's eager backend: no codegen) on two layers of
    different pruned widths: tokens equal eager's, and dynamo built at most two graphs (prefill,
    step) for both layers together."""
    import json
    bench = _module("compile_decode")
    out = tmp_path / "c.json"
    bench.main(["--quick", "--modes", "eager", "layer", "forward", "--out", str(out)])
    res = json.loads(out.read_text())
    widths = res["conditions"]["widths"]
    assert len({w[2] for w in widths["0.5"]}) == 2 and len(widths["0.0"]) == 1  # pruned: the layers differ
    rows = {(r["budget"], r["mode"]): r for r in res["rows"]}
    assert set(rows) == {(b, m) for b in (0.0, 0.5) for m in ("eager", "layer", "forward")}
    for b in (0.0, 0.5):
        assert rows[b, "layer"]["tokens_equal_eager"] is True and 1 <= rows[b, "layer"]["graphs"] <= 2
        assert rows[b, "forward"]["max_abs_diff_vs_eager"] <= 1e-5
    want = rows[0.5, "layer"]["compile_and_first_s"] / rows[0.0, "layer"]["compile_and_first_s"]
    assert res["ratios"]["layer compile, budget 0.5 / dense"] == round(want, 3)


@pytest.mark.slow
def test_compile_decode_fresh_runs_each_row_in_its_own_process(tmp_path):
    import json
    bench = _module("compile_decode")
    out = tmp_path / "f.json"
    bench.main(["--quick", "--fresh", "--budgets", "0", "0.5", "--modes", "eager", "layer", "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["conditions"]["fresh_processes"] is True and set(res["conditions"]["widths"]) == {"0.0", "0.5"}
    assert [(r["budget"], r["mode"], r["process"]) for r in res["rows"]] == [
        (0.0, "eager", "0.0-layer"), (0.0, "layer", "0.0-layer"), (0.5, "eager", "0.5-layer"), (0.5, "layer", "0.5-layer")]
    assert all(r["tokens_equal_eager"] for r in res["rows"] if r["mode"] == "layer")
    assert set(res["ratios"]) == {"layer compile, budget 0.5 / dense", "layer tokens/s / eager, budget 0",
                                  "layer tokens/s / eager, budget 0.5"}


def test_gguf_compact_quick_mode_writes_its_own_file():
    bench = _module("gguf_compact")
    full, quick = bench.results_path(quick=False), bench.results_path(quick=True)
    assert full == os.path.join(str(BENCH), "results", "gguf_compact.json")
    assert quick != full and os.path.dirname(quick) == os.path.dirname(full)


def test_compress_memory_quick_mode_measures_every_phase(tmp_path):
    """benchmarks/compress_memory.py --quick: a tiny random LLaMA written by transformers (with a
    byte-level tokenizer.json) compressed in child processes; each row has the job's phases and
    a peak over the float32 bytes. It writes --out, never the committed results."""
    pytest.importorskip("transformers")
    mem = _module("compress_memory")
    assert mem.results_path(quick=True) != mem.RESULTS
    before = _digests()
    out = tmp_path / "mem.json"
    assert mem.main(["--quick", "--out", str(out)]) == 0
    assert _digests() == before
    import json
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["steps"]) for r in rows] == [("llama-tiny", 2)]
    for r in rows:
        names = [p["phase"] for p in r["phases"]]
        assert {"load", "calibrate", "obs scores + refit", "recover", "eval held-out"} <= set(names)
        assert r["peak_over_fp32"] > 0 and r["dense_bytes"] > 0 and r["peak_rss_mb_job"] > 0
        assert r["command"].startswith("ecospa compress --model llama-tiny --budget 0.5")


def test_obs_refit_quick_times_both_paths_and_finds_them_equal(tmp_path):
    """benchmarks/obs_refit.py --quick: both paths timed ``--reps`` times, the ratio to the
    separate path from the medians, and the two refit models equal; never the committed file."""
    bench = _module("obs_refit")
    out = tmp_path / "o.json"
    before = _digests()
    bench.main(["--quick", "--batches", "2", "--reps", "2", "--out", str(out)])
    assert _digests() == before
    import json
    res = json.loads(out.read_text())
    sep, fused = res["table"]
    assert [len(r["times_s"].split()) for r in (sep, fused)] == [2, 2]
    assert sep["ratio"] == 1.0 and fused["ratio"] == pytest.approx(fused["median_s"] / sep["median_s"], abs=0.01)
    assert res["max_abs_diff"] == 0.0
    assert res["conditions"]["batches"] == 2 and res["conditions"]["shape"] == "tiny"


def test_report_renders_the_obs_refit_results():
    res = {"conditions": {"device": "cpu", "shape": "s", "batches": 8, "rows": 4, "seq": 256, "reps": 3,
                          "load_avg_start": 0.5, "load_avg_end": 1.25},
           "table": [{"path": "separate", "median_s": 100.0, "times_s": "100.0 101.0 99.0", "ratio": 1.0},
                     {"path": "one pass", "median_s": 66.5, "times_s": "66.0 66.5 67.0", "ratio": 0.665}],
           "max_abs_diff": 0.0}
    text = _module("report").obs_refit_table(res)
    assert "| one pass | 66.5 | 66.0 66.5 67.0 | 0.665 |" in text
    assert "8 refit batches of 4 x 256 tokens, 3 alternating repetitions, load average 0.50 -> 1.25" in text
    assert text.endswith("largest difference between the two refit models: 0.")


def test_recovery_dtype_quick_times_both_dtypes_alternated(tmp_path):
    """benchmarks/recovery_dtype.py --quick: ``--reps`` measured steps of each dtype after a
    warm-up, the ratio from the medians, first losses that agree to bfloat16 rounding but are not
    equal (the bfloat16 step is really computed in bfloat16); never the committed file."""
    bench = _module("recovery_dtype")
    out = tmp_path / "r.json"
    before = _digests()
    bench.main(["--quick", "--reps", "3", "--out", str(out)])
    assert _digests() == before
    import json
    res = json.loads(out.read_text())
    f32, b16 = res["table"]
    assert [r["recovery_dtype"] for r in (f32, b16)] == ["float32", "bfloat16"]
    assert [len(r["times_s"].split()) for r in (f32, b16)] == [3, 3]
    assert f32["ratio"] == 1.0 and b16["ratio"] == pytest.approx(b16["median_s"] / f32["median_s"], abs=0.01)
    assert b16["first_loss"] != f32["first_loss"]
    assert b16["first_loss"] == pytest.approx(f32["first_loss"], rel=2e-2)
    assert res["conditions"]["shape"] == "tiny" and "cpu_bf16" in res["conditions"]


def test_report_renders_the_recovery_dtype_results():
    res = {"conditions": {"shape": "s", "rows": 4, "seq": 256, "reps": 5, "torch_threads": 2,
                          "cpu_capability": "AVX512", "cpu_bf16": False, "load_avg_start": 0.5, "load_avg_end": 1.25},
           "table": [{"recovery_dtype": "float32", "median_s": 8.0, "times_s": "8.0", "ratio": 1.0, "first_loss": 5.5},
                     {"recovery_dtype": "bfloat16", "median_s": 120.0, "times_s": "120.0", "ratio": 15.0,
                      "first_loss": 5.51}]}
    text = _module("report").recovery_dtype_table(res)
    assert "| bfloat16 | 120 | 120.0 | 15 | 5.51 |" in text
    assert text.endswith("5 alternating steps of each after a warm-up, 2 threads, CPU AVX512 WITHOUT bfloat16 "
                         "matmuls, load average 0.50 -> 1.25.")


def test_a_failed_results_write_keeps_the_earlier_file_and_leaves_no_temp(tmp_path):
    """benchmarks/_common.write_results: a payload that cannot be written (here: not JSON) raises,
    the earlier results file is unchanged and no temp file is left in the directory."""
    common = _module("_common")
    path = tmp_path / "r.json"
    common.write_results(str(path), {"a": 1})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        common.write_results(str(path), {"a": object()})
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
