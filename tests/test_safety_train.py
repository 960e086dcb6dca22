"""issue 9: the training job never loses or mixes a run, never saves a NaN, and rejects nonsense
before it trains. Each test failed before its fix (see the issue's item in the docstring)."""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import optree
import pytest
import torch

import ecospa.cli
from ecospa.io import checkpoint, data
from ecospa.train import loop as train_mod, presets
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainingDiverged, train
from test_train import MICRO, assert_tree_equal

RMTREE, REPLACE = shutil.rmtree, checkpoint.os.replace
SHORT = dataclasses.replace(MICRO, steps=4, prune=PruneSchedule(warmup_steps=0, window=1, rounds=2,
                                                                every=1, sparsity=0.5))


def cli(argv, capsys):
    """(exit code, stderr) of ``ecospa ARGV``, argparse's own exits included."""
    try:
        rc = ecospa.cli.main(argv)
    except SystemExit as exit_:
        rc = exit_.code
    return rc, capsys.readouterr().err


@pytest.fixture
def micro_preset(monkeypatch):
    """``--preset micro``: the tests' tiny config, so CLI runs take a second."""
    monkeypatch.setitem(presets.PRESETS, "micro", MICRO)


def _no_training(monkeypatch):
    """Any training step fails loudly: what is validated must be validated before training."""
    def boom(*args, **kwargs):
        raise RuntimeError("training started")
    monkeypatch.setattr(data, "batch_at", boom)


@pytest.fixture
def no_training(monkeypatch):
    _no_training(monkeypatch)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def metric_lines(out: Path) -> list:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def leaves(tree):
    return optree.tree_leaves(tree, namespace="")


# --- A: the default job checkpoints periodically; a failed save keeps the previous one ----------

def test_default_job_checkpoints_at_every_evaluation(tmp_path, monkeypatch):
    args = ecospa.cli.build_parser()[0].parse_args(["train"])
    cfg = ecospa.cli.train.config_from_args(args)
    assert cfg.ckpt_every != 0 and train_mod.checkpoint_every(cfg) == cfg.eval_every == 100
    saved, real = [], checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda *a, **k: saved.append(k["step"]) or real(*a, **k))
    train(dataclasses.replace(MICRO, out=str(tmp_path)))  # MICRO keeps the default ckpt_every
    assert saved == [6, 12, 13]


def test_failed_save_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch, capsys):
    real, calls = checkpoint._write_tensors, {"n": 0}

    def no_numpy(path, tensors):  # the base install's failure: safetensors needs numpy to save
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (model, optim, state) is written, then none
            raise ModuleNotFoundError("No module named 'numpy'", name="numpy")
        return real(path, tensors)
    monkeypatch.setattr(checkpoint, "_write_tensors", no_numpy)
    with pytest.raises(OSError, match=r"step 13.*numpy.*previous checkpoint \(step 6\).*intact"):
        train(dataclasses.replace(MICRO, out=str(tmp_path)))
    err = capsys.readouterr().err
    assert "could not save the checkpoint at step 12" in err and "(step 6)" in err
    assert checkpoint.load_full(tmp_path / "checkpoint").step == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]


# --- B2: a new run never mixes with an old one ----------------------------------------------------

def test_new_run_refuses_a_directory_holding_another_run(tmp_path, capsys, monkeypatch, micro_preset):
    cfg = dataclasses.replace(SHORT, out=str(tmp_path))
    train(cfg, until=2)
    (tmp_path / "summary.json").write_text("{}")
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="already holds a training run.*--resume.*--overwrite"):
        train(cfg)
    assert snapshot(tmp_path) == before
    _no_training(monkeypatch)
    capsys.readouterr()  # the first run's progress lines (stderr is not a terminal here)
    rc, err = cli(["train", "--preset", "micro", "--out", str(tmp_path)], capsys)
    assert rc == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_the_old_runs_files(tmp_path, capsys, micro_preset):
    cfg = dataclasses.replace(SHORT, out=str(tmp_path))
    train(cfg, until=3)
    (tmp_path / "summary.json").write_text("{}")
    shutil.copytree(tmp_path / "checkpoint", tmp_path / ".checkpoint.old-1234")  # a leftover
    (tmp_path / "notes.txt").write_text("mine")
    rc, _ = cli(["train", "--preset", "micro", "--steps", "4", "--out", str(tmp_path), "--overwrite",
                 "--until", "2"], capsys)
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl", "notes.txt",
                                                          "summary.json"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert max(r["step"] for r in metric_lines(tmp_path)) == 2
    assert checkpoint.load_full(tmp_path / "checkpoint").step == 2
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2
    rc, err = cli(["train", "--out", str(tmp_path), "--overwrite", "--resume"], capsys)
    assert rc == 2 and "not allowed with" in err


def test_overwrite_refuses_a_foreign_checkpoint_path(tmp_path):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "thesis.tex").write_text("mine")
    with pytest.raises(UsageError, match="not an ecospa checkpoint"):
        train(dataclasses.replace(MICRO, out=str(tmp_path)), overwrite=True)
    assert (tmp_path / "checkpoint" / "thesis.tex").read_text() == "mine"


