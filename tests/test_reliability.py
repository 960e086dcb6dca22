"""No command loses a finished result or overwrites its own input (issue 23, items 1-6, 10, 11, 15).

Failures are injected for real where the OS allows it: a process killed with ``os._exit`` in the
middle of an export (what kill -9 leaves), a file-size limit (``RLIMIT_FSIZE``: writes fail with
EFBIG like a full disk), a second process holding a run directory's lock. The previous output is
compared byte for byte after each failure.
"""
from __future__ import annotations

import contextlib
import io
import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ecospa import cli
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.io import checkpoint
from ecospa.io.files import WriteFailed, exclusive, lock_path, write_errors
from ecospa.jobs.compress import Job, compress

gguf = pytest.importorskip("gguf")
from test_safety_io_cli import FAST, FAST_FLAGS, _tree, no_loading, tiny_gguf  # noqa: E402,F401  (fixtures)

CFG = llama.Config(vocab_size=300, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def model_dir(tmp_path):
    """A native checkpoint of a small LLaMA (the input of the exports)."""
    return str(checkpoint.save(tmp_path / "model", llama.init(CFG, seed=0), CFG))


def _ecospa(*args, cwd=None, limit_bytes=None, timeout=240) -> subprocess.CompletedProcess:
    """``python -m ecospa ARGS`` in a child process (optionally with a file-size limit)."""
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill, as ENOSPC would be
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "ecospa", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout, preexec_fn=limit if limit_bytes else None)


def _cli(*args) -> subprocess.CompletedProcess:
    """``ecospa ARGS`` in this process (no interpreter start-up): its exit code and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = cli.main(list(args))
        except SystemExit as exit_:
            rc = exit_.code
    return subprocess.CompletedProcess(args, rc, "", err.getvalue())


def _one_line_error(proc, code: int) -> str:
    """The one error line of a failed command (progress bars aside), no traceback."""
    err = proc.stderr.strip()
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    lines = [x for x in err.splitlines() if x.startswith("ecospa ")]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


# --- item 1: a failed export keeps the job's result ----------------------------------------------

def test_failed_export_keeps_the_compressed_checkpoint(tiny_gguf, tmp_path, monkeypatch, capsys):
    """Before: the export ran before the checkpoint and its SafetensorError ended the job with a
    traceback and NO checkpoint."""
    from safetensors import SafetensorError

    import ecospa.io.hf_write as hf_write

    def full_disk(*a, **k):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(hf_write, "save_file", full_disk)
    out, exp = tmp_path / "c", tmp_path / "exp"
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.3",
                   "--export", str(exp), *FAST_FLAGS])
    captured = capsys.readouterr()
    assert rc == 1
    err = [x for x in captured.err.strip().splitlines() if x.startswith("ecospa compress")]
    assert len(err) == 1 and "No space left on device" in err[0] and "disk full" in err[0]
    assert str(exp) in err[0] and f"IS saved at {out}" in err[0]
    assert "FAILED" in captured.out  # the table says it too
    ck = checkpoint.load_full(out)  # the job's result is there and complete
    assert ck.extra["summary"]["rounds"][0]["steps"] == 2
    assert not exp.exists() and sorted(os.listdir(tmp_path)) == ["c"]  # no half export, no temp dir


def test_compress_without_out_keeps_its_result_in_runs_compress(tiny_gguf, tmp_path, monkeypatch):
    """Issue 25, item 1: no --out computed, exited 0 and kept nothing."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["compress", "--model", str(tiny_gguf), "--budget", "0.3", *FAST_FLAGS]) == 0
    assert checkpoint.load_full(tmp_path / "runs" / "compress").extra["summary"]["kept_params"] > 0
    before = _tree(tmp_path / "runs")
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--budget", "0.3", *FAST_FLAGS])
    assert rc == 2 and _tree(tmp_path / "runs") == before  # a second job never replaces it silently


# --- item 2: one writer per run directory --------------------------------------------------------

HOLD = textwrap.dedent("""
    import sys, time
    from ecospa.io.files import exclusive
    with exclusive(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(60)
""")


@pytest.fixture
def held(tmp_path):
    """A child process that holds the lock of tmp_path/run, like a running ``ecospa train``."""
    run = tmp_path / "run"
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    assert child.stdout.readline().strip() == "locked"
    yield run, child.pid
    child.kill()
    child.wait()


@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
def test_second_train_into_the_same_out_is_refused(held, tmp_path, capsys, flags):
    """Before: no lock; two runs interleaved metrics and replaced each other's checkpoints."""
    run, pid = held
    before = _tree(tmp_path)
    rc = cli.main(["train", "--preset", "tiny", "--steps", "2", "--out", str(run), *flags])
    err = capsys.readouterr().err
    assert rc == 2 and f"pid {pid}" in err and "another ecospa process" in err
    assert _tree(tmp_path) == before


