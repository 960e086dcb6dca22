"""``python -m ecospa.cli.harness`` goes through the CLI's one error boundary: every bad input is
one line saying what is wrong and how to fix it, with the documented exit code (2: bad
arguments, found before lm-eval is imported or the model loaded; 1: a failure), never a
traceback (issue 23 item 13)."""
from __future__ import annotations

import sys

import pytest
from _helpers import exit_and_stderr, one_line

from ecospa.cli import harness


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: validation must come first."""
    import ecospa.io.load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(ecospa.io.load, "load_model", refuse)


@pytest.fixture
def tasks(monkeypatch):
    """lm-eval with a task index that knows 'toy_task' only (instead of indexing ~15000 YAMLs)."""
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.tasks

    class Index:
        def __init__(self, include_path=None, **_):
            self.include_path = include_path

        def match_tasks(self, names):
            return [n for n in names if n == "toy_task"]

    monkeypatch.setattr(lm_eval.tasks, "TaskManager", Index)


def _main(argv, capsys):
    """(exit code, stderr) of the harness command line."""
    return exit_and_stderr(harness.main, argv, capsys)


def _one_line(err: str) -> str:
    line = one_line(err)
    assert line.startswith("python -m ecospa.cli.harness"), err
    return line


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "--batch-size"), (["--batch-size", "x"], "--batch-size"),
    (["--limit", "-1"], "--limit"), (["--limit", "0"], "--limit"),
    (["--max-length", "0"], "--max-length"), (["--tasks", "a,,b"], "--tasks"),
])
def test_bad_flags_exit_2_before_anything_loads(capsys, no_loading, flags, words):
    argv = ["--model", "m", "--tasks", "toy_task", *flags]
    rc, err = _main(argv, capsys)
    assert rc == 2 and words in _one_line(err) and "--help" in err


@pytest.mark.parametrize("kind", ["missing_dir", "a_directory"])
def test_unwritable_out_exits_2_before_anything_loads(tmp_path, capsys, no_loading, monkeypatch, kind):
    """Checked before lm-eval is even imported: no evaluation runs for an hour to then fail."""
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    out = {"missing_dir": tmp_path / "no" / "such" / "r.json", "a_directory": tmp_path}[kind]
    rc, err = _main(["--model", "m", "--tasks", "toy_task", "--out", str(out)], capsys)
    line = _one_line(err)
    assert rc == 2 and "--out" in line and str(out) in line
    assert ("does not exist" if kind == "missing_dir" else "is a directory") in line


def test_missing_include_path_exits_2(tmp_path, capsys, no_loading, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    rc, err = _main(["--model", "m", "--tasks", "toy_task", "--include-path", str(tmp_path / "nope")],
                    capsys)
    line = _one_line(err)
    assert rc == 2 and "--include-path" in line and "does not exist" in line


def test_lm_eval_missing_says_how_to_install_it(capsys, no_loading, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` fails as if not installed
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)
    rc, err = _main(["--model", "m", "--tasks", "toy_task"], capsys)
    line = _one_line(err)
    assert rc == 1 and "lm-eval" in line and "pip install 'ecospa[eval]'" in line
    assert "ecospa[hf]" not in line


def test_unknown_task_exits_2_before_the_model_loads(capsys, no_loading, tasks):
    rc, err = _main(["--model", "m", "--tasks", "toy_task,hellaswagg"], capsys)
    line = _one_line(err)
    assert rc == 2 and "'hellaswagg'" in line and "toy_task" not in line
    assert "--include-path" in line


def test_bad_model_path_is_one_line(tmp_path, capsys, tasks):
    rc, err = _main(["--model", str(tmp_path / "nope"), "--tasks", "toy_task"], capsys)
    line = _one_line(err)
    assert rc == 2 and "no model" in line and str(tmp_path / "nope") in line  # names nothing: usage


def test_debug_shows_the_traceback(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ImportError, match="pip install"):
        harness.main(["--debug", "--model", "m", "--tasks", "toy_task"])