# --- B3: --until against the checkpoint ---------------------------------------------------------

def test_until_is_checked_against_the_checkpoint_step(tmp_path, capsys):
    cfg = dataclasses.replace(MICRO, out=str(tmp_path / "run"))
    train(cfg, until=5)
    before = snapshot(tmp_path)
    with pytest.raises(UsageError, match="until 4 .*step 5"):
        train(cfg, resume=True, until=4)
    for bad in (0, -5):
        with pytest.raises(UsageError, match="until"):
            train(cfg, resume=True, until=bad)
        with pytest.raises(UsageError, match="until"):
            train(dataclasses.replace(cfg, out=str(tmp_path / "new")), until=bad)
    assert snapshot(tmp_path) == before  # nothing saved, nothing created
    rc, _ = cli(["train", "--until", "0", "--out", str(tmp_path / "new")], capsys)
    assert rc == 2 and not (tmp_path / "new").exists()


# --- B4: never a NaN checkpoint; a true divergence message --------------------------------------

def test_diverged_parameters_are_never_saved(tmp_path):
    cfg = dataclasses.replace(MICRO, out=str(tmp_path), lr=1e6, ckpt_every=2)
    with pytest.raises(TrainingDiverged) as info:
        train(cfg)
    message = str(info.value)
    if (tmp_path / "checkpoint").exists():
        ck = checkpoint.load_full(tmp_path / "checkpoint")
        assert all(torch.isfinite(x).all() for x in leaves(ck.params))
        assert f"last good checkpoint (step {ck.step})" in message
    else:
        assert "no checkpoint" in message


def test_resume_refuses_a_checkpoint_with_nan_parameters(tmp_path):
    """As older versions wrote them after a divergence: resuming would diverge at once."""
    cfg = dataclasses.replace(MICRO, out=str(tmp_path))
    train(cfg, until=2)
    ck = checkpoint.load_full(tmp_path / "checkpoint")
    params = optree.tree_map(lambda x: x * float("nan"), ck.params, namespace="")
    checkpoint.save(tmp_path / "checkpoint", params, ck.cfg, opt_state=ck.opt_state, extra=ck.extra,
                    state=ck.state, step=ck.step)
    with pytest.raises(ValueError, match="NaN or inf parameters"):
        train(cfg, resume=True)


def test_divergence_message_is_true_when_nothing_was_saved(tmp_path, monkeypatch):
    real = train_mod.lm_loss

    def poisoned(forward, cfg):
        fn = real(forward, cfg)
        return lambda params, batch: fn(params, batch) * float("nan")
    monkeypatch.setattr(train_mod, "lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 0.*no checkpoint was written"):
        train(dataclasses.replace(MICRO, out=str(tmp_path), ckpt_every=0))
    assert not (tmp_path / "checkpoint").exists()


# --- B6: rounds that do not fit; requested and reached targets in the summary ------------------

@pytest.mark.parametrize("flags", [["--steps", "20", "--rounds", "100"], ["--rounds", "20"]])
def test_rounds_that_do_not_fit_are_rejected_before_training(tmp_path, capsys, no_training, flags):
    rc, err = cli(["train", *flags, "--out", str(tmp_path / "run")], capsys)
    assert rc == 2, err
    assert "do not fit" in err and "--rounds" in err and "--steps" in err
    assert not (tmp_path / "run").exists()


def test_summary_records_requested_and_reached_targets(tmp_path, capsys, micro_preset):
    out = tmp_path / "run"
    rc, _ = cli(["train", "--preset", "micro", "--budget", "0.4", "--out", str(out)], capsys)
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["target"] == {"sparsity": None, "budget": 0.4, "rounds": 2}
    assert s["reached"]["rounds"] == 2 and 0.4 <= s["reached"]["budget"] < 0.45
    assert set(s["reached"]["sparsity"]) == {"qk", "vo", "mlp"}
    assert s["reached"]["param_reduction"] == s["param_reduction"] > 0.2
    r = train(dataclasses.replace(MICRO, out=str(tmp_path / "s"), ckpt_every=0))
    assert r["target"]["sparsity"] == 0.5
    assert all(abs(v - 0.5) < 0.01 for v in r["reached"]["sparsity"].values())


# --- B7: kills between the renames, twice, then resume --------------------------------------------

class Killed(BaseException):
    """kill -9: nothing after it runs (no except, no cleanup)."""


