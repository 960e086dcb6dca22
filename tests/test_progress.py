"""issue 25 item 5: every long phase shows progress with an ETA; in a log (not a terminal) as
plain lines at a modest rate, written while the job runs (not at its end)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def start(argv, log: Path, **env) -> subprocess.Popen:
    """``python -m ecospa ARGV`` with stdout and stderr in ``log`` (not a terminal)."""
    f = open(log, "w")
    return subprocess.Popen([sys.executable, "-m", "ecospa", *argv], stdout=f, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def first_seen(proc: subprocess.Popen, log: Path, pattern: str, timeout: float = 300):
    """Whether ``pattern`` was in the log while ``proc`` still ran (polled), and the exit code."""
    t0, seen = time.monotonic(), False
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        if re.search(pattern, log.read_text()):
            seen = True
            break
        time.sleep(0.05)
    return seen, proc.wait(timeout=timeout)


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_log_lines_are_rate_limited_and_carry_rate_and_eta():
    from ecospa import _progress
    clock, lines = Clock(), []
    bar = _progress.LogLines(600, "train", "step", initial=100, interval=10, clock=clock, write=lines.append)
    clock.t += 2.0
    bar.set_postfix(loss="3.410")
    bar.update(20)  # the first update is always shown: 20 steps in 2 s
    assert lines == ["train: step 120/600 loss 3.410 10.0 steps/s ETA 0:48"]
    for _ in range(9):  # 9 s more: nothing (less than the interval since the last line)
        clock.t += 1.0
        bar.update(20)
    assert len(lines) == 1
    clock.t += 1.0
    bar.update(20)  # 10 s after the last line: 220 steps in 12 s since the start
    assert lines[-1] == "train: step 320/600 loss 3.410 18.3 steps/s ETA 0:15"
    clock.t += 0.5
    bar.update(5)
    bar.close()  # the end is always shown
    assert lines[-1].startswith("train: step 325/600") and len(lines) == 3
    bar.close()
    assert len(lines) == 3


def test_slow_phases_say_seconds_per_unit_and_hours():
    from ecospa import _progress
    clock, lines = Clock(), []
    bar = _progress.LogLines(10_000, "recover", "step", interval=10, clock=clock, write=lines.append)
    clock.t += 4.0
    bar.update(1)
    assert lines == ["recover: step 1/10000 4.0 s/step ETA 11:06:36"]


@pytest.mark.slow
def test_train_in_a_log_shows_step_lines_while_it_runs(tmp_path):
    log = tmp_path / "train.log"
    proc = start(["train", "--steps", "20", "--batch-size", "4", "--eval-every", "10",
                  "--out", str(tmp_path / "run")], log)
    seen, rc = first_seen(proc, log, r"train: step \d+/20 .*(steps?/s|s/step) ETA")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert seen, f"no progress line while training; the log:\n{text[-3000:]}"
    assert re.search(r"train: step 20/20 loss [0-9.]+", text)
    assert text.index("train: step 20/20") < text.index("validation perplexity")


@pytest.mark.slow
def test_compress_in_a_log_reports_every_phase(tmp_path):
    pytest.importorskip("gguf")
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    from test_gguf import HF_CFG, _hf_state_dict, write_gguf
    alpha = _byte_alphabet()  # the model of test_compress's tiny_gguf
    tokens = [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in"]
    info = {"tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he", "i n"], "token_type": [1] * 260}
    c = dict(HF_CFG, vocab_size=len(tokens), intermediate_size=64)
    model = tmp_path / "tiny.gguf"
    write_gguf(model, _hf_state_dict(c), c, tokenizer=info)
    log = tmp_path / "compress.log"
    n = c["num_hidden_layers"]
    proc = start(["compress", "--model", str(model), "--out", str(tmp_path / "c"), "--budget", "0.3",
                  "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--calib-batches", "2",
                  "--recon-batches", "2", "--eval-seq-len", "64", "--eval-windows", "2",
                  "--rank-by", "obs", "--reconstruct"], log)
    seen, rc = first_seen(proc, log, r"calibrate: batch \d/2")
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert seen, text
    for line in (r"calibrate: batch 2/2 ", rf"obs scores \+ refit: layer {n}/{n} ",
                 r"recover: step 3/3 loss [0-9.]+ ", r"eval: batch (\d+)/\1 "):
        assert re.search(line + r".*ETA \d+:\d\d", text), (line, text)
    # the round's result is on stdout, flushed when it is known (before the recovery runs)
    assert text.index("round 1:") < text.index("recover: step")