def test_lock_is_released_and_survives_a_killed_holder(tmp_path):
    run = tmp_path / "runs" / "a"
    with exclusive(run):
        assert os.path.isfile(lock_path(run))
        with pytest.raises(UsageError, match=f"pid {os.getpid()}"):
            with exclusive(run):
                pass
    assert not os.path.exists(lock_path(run)) and not (tmp_path / "runs").exists()  # nothing left
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=ROOT))
    assert child.stdout.readline().strip() == "locked"
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert os.path.isfile(lock_path(run))  # a stale file ...
    with exclusive(run):  # ... does not block: the lock died with its process
        pass


def test_compress_holds_the_lock_of_its_out(tiny_gguf, held):
    run, pid = held
    with pytest.raises(UsageError, match=f"pid {pid}"):
        compress(Job(str(tiny_gguf), out=str(run), budget=0.3, **FAST))


# --- item 3: an export never replaces its own input ----------------------------------------------

@pytest.mark.parametrize("fmt, target", [("hf-compact", "."), ("hf-padded", "."), ("hf-compact", "sub"),
                                         ("gguf", "../model.gguf")])
def test_export_onto_its_own_input_is_refused(model_dir, tmp_path, fmt, target):
    """Before: hf-compact f32 -> f16 onto its own directory exited 0 and replaced the input."""
    src = tmp_path / ("m.gguf" if fmt == "gguf" else "src")
    first = _cli("export", "--model", model_dir, "--format", fmt, "--out", str(src))
    assert first.returncode == 0, first.stderr
    out = str(src) if fmt == "gguf" else os.path.normpath(os.path.join(str(src), target))
    before = _tree(tmp_path)
    proc = _cli("export", "--model", str(src), "--format", fmt, "--out", out, "--dtype", "f16",
                   "--overwrite")
    line = _one_line_error(proc, 2)
    assert "input --model" in line
    assert _tree(tmp_path) == before


# --- item 4: a killed export is recovered, its temporary files removed ---------------------------

KILL_BETWEEN_RENAMES = textwrap.dedent("""
    import os, sys
    import ecospa.io.hf_write as hw
    real, calls = os.replace, []
    def replace(a, b):
        calls.append(a)
        real(a, b)
        if len(calls) == 1:
            os._exit(9)   # killed after the old export was set aside, before the new one went in
    hw.os.replace = replace
    from ecospa import cli
    sys.exit(cli.main(sys.argv[1:]))
""")

KILL_WHILE_WRITING = textwrap.dedent("""
    import os, sys
    import ecospa.io.hf_write as hw
    real = hw.save_file
    def save_file(sd, path, **k):
        real(sd, path, **k)
        os._exit(9)       # killed with a full-size temporary directory on disk
    hw.save_file = save_file
    from ecospa import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def _killed(script, *args):
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=ROOT), timeout=240)


def test_export_killed_between_renames_is_recovered(model_dir, tmp_path):
    """Before: nothing was left at --out and the old export sat at *.old-* for good."""
    out = tmp_path / "exp"
    assert _ecospa("export", "--model", model_dir, "--format", "hf-padded", "--out", str(out)).returncode == 0
    before = _tree(out)
    args = ["export", "--model", model_dir, "--format", "hf-padded", "--out", str(out), "--overwrite",
            "--dtype", "f16"]
    assert _killed(KILL_BETWEEN_RENAMES, *args).returncode == 9
    assert not out.exists()  # what the kill left: the old export set aside
    from ecospa.io.load import load_model
    with pytest.warns(UserWarning, match="killed"):
        cfg, params, _ = load_model(str(out))  # readers find the previous export
    assert params["layers"][0]["wq"].dtype == torch.float32
    assert _killed(KILL_WHILE_WRITING, *args).returncode == 9
    assert _ecospa(*args[:-2], "--overwrite").returncode == 0  # the next export repairs everything
    assert sorted(os.listdir(tmp_path)) == ["exp", "model"]  # no .tmp-*, no *.old-*, no lock
    assert _tree(out) == before  # the same f32 export again, byte for byte


def test_gguf_export_killed_while_writing_leaves_nothing_after_the_next(model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    stray = tmp_path / ".tmp-m.gguf-abc123"
    stray.write_bytes(b"\0" * 1000)  # what a killed export leaves (mkstemp's name)
    assert _cli("export", "--model", model_dir, "--format", "gguf", "--out", str(out)).returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["m.gguf", "model"]


# --- item 5: compress never replaces a training run's checkpoint ---------------------------------

@pytest.mark.parametrize("flags", [[], ["--overwrite"]])
@pytest.mark.parametrize("where", ["checkpoint", "run"])
def test_compress_refuses_a_training_runs_checkpoint(tiny_gguf, tmp_path, capsys, no_loading, flags, where):
    """Before: ``compress --out RUN/checkpoint`` replaced the run's checkpoint without a flag."""
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoint", llama.init(CFG), CFG)
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(tmp_path)
    out = run / "checkpoint" if where == "checkpoint" else run
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.3",
                   *FAST_FLAGS, *flags])
    err = capsys.readouterr().err
    assert rc == 2 and "training run" in err
    assert _tree(tmp_path) == before