def kill_between_renames(monkeypatch, nth: int):
    """The ``nth`` save that replaces a checkpoint dies between its two renames."""
    seen = {"aside": 0, "armed": False}

    def replace(src, dst):
        if seen["armed"]:
            monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # dead process
            raise Killed()
        if ".old-" in Path(dst).name:
            seen["aside"] += 1
            seen["armed"] = seen["aside"] == nth
        return REPLACE(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", replace)


def revive(monkeypatch):
    monkeypatch.setattr(checkpoint.os, "replace", REPLACE)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", RMTREE)


def test_killed_between_the_renames_twice_then_resume_is_exact(tmp_path, monkeypatch):
    cfg = dataclasses.replace(MICRO, ckpt_every=2)
    full = train(dataclasses.replace(cfg, out=str(tmp_path / "full")))
    run = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    kill_between_renames(monkeypatch, nth=1)  # saving step 4: step 2 moved aside
    with pytest.raises(Killed):
        train(run)
    revive(monkeypatch)
    kill_between_renames(monkeypatch, nth=2)
    with pytest.raises(Killed):
        train(run, resume=True)
    revive(monkeypatch)
    out = tmp_path / "run"
    assert not (out / "checkpoint").exists() and len(list(out.glob(".checkpoint.*"))) >= 2
    rest = train(run, resume=True)
    assert_tree_equal(rest["params"], full["params"])
    assert_tree_equal(rest["opt_state"], full["opt_state"])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "peak_mem_mb")}  # noqa: E731
                          for r in rows]
    assert strip(metric_lines(out)) == strip(metric_lines(tmp_path / "full"))


# --- B8: no duplicate metrics after a resume -----------------------------------------------------

def test_resume_drops_the_metrics_written_after_the_checkpoint(tmp_path, monkeypatch):
    full = tmp_path / "full"
    train(dataclasses.replace(MICRO, out=str(full)))
    cfg = dataclasses.replace(MICRO, out=str(tmp_path / "run"), ckpt_every=4)
    real = data.batch_at

    def killed_at_11(ids, step, *args, **kwargs):
        if step == 11:
            raise Killed()
        return real(ids, step, *args, **kwargs)
    monkeypatch.setattr(data, "batch_at", killed_at_11)
    with pytest.raises(Killed):
        train(cfg)  # checkpoint at step 8; metrics up to step 10 (a record at 9, the round at 10)
    monkeypatch.setattr(data, "batch_at", real)
    out = tmp_path / "run"
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "lo')  # a line cut by the kill
    train(cfg, resume=True)
    key = lambda rows: [(r.get("event"), r["step"], r.get("loss")) for r in rows]  # noqa: E731
    assert key(metric_lines(out)) == key(metric_lines(full))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "metrics.jsonl"]


# --- C: hostile or nonsense input, found before training ------------------------------------------

def test_resume_on_a_compress_checkpoint_is_a_clear_error(tmp_path):
    params = llama.init(MICRO.model, seed=0)
    checkpoint.save(tmp_path / "checkpoint", params, MICRO.model,
                    extra={"tokenizer": None, "summary": {"kept_params": 1}})
    with pytest.raises(UsageError, match="not written by `ecospa train`.*compress"):
        train(dataclasses.replace(MICRO, out=str(tmp_path)), resume=True)


def test_resume_without_a_checkpoint_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no checkpoint"):
        train(dataclasses.replace(MICRO, out=str(tmp_path)), resume=True)


def test_out_that_is_a_file_or_under_a_file(tmp_path, capsys, no_training):
    f = tmp_path / "file"
    f.write_text("x")
    for out in (f, f / "sub"):
        rc, err = cli(["train", "--out", str(out)], capsys)
        assert rc == 2 and "--out" in err and "not a directory" in err, err
    rc, err = cli(["train", "--out", str(tmp_path / ("a" * 5000))], capsys)
    assert rc == 2 and "too long" in err and len(err) < 400, err
    assert f.read_text() == "x"


def test_unreachable_budget_is_rejected_before_training(tmp_path, capsys, no_training):
    rc, err = cli(["train", "--budget", "0.999", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "budget 0.999" in err and "at most" in err, err
    assert not (tmp_path / "run").exists()


def test_unknown_sparsity_kind_is_rejected_before_training(tmp_path, capsys, no_training):
    rc, err = cli(["train", "--sparsity", "mpl=0.5", "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "mpl" in err
    with pytest.raises(UsageError, match="mpl"):
        train(dataclasses.replace(MICRO, out=str(tmp_path / "api"), prune=dataclasses.replace(
            MICRO.prune, sparsity={"mpl": 0.5})))


@pytest.mark.parametrize("flags", [
    ["--steps", "0"], ["--steps", "-3"], ["--lr", "nan"], ["--lr", "inf"], ["--lr", "0"],
    ["--lr", "-1e-3"], ["--eval-every", "-1"], ["--eval-every", "0"], ["--ckpt-every", "-1"],
    ["--until", "-5"], ["--rounds", "-1"], ["--batch-size", "0"], ["--device", "foo"],
    ["--budget", "1.5"], ["--sparsity", "0.5,mlp"], ["--dist-timeout", "0"], ["--seed", "-1"],
] + ([["--device", "cuda"]] if not torch.cuda.is_available() else []))
def test_bad_flags_are_argparse_errors(tmp_path, capsys, no_training, flags):
    rc, err = cli(["train", *flags, "--out", str(tmp_path / "run")], capsys)
    assert rc == 2 and "error: argument" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def test_config_rejects_bad_learning_rates():
    for lr in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(ValueError, match="lr"):
            dataclasses.replace(MICRO, lr=lr)
