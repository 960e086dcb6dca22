"""issue 25 item 2: ``ecospa eval`` takes its defaults from the model, so a run's checkpoint is
scored as ``ecospa train`` scored it (its context, batches and windows), and a window longer than
the trained context is warned about."""
from __future__ import annotations

import dataclasses
import re

import pytest

from ecospa import cli
from ecospa.func import llama
from test_eval_agreement import CFG
from ecospa.train import train


def _ppl(text: str, src: str) -> float:
    return float(re.search(rf"data {src}/val: .*perplexity ([0-9.]+)", text).group(1))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = dataclasses.replace(CFG, out=str(tmp_path_factory.mktemp("eval") / "run"))
    return cfg, train(cfg, progress=False)


def test_eval_with_defaults_reports_the_runs_validation_perplexity(run, capsys):
    cfg, result = run
    capsys.readouterr()
    assert cli.main(["eval", "--model", cfg.out]) == 0
    out, err = capsys.readouterr()
    assert _ppl(out, "pydoc") == round(result["val_ppl"], 3)  # the run's window 16, 12 windows
    assert f"{cfg.eval_batches * cfg.batch_size} windows x {cfg.seq_len}" in out
    assert "warning" not in err


def test_a_window_longer_than_the_trained_context_is_warned_about(run, capsys):
    cfg, _ = run
    capsys.readouterr()
    assert cli.main(["eval", "--model", cfg.out, "--data", "pydoc", "--seq-len", "32",
                     "--eval-windows", "2"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "warning" in x]
    assert len(lines) == 1 and "32" in lines[0] and "16" in lines[0], err
    capsys.readouterr()
    assert cli.main(["eval", "--model", cfg.out, "--data", "pydoc", "--seq-len", "16",
                     "--eval-windows", "2"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_other_models_default_to_at_most_their_context():
    from ecospa.jobs.evaluate import eval_defaults
    short = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=128)
    long = dataclasses.replace(short, max_seq_len=8192)
    assert eval_defaults(short, None)["seq_len"] == 128
    assert eval_defaults(long, None)["seq_len"] == 512
    assert eval_defaults(long, None)["max_windows"] == 40
    trained = {"seq_len": 16, "batch_size": 4, "eval_batches": 3, "data": "stdlib"}
    d = eval_defaults(long, trained)
    assert (d["seq_len"], d["batch_size"], d["max_windows"], d["data"][0]) == (16, 4, 12, "stdlib")


def test_compress_warns_about_windows_past_the_trained_context(run, capsys, monkeypatch, tmp_path):
    """The walkthrough's lesson: compress's defaults (256-token batches, 512-token windows) on a
    run trained at 16 tokens measured positions it never trained (dense ppl 7.66 vs 3.68)."""
    import ecospa.cli.compress as cli_compress

    def stop(job):
        raise RuntimeError("stopped after the checks")

    monkeypatch.setattr(cli_compress, "compress", stop)
    cfg, _ = run
    capsys.readouterr()
    rc = cli.main(["compress", "--model", cfg.out, "--budget", "0.3", "--seq-len", "16",
                   "--eval-seq-len", "32", "--out", str(tmp_path / "c")])
    warnings = [x for x in capsys.readouterr().err.splitlines() if "warning" in x]
    assert rc == 1 and len(warnings) == 1 and "--eval-seq-len 32" in warnings[0] and " 16 " in warnings[0]
    rc = cli.main(["compress", "--model", cfg.out, "--budget", "0.3", "--seq-len", "16",
                   "--eval-seq-len", "16", "--out", str(tmp_path / "c")])
    assert rc == 1 and "warning" not in capsys.readouterr().err
