"""benchmarks/job_rows.py records finished compress jobs as rows (replacing a row of the same
label, never another), and report.py's levers28 section renders exactly those numbers."""
from __future__ import annotations

import json
import os

import pytest

from ecospa.jobs.compress import Job, compress

pytest.importorskip("gguf")
from test_compress import tiny_gguf  # noqa: E402,F401  (fixture)
from test_benchmark_scripts import _module  # noqa: E402


def test_rows_from_checkpoints_and_their_section(tiny_gguf, tmp_path):
    fast = dict(batch_size=2, seq_len=32, calib_batches=1, recon_batches=1, eval_seq_len=64, eval_windows=2,
                progress=False)
    a = compress(Job(str(tiny_gguf), out=str(tmp_path / "a"), budget=0.5, steps=2, eval_at=(1,), **fast))
    b = compress(Job(str(tiny_gguf), out=str(tmp_path / "b"), budget=0.3, steps=0, **fast))
    rows, out = _module("job_rows"), tmp_path / "r.json"
    out.write_text(json.dumps({"rows": [{"label": "other", "keep": 1}, {"label": "A", "stale": True}]}))
    assert rows.main([str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out), "--label", "A", "--label", "B",
                      "--command", "cmd a", "--command", "cmd b", "--note", "1 thread"]) == 0
    res = json.loads(out.read_text())
    assert [r["label"] for r in res["rows"]] == ["other", "A", "B"] and "stale" not in res["rows"][1]
    ra, rb = res["rows"][1:]
    assert (ra["steps"], rb["steps"]) == (2, 0) and ra["command"] == "cmd a" and ra["note"] == "1 thread"
    assert ra["ppl_recovered"] == a["ppl_recovered"] and rb["ppl_recovered"] == b["ppl_reconstructed"]
    assert ra["ppl_reconstructed"] == a["rounds"][0]["ppl_reconstructed"]
    assert ra["ppl_extra"] == a["ppl_extra"] and ra["curve"] == a["curve"] and ra["job"]["budget"] == 0.5
    section = _module("levers28_report").levers28_section({"rows": [ra, rb]})
    std, dense_std = a["ppl_extra"]["stdlib"], a["ppl_dense_extra"]["stdlib"]
    assert f"| A | 2 | {a['rounds'][0]['ppl_reconstructed']:.2f} | 1: {a['curve'][0]['ppl']:.2f} / " in section
    assert f"| {a['ppl_recovered']:.2f} | {std:.2f} ({std / dense_std:.3f}x) |" in section
    assert "- B: `cmd b` (1 thread)" in section


def test_a_directory_without_a_compress_summary_is_refused(tmp_path):
    """A checkpoint that no compress job wrote (here: one saved with another extra) is refused by
    name; a missing directory says so; the results file is not touched in either case."""
    from ecospa.func import llama
    from ecospa.io import checkpoint
    rows = _module("job_rows")
    cfg = llama.Config(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, max_seq_len=8)
    checkpoint.save(str(tmp_path / "plain"), llama.init(cfg, seed=0), cfg, extra={"tokenizer": "bytes"})
    out = tmp_path / "r.json"
    with pytest.raises(SystemExit, match=r"plain: no compress summary in its manifest \(is it an `ecospa compress --out`\?\)"):
        rows.main([str(tmp_path / "plain"), "--out", str(out), "--label", "x", "--command", "y"])
    with pytest.raises(FileNotFoundError, match="nothing: no checkpoint directory here"):
        rows.row_of(str(tmp_path / "nothing"), "x", "y")
    assert not out.exists()


def test_the_readme_summary_reads_only_rows_at_the_current_defaults():
    """The README's compression line: rows of compress_levers28.json whose job is at today's
    defaults (a row without a later, behaviour-keeping field such as calib_text counts), at 80
    steps: an 80-step job's end or a longer job's step-80 point; never a row with a lever set, a row
    whose job lacks a field that changed the job (obs_ridge), or another step's number."""
    import dataclasses
    summary = _module("summary_report")
    base = json.loads(json.dumps(dataclasses.asdict(Job("m", budget=0.5, progress=False))))

    def row(budget, end, stdlib, steps=80, curve=(), **job):
        j = dict(base, budget=budget, steps=steps, **job)
        return {"job": {k: v for k, v in j.items() if v != "DROP"}, "ppl_recovered": end,
                "ppl_extra": {"stdlib": stdlib}, "ppl_dense": 10.0, "ppl_dense_extra": {"stdlib": 8.0},
                "curve": list(curve)}

    rows = [row(0.5, 99.0, 99.0, distill_weight=1.0),                     # a lever: not the defaults
            row(0.25, 11.0, 10.0, calib_text="DROP"),                     # recorded before calib_text
            row(0.5, 14.0, 16.0, steps=160, curve=[{"step": 40, "ppl": 20.0, "ppl_extra": {"stdlib": 20.0}},
                                                   {"step": 80, "ppl": 15.0, "ppl_extra": {"stdlib": 12.0}}]),
            row(0.75, 30.0, 30.0, obs_ridge="DROP"),                      # before --obs-ridge 0.01: not today's
            row(0.6, 31.0, 31.0, steps=40)]                               # no number at step 80
    line = summary.summary_lines(None, None, None, None, None, None, None, {"rows": rows})
    assert line == ("- **Compression** (SmolLM2-135M, the job's current defaults, 80 recovery steps, deduplicated "
                    "split; results/compress_levers28.json): 25% removed: pydoc val 10.00 -> 11.00, stdlib val "
                    "8.00 -> 10.00 (1.250x); 50% removed: pydoc val 10.00 -> 15.00, stdlib val 8.00 -> 12.00 "
                    "(1.500x).\n")


def test_the_recorded_levers_still_count_as_defaults_after_a_new_option():
    """A Job field added later with a behaviour-keeping default (--calib-text, --recovery-dtype)
    must be in summary_report.ADDED_AS_BEFORE, else every recorded row lacks it and the README's
    compression line loses its rows: the recorded file gives rows at 25% and at 50%."""
    summary = _module("summary_report")
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results", "compress_levers28.json")
    with open(path) as f:
        levers = json.load(f)
    assert [r[0] for r in summary._at_defaults(levers)] == [0.25, 0.5]
