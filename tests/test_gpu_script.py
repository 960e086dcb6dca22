"""benchmarks/gpu.sh --device cpu --quick: the GPU script's dry run, so it cannot rot between
the sessions that are lent a GPU. Checks what it wrote, and that it never touched results/."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_script_dry_run_on_cpu(tmp_path):
    results = os.path.join(ROOT, "benchmarks", "results")
    before = {f: os.path.getmtime(os.path.join(results, f)) for f in os.listdir(results)}
    env = dict(os.environ, PY=sys.executable, OMP_NUM_THREADS="1")
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--device", "cpu", "--quick",
                          "--out", str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    check = json.loads((tmp_path / "cuda_check.json").read_text())
    kinds = {(c["model"], c["dtype"], c["check"]) for c in check["checks"]}
    assert all(c["ok"] for c in check["checks"])
    for model in ("llama", "gpt2"):
        for check_name in ("sliced_vs_masked", "compiled_vs_eager", "ecospa_vs_transformers"):
            assert (model, "torch.bfloat16", check_name) in kinds
    speed = json.loads((tmp_path / "speed_cpu.json").read_text())
    assert speed["conditions"]["dtype"] == "bfloat16" and speed["conditions"]["compile"]
    rows = speed["rows"]
    assert [r["kept_fraction"] for r in rows] == [1.0, 0.5]
    for r in rows:
        for key in ("prefill_b1_eager_speedup", "prefill_b1_compiled_speedup", "train_step_eager_speedup",
                    "train_step_compiled_speedup", "train_step_compiled_compile_s",
                    "train_peak_bytes_eager", "train_peak_bytes_compiled", "train_peak_ratio_eager"):
            assert key in r, key
        assert r["train_peak_bytes_eager"] > 0
    assert rows[1]["train_peak_bytes_eager"] < rows[0]["train_peak_bytes_eager"]  # pruned uses less
    ov = speed["overhead"]["llama-micro"]
    assert ov["ecospa_over_transformers"] > 0 and ov["ecospa_compiled_over_transformers_compiled"] > 0
    after = {f: os.path.getmtime(os.path.join(results, f)) for f in os.listdir(results)}
    assert after == before  # a dry run writes nothing into benchmarks/results


def test_gpu_script_refuses_to_dry_run_into_results():
    run = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--device", "cpu", "--quick",
                          "--out", os.path.join(ROOT, "benchmarks", "results")],
                         env=dict(os.environ, PY=sys.executable), capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "never writes over" in run.stderr
