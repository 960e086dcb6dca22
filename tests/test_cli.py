"""Every CLI error is one line: exit 2 for bad arguments, 1 for failures; --debug re-raises."""
from __future__ import annotations

import errno
import subprocess
import sys

import pytest

from ecospa import cli
from ecospa.errors import UsageError


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got:\n{err}"
    return lines[0]


@pytest.mark.parametrize("argv, needle", [
    (["train", "--device", "foo"], "unknown device 'foo'"),
    (["train", "--steps", "x"], "--steps"),
    (["eval", "--model", "m", "--threads", "-1"], "--threads"),
    (["nope"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_one_line(capsys, argv, needle):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    line = _one_line(capsys.readouterr().err)
    assert needle in line and line.startswith("ecospa")


def test_cuda_on_a_cpu_build_is_a_usage_error(capsys):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["train", "--device", "cuda"])
    assert exit_.value.code == 2
    assert "no usable CUDA" in _one_line(capsys.readouterr().err)


def _fake_command(monkeypatch, exc):
    def run(args):
        raise exc
    monkeypatch.setattr(cli.importlib.import_module("ecospa.cli.eval"), "run", run)


@pytest.mark.parametrize("exc, code, needle", [
    (UsageError("--out is a file"), 2, "--out is a file"),
    (ValueError("checkpoint is corrupt:\n  sha256 differs"), 1, "checkpoint is corrupt: sha256 differs"),
    (OSError(errno.ENOSPC, "No space left on device", "/x/model.safetensors"), 1, "disk full"),
    (OSError(errno.ENAMETOOLONG, "File name too long", "a" * 300), 1, "path too long"),
    (OSError(errno.EROFS, "Read-only file system", "/ro"), 1, "read-only"),
    (ModuleNotFoundError("No module named 'gguf'", name="gguf"), 1, "ecospa[hf]"),
])
def test_errors_become_one_line_with_the_right_code(monkeypatch, capsys, exc, code, needle):
    _fake_command(monkeypatch, exc)
    assert cli.main(["eval", "--model", "m"]) == code
    line = _one_line(capsys.readouterr().err)
    assert line.startswith("ecospa eval: error:") and needle in line
    assert ("--debug" in line) == (code == 1)


def test_debug_reraises_anywhere_on_the_line(monkeypatch):
    _fake_command(monkeypatch, ValueError("boom"))
    with pytest.raises(ValueError, match="boom"):
        cli.main(["eval", "--model", "m", "--debug"])
    monkeypatch.setenv("ECOSPA_DEBUG", "1")
    with pytest.raises(ValueError, match="boom"):
        cli.main(["eval", "--model", "m"])


def test_bugs_keep_their_traceback(monkeypatch):
    _fake_command(monkeypatch, ZeroDivisionError("a bug"))
    with pytest.raises(ZeroDivisionError):
        cli.main(["eval", "--model", "m"])


def test_module_entry_point_exit_code(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ecospa", "eval", "--model", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no model" in _one_line(out.stderr)  # names nothing: a usage error