# --- item 6: --overwrite is needed to replace an HF export ---------------------------------------

@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact", "gguf"])
def test_second_export_needs_overwrite(model_dir, tmp_path, fmt):
    """Before: a second HF export replaced the first without --overwrite (GGUF already refused)."""
    out = str(tmp_path / ("e.gguf" if fmt == "gguf" else "e"))
    assert _cli("export", "--model", model_dir, "--format", fmt, "--out", out).returncode == 0
    before = _tree(tmp_path)
    line = _one_line_error(_cli("export", "--model", model_dir, "--format", fmt, "--out", out,
                                "--dtype", "f16"), 2)
    assert "--overwrite" in line and _tree(tmp_path) == before
    assert _cli("export", "--model", model_dir, "--format", fmt, "--out", out, "--dtype", "f16",
                "--overwrite").returncode == 0
    assert _tree(tmp_path) != before


# --- item 10: --steps must split into --rounds ---------------------------------------------------

@pytest.mark.parametrize("steps, rounds", [(2, 4), (10, 3), (7, 2)])
def test_steps_that_do_not_split_into_rounds_are_refused(tiny_gguf, steps, rounds):
    """Before: --steps 2 --rounds 4 silently ran 4 steps, --steps 10 --rounds 3 ran 9."""
    with pytest.raises(UsageError, match=f"--steps {steps} does not split into --rounds {rounds}"):
        Job(str(tiny_gguf), budget=0.3, steps=steps, rounds=rounds)


@pytest.mark.parametrize("steps, rounds", [(9, 3), (4, 4), (0, 3)])
def test_steps_that_split_run_exactly(tiny_gguf, steps, rounds):
    job = Job(str(tiny_gguf), budget=0.3, steps=steps, rounds=rounds)
    assert job.per_round * job.rounds == steps


# --- item 11: a full disk is one line naming the path, and keeps the previous output -------------

@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact", "gguf"])
def test_export_on_a_full_disk_is_one_line_and_keeps_the_previous(model_dir, tmp_path, fmt):
    """Before: HF exports ended in a SafetensorError traceback; GGUF said '... requested and ...
    written' without the path."""
    out = str(tmp_path / ("e.gguf" if fmt == "gguf" else "e"))
    assert _cli("export", "--model", model_dir, "--format", fmt, "--out", out).returncode == 0
    before = _tree(tmp_path)
    proc = _ecospa("export", "--model", model_dir, "--format", fmt, "--out", out, "--overwrite",
                   limit_bytes=20_000)
    line = _one_line_error(proc, 1)
    assert out in line and "unchanged" in line
    assert ("short write" if fmt == "gguf" else "File too large") in line
    assert _tree(tmp_path) == before  # the previous export byte for byte, no temporary files


def test_compress_on_a_full_disk_is_one_line(tiny_gguf, tmp_path):
    out = tmp_path / "c"
    proc = _ecospa("compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.3",
                   *FAST_FLAGS, limit_bytes=20_000)
    line = _one_line_error(proc, 1)
    assert str(out) in line and "no checkpoint was saved" in line
    assert sorted(os.listdir(tmp_path)) == []


def test_write_errors_names_a_full_disk():
    from safetensors import SafetensorError
    with pytest.raises(WriteFailed, match=r"could not write /x: No space left on device \(disk full"):
        with write_errors("/x", "kept"):
            raise SafetensorError('IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')
    with pytest.raises(WriteFailed, match="could not write /y: Permission denied .* the old one is kept"):
        with write_errors("/y", "the old one is kept"):
            raise PermissionError(13, "Permission denied")


# --- item 15: exported files get the umask's mode, not 0600 --------------------------------------

@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact", "gguf"])
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(model_dir, tmp_path, fmt, umask):
    """Before: model.safetensors / .gguf were 0600 whatever the umask."""
    from ecospa.io.load import load_model
    from ecospa.jobs.export import export
    cfg, params, _ = load_model(model_dir)
    old = os.umask(umask)
    try:
        path = export(params, cfg, str(tmp_path / ("e.gguf" if fmt == "gguf" else "e")), fmt)["path"]
    finally:
        os.umask(old)
    files = [path] if fmt == "gguf" else [os.path.join(path, f) for f in os.listdir(path)]
    assert files and {oct(os.stat(f).st_mode & 0o777) for f in files} == {oct(0o666 & ~umask)}
    if fmt != "gguf":
        assert os.stat(path).st_mode & 0o777 == 0o777 & ~umask
