"""Ctrl-C at any moment of an ``ecospa`` command: one line, exit code 130, never a traceback
(issue 23 item 12).

The interrupt used to land while the entry points imported torch (the first 1-3 s), before the
CLI's error boundary was active: a KeyboardInterrupt traceback every time, and under load a
misleading error ("maximum recursion depth exceeded", "not a readable GGUF file") or none.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ecospa import _interrupt

ROOT = Path(__file__).resolve().parents[1]
CONSOLE_SCRIPT = textwrap.dedent("""\
    import re
    import sys
    from ecospa.cli import main
    if __name__ == "__main__":
        sys.argv[0] = re.sub(r"(-script\\.pyw|\\.exe)?$", "", sys.argv[0])
        sys.exit(main())
""")  # what pip writes for [project.scripts] ecospa = "ecospa.cli:main"


def _importing_torch(pid: int) -> bool:
    """Whether the process has started to load torch's libraries (it is inside the imports)."""
    try:
        return "/torch/" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _interrupt_at(cmd: list, delay: float, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``cmd`` (the worktree's ecospa first on the path), send SIGINT ``delay`` seconds after
    it began to import torch (or after ``delay`` + 0.5 s where /proc is missing), collect it."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), ECOSPA_DEBUG="0")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    if Path("/proc/self/maps").exists():
        deadline = time.monotonic() + 60
        while not _importing_torch(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
    else:
        time.sleep(0.5)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _assert_one_line_130(res: subprocess.CompletedProcess, prog: str) -> None:
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.returncode == 130, (res.returncode, res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prog) and lines[-1].endswith("interrupted"), res.stderr[-2000:]
    assert not any("error" in line for line in lines), res.stderr[-2000:]


TRAIN = ["train", "--steps", "100000", "--no-progress", "--out", "run"]


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.0, 0.4, 1.2])
def test_ctrl_c_while_python_m_ecospa_starts(tmp_path, delay):
    """While importing torch (0 s), the subcommands (later) or already training: always 130."""
    res = _interrupt_at([sys.executable, "-m", "ecospa", *TRAIN], delay, tmp_path)
    _assert_one_line_130(res, "ecospa")


@pytest.mark.slow
def test_ctrl_c_while_the_console_script_starts(tmp_path):
    script = tmp_path / "ecospa"
    script.write_text(CONSOLE_SCRIPT)
    res = _interrupt_at([sys.executable, str(script), *TRAIN], 0.0, tmp_path)
    _assert_one_line_130(res, "ecospa")


@pytest.mark.slow
def test_ctrl_c_while_the_harness_starts(tmp_path):
    res = _interrupt_at([sys.executable, "-m", "ecospa.cli.harness", "--model", "m", "--tasks", "t"],
                        0.0, tmp_path)
    _assert_one_line_130(res, "python -m ecospa.cli.harness")


@pytest.mark.parametrize("argv, prog", [
    (["python", "-m", "ecospa", "train"], "ecospa"),
    (["python", "-X", "utf8", "-W", "ignore", "-m", "ecospa.__main__"], "ecospa"),
    (["python", "-u", "-mecospa.cli.harness", "--tasks", "x"], "python -m ecospa.cli.harness"),
    (["python", "-Xdev", "-um", "ecospa"], "ecospa"),
    (["/venv/bin/python", "/venv/bin/ecospa", "eval"], "ecospa"),
    (["python", "-m", "pytest", "-m", "ecospa"], None),
    (["python", "-m", "ecospa.cli.train"], None),
    (["python", "-c", "import ecospa", "-m", "ecospa"], None),
    (["python", "benchmarks/compress.py"], None),
    (["python"], None),
])
def test_only_the_entry_points_take_over_ctrl_c(argv, prog):
    """A program or notebook that imports ecospa keeps Python's own KeyboardInterrupt."""
    assert _interrupt.entry_point(argv) == prog


def test_importing_ecospa_as_a_library_keeps_pythons_handler():
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_guard_is_released_for_the_boundary():
    """Guarded: our handler; released: Python's again (Ctrl-C is a KeyboardInterrupt that the
    boundary turns into 'interrupted' after the command's finally blocks ran)."""
    try:
        assert _interrupt.guard("ecospa")
        assert getattr(signal.getsignal(signal.SIGINT), "ecospa_guard", False)
    finally:
        _interrupt.release()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_main_releases_the_guard_before_the_command_runs(monkeypatch, capsys):
    """During the command, Ctrl-C is Python's KeyboardInterrupt again (the command's finally
    blocks run) and the boundary reports it: 'ecospa eval: interrupted', 130."""
    import ecospa.cli.eval
    from ecospa import cli
    seen = []

    def run(args):
        seen.append(signal.getsignal(signal.SIGINT))
        raise KeyboardInterrupt

    monkeypatch.setattr(ecospa.cli.eval, "run", run)
    try:
        assert _interrupt.guard("ecospa")
        rc = cli.main(["eval", "--model", "m"])
    finally:
        _interrupt.release()
    assert rc == 130 and seen == [signal.default_int_handler]
    assert capsys.readouterr().err == "ecospa eval: interrupted\n"


def test_the_guard_leaves_a_programs_own_handler_alone():
    def mine(signum, frame):
        pass

    old = signal.signal(signal.SIGINT, mine)
    try:
        assert not _interrupt.guard("ecospa")
        _interrupt.release()
        assert signal.getsignal(signal.SIGINT) is mine
    finally:
        signal.signal(signal.SIGINT, old)


# --- no loader catches KeyboardInterrupt (or an interrupted import) and re-labels it -------------

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    from test_gguf import HF_CFG, _hf_state_dict, write_gguf
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_gguf(path, _hf_state_dict(HF_CFG), HF_CFG)
    return path


@pytest.mark.parametrize("raised", [KeyboardInterrupt, ImportError, ModuleNotFoundError])
@pytest.mark.parametrize("where", ["reader", "tensor"])
def test_gguf_loader_does_not_relabel_an_interrupt(tiny_gguf, monkeypatch, raised, where):
    """A Ctrl-C inside the GGUF reader is a KeyboardInterrupt, and an import that failed (an
    interrupted or broken install) is an ImportError: neither is 'not a readable GGUF file'."""
    import gguf

    from ecospa.io import gguf as reader
    from ecospa.io.load import load_model

    def boom(*a, **k):
        raise raised("interrupted here")

    if where == "reader":
        monkeypatch.setattr(gguf, "GGUFReader", boom)
    else:
        monkeypatch.setattr(reader, "_array", boom)
    with pytest.raises(raised, match="interrupted here"):
        load_model(str(tiny_gguf))
