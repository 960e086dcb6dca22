"""issue 25 item 3: ``ecospa train --out DIR --resume`` continues with the run's stored settings;
only the flags given on the resuming command line override them (and the exactness check applies
to what they change); a larger ``--steps`` extends the run."""
from __future__ import annotations

import json

import pytest

from ecospa.io import checkpoint
from test_safety_train import cli, micro_preset  # noqa: F401  (fixture)
from test_train import assert_tree_equal

RUN = ["train", "--preset", "micro", "--budget", "0.4", "--rounds", "2", "--lr", "0.02"]


def losses(out) -> list:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


def test_resume_with_only_out_continues_exactly(tmp_path, capsys, micro_preset):
    full, part = tmp_path / "full", tmp_path / "part"
    assert cli(RUN + ["--out", str(full)], capsys)[0] == 0
    assert cli(RUN + ["--out", str(part), "--until", "8"], capsys)[0] == 0
    rc, err = cli(["train", "--out", str(part), "--resume"], capsys)  # the README's line
    assert rc == 0, err
    got = dict(losses(part))  # (it also holds the line the --until run wrote at its stop, step 8)
    assert [(s, got.get(s)) for s, _ in losses(full)] == losses(full)  # bit for bit, through round 2
    a, b = checkpoint.load_full(part / "checkpoint"), checkpoint.load_full(full / "checkpoint")
    assert a.step == b.step == 13
    assert dict(a.extra["train_config"], out=None) == dict(b.extra["train_config"], out=None)
    assert_tree_equal(a.params, b.params)


def test_resume_with_more_steps_extends_the_run(tmp_path, capsys, micro_preset):
    out = tmp_path / "run"
    assert cli(RUN + ["--out", str(out)], capsys)[0] == 0
    rc, err = cli(["train", "--out", str(out), "--resume", "--steps", "20"], capsys)
    assert rc == 0, err
    ck = checkpoint.load_full(out / "checkpoint")
    assert ck.step == 20 and ck.extra["train_config"]["steps"] == 20
    assert ck.extra["train_config"]["prune"]["budget"] == 0.4  # the run's target, not the preset's
    assert [s for s, _ in losses(out)][-3:] == [15, 18, 20]
    assert len(ck.extra["rounds_done"]) == 2


@pytest.mark.parametrize("flag, field", [(["--sparsity", "0.25"], "prune"), (["--lr", "0.5"], "lr")])
def test_resume_refuses_a_flag_that_changes_the_computation(tmp_path, capsys, micro_preset, flag, field):
    out = tmp_path / "run"
    assert cli(RUN + ["--out", str(out), "--until", "4"], capsys)[0] == 0
    rc, err = cli(["train", "--out", str(out), "--resume", *flag], capsys)
    assert rc == 2 and f"cannot resume exactly: the checkpoint was made with different [{field!r}]" in err, err
    assert checkpoint.load_full(out / "checkpoint").step == 4
