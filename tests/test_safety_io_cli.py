"""compress / eval / HF export never lose a user's data, validate before loading, and read what
``ecospa train`` writes (issue 9: B1, B9, B10, C)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch

from ecospa import cli
from ecospa.errors import UsageError
from ecospa.func import gpt2, llama
from ecospa.io import hf_gpt2, hf_llama
from ecospa.jobs.compress import Job, compress

gguf = pytest.importorskip("gguf")
from test_gguf import HF_CFG, _hf_state_dict, write_gguf  # noqa: E402

CFG = llama.Config(vocab_size=40, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)
FAST = dict(steps=2, batch_size=2, seq_len=32, calib_batches=1, eval_seq_len=64, eval_windows=2,
            progress=False)
FAST_FLAGS = ["--steps", "2", "--batch-size", "2", "--seq-len", "32", "--calib-batches", "1",
              "--eval-seq-len", "64", "--eval-windows", "2"]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    alpha = _byte_alphabet()
    tokens = [alpha[b] for b in range(256)] + ["Ġt", "he", "Ġthe", "in"]
    info = {"tokens": tokens, "merges": ["Ġ t", "h e", "Ġt he", "i n"], "token_type": [1] * 260}
    c = dict(HF_CFG, vocab_size=len(tokens), intermediate_size=64)
    path = tmp_path_factory.mktemp("model") / "tiny.gguf"
    write_gguf(path, _hf_state_dict(c), c, tokenizer=info)
    return path


def _tree(root) -> dict:
    """{relative path: sha256} of every file under root (what must stay untouched)."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: validation must come first."""
    import ecospa.io.load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(ecospa.io.load, "load_model", refuse)


# --- B1: --export-hf only ever replaces an export of ours ----------------------------------------

def test_save_hf_refuses_a_foreign_directory(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("precious")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(b"\1\2")
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="not an ecospa export"):
        hf_llama.save_hf(llama.init(CFG), CFG, d)
    assert _tree(tmp_path) == before and sorted(os.listdir(tmp_path)) == ["mine"]


def test_save_hf_refuses_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "work.py").write_text("print(1)")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match="not an ecospa export"):
        hf_llama.save_hf(llama.init(CFG), CFG, ".")
    assert (tmp_path / "work.py").read_text() == "print(1)"


def test_save_hf_refuses_a_symlink(tmp_path):
    target = tmp_path / "real"
    hf_llama.save_hf(llama.init(CFG), CFG, target)  # even a link to our own export
    os.symlink(target, tmp_path / "link")
    before = _tree(tmp_path)
    with pytest.raises(UsageError, match="symbolic link"):
        hf_llama.save_hf(llama.init(CFG, seed=1), CFG, tmp_path / "link")
    assert _tree(tmp_path) == before


def test_save_hf_replaces_only_its_own_export(tmp_path):
    d = tmp_path / "hf"
    hf_llama.save_hf(llama.init(CFG), CFG, d)
    assert sorted(os.listdir(d)) == ["config.json", "model.safetensors"]
    assert "ecospa_export" in json.loads((d / "config.json").read_text())  # the marker
    gpt_cfg = gpt2.Config(vocab_size=11, dim=8, n_layers=1, n_heads=2, max_seq_len=8)
    hf_gpt2.save_hf(gpt2.init(gpt_cfg), gpt_cfg, d)  # a previous export of ours: replaced
    assert json.loads((d / "config.json").read_text())["model_type"] == "gpt2"
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    (d / "README.md").write_text("my notes")  # the user added a file: no longer only ours
    with pytest.raises(UsageError, match="README.md"):
        hf_llama.save_hf(llama.init(CFG), CFG, d)
    assert (d / "README.md").read_text() == "my notes"
    (d / "README.md").unlink()
    with open(d / "model.safetensors", "r+b") as f:  # weights edited since: not ours any more
        f.seek(-1, 2)
        f.write(b"\x7f")
    before = _tree(d)
    with pytest.raises(UsageError, match="not an ecospa export"):
        hf_llama.save_hf(llama.init(CFG), CFG, d)
    assert _tree(d) == before


def test_save_hf_into_an_empty_directory_and_under_a_file(tmp_path):
    (tmp_path / "empty").mkdir()
    hf_llama.save_hf(llama.init(CFG), CFG, tmp_path / "empty")
    assert (tmp_path / "empty" / "config.json").is_file()
    (tmp_path / "f").write_text("x")
    for bad in (tmp_path / "f", tmp_path / "f" / "sub"):
        with pytest.raises(UsageError, match="file"):
            hf_llama.save_hf(llama.init(CFG), CFG, bad)
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("where", ["parent", "cwd", "symlink"])
def test_compress_export_hf_refuses_before_loading(tiny_gguf, tmp_path, monkeypatch, capsys,
                                                    no_loading, where):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    model = model_dir / "m.gguf"
    model.write_bytes(tiny_gguf.read_bytes())
    if where == "parent":
        target = str(model_dir)
    elif where == "cwd":
        monkeypatch.chdir(model_dir)
        target = "."
    else:
        os.symlink(model_dir, tmp_path / "link")
        target = str(tmp_path / "link")
    before = _tree(tmp_path)
    rc = cli.main(["compress", "--model", str(model), "--budget", "0.3", "--export-hf", target,
                   *FAST_FLAGS])
    err = capsys.readouterr().err
    assert rc == 2 and "--export-hf" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


# --- B9: recovery divergence ---------------------------------------------------------------------

def test_compress_diverging_recovery_stops_and_saves_nothing(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "c"
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.3",
                   "--lr", "1e30", *FAST_FLAGS])
    err = capsys.readouterr().err
    assert rc == 1 and "diverged" in err and not out.exists()
    assert sorted(os.listdir(tmp_path)) == []


def test_compress_never_saves_nonfinite_params(tiny_gguf, tmp_path, monkeypatch):
    """The last update makes the params NaN while every loss seen (computed BEFORE its update)
    was finite: nothing may be saved, neither the checkpoint nor the HF export."""
    import optree

    from ecospa import optim
    real = optim.adamw

    def poisoned(*a, **k):
        opt = real(*a, **k)

        def update(grads, state, params, **kw):
            new, state = opt.update(grads, state, params, **kw)
            return optree.tree_map(lambda x: x * float("nan"), new, namespace=""), state

        return opt._replace(update=update)

    monkeypatch.setattr(optim, "adamw", poisoned)
    out = tmp_path / "c"
    with pytest.raises(ValueError, match="not finite"):
        compress(Job(str(tiny_gguf), out=str(out), export_hf=str(tmp_path / "hf"),
                     sparsity={"mlp": 0.5}, **dict(FAST, steps=1)))
    assert sorted(os.listdir(tmp_path)) == []


# --- C: every flag and path checked before loading -----------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--eval-windows", "0"], "--eval-windows"),
    (["--lr", "nan"], "--lr"), (["--lr", "inf"], "--lr"), (["--lr", "0"], "--lr"),
    (["--lr", "-1e-4"], "--lr"),
    (["--steps", "-1"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--threads", "-1"], "--threads"), (["--threads", "0"], "--threads"),
    (["--rounds", "0"], "--rounds"),
    (["--seq-len", "0"], "--seq-len"),
    (["--distill-weight", "1.5"], "--distill-weight"),
    (["--sparsity", "mpl=0.5"], "unknown group kinds"),
])
def test_compress_bad_flags_fail_before_loading(tiny_gguf, tmp_path, capsys, no_loading, flags, words):
    args = ["compress", "--model", str(tiny_gguf), "--out", str(tmp_path / "o")]
    if "--sparsity" not in flags:
        args += ["--budget", "0.3"]
    try:
        rc = cli.main(args + flags)
    except SystemExit as exit_:
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2 and words in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind", ["file", "under_file", "foreign_dir", "same_as_export",
                                  "too_long"])
def test_compress_bad_out_fails_before_loading(tiny_gguf, tmp_path, capsys, no_loading, kind):
    (tmp_path / "f").write_text("keep")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "data.txt").write_text("keep")
    out = {"file": tmp_path / "f", "under_file": tmp_path / "f" / "ck",
           "foreign_dir": foreign, "same_as_export": tmp_path / "x",
           "too_long": tmp_path / ("a" * 300)}[kind]
    extra = ["--export-hf", str(tmp_path / "x")] if kind == "same_as_export" else []
    before = _tree(tmp_path)
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.3",
                   *extra, *FAST_FLAGS])
    err = capsys.readouterr().err
    assert rc == 2 and "--out" in err and len(err.strip().splitlines()) == 1
    assert _tree(tmp_path) == before


def test_compress_out_may_be_an_empty_directory_or_an_earlier_checkpoint(tiny_gguf, tmp_path):
    out = tmp_path / "c"
    out.mkdir()
    compress(Job(str(tiny_gguf), out=str(out), budget=0.3, **dict(FAST, steps=0)))
    assert (out / "manifest.json").is_file()
    before = _tree(out)
    with pytest.raises(UsageError, match="--overwrite"):  # issue 23: never replaced without the flag
        Job(str(tiny_gguf), out=str(out), budget=0.3, **dict(FAST, steps=0))
    assert _tree(out) == before
    compress(Job(str(tiny_gguf), out=str(out), budget=0.3, overwrite=True, **dict(FAST, steps=0)))
    assert (out / "manifest.json").is_file()


@pytest.mark.parametrize("flags, words", [
    (["--seq-len", "0"], "--seq-len"), (["--batch-size", "0"], "--batch-size"),
    (["--eval-windows", "0"], "--eval-windows"), (["--max-windows", "0"], "--max-windows"),
    (["--threads", "-1"], "--threads"),
])
def test_eval_bad_flags_fail_before_loading(tiny_gguf, capsys, no_loading, flags, words):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["eval", "--model", str(tiny_gguf), *flags])
    assert exit_.value.code == 2 and words in capsys.readouterr().err


def test_hub_id_offline_says_what_was_tried(monkeypatch):
    from ecospa.io import load as models
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    try:
        from huggingface_hub import constants
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    except ImportError:
        pass
    with pytest.raises(ValueError) as info:
        models.load_model("no-such-org/no-such-model")
    text = str(info.value)
    assert "registered" in text and "local" in text and "hub" in text
    assert "offline" in text.lower() or "huggingface_hub" in text


def test_hub_id_without_huggingface_hub(monkeypatch):
    import builtins

    from ecospa.io import load as models
    real = builtins.__import__

    def fake(name, *a, **k):
        if name.startswith("huggingface_hub"):
            raise ImportError("No module named 'huggingface_hub'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ValueError, match=r"pip install.*huggingface_hub"):
        models.load_model("some-org/some-model")


# --- B10: eval and compress read what ecospa train writes -----------------------------------------

@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    from ecospa.schedule import PruneSchedule
    from ecospa.train import TrainConfig, train
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(model=llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=32),
                      batch_size=2, seq_len=32, steps=2, lr_warmup=1, eval_every=2, eval_batches=1,
                      log_every=1, prune=PruneSchedule(rounds=0), out=str(out))
    train(cfg, progress=False)
    return out / "checkpoint"


def test_eval_reads_a_train_checkpoint(train_run, capsys):
    rc = cli.main(["eval", "--model", str(train_run), "--seq-len", "32", "--max-windows", "2"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "perplexity" in captured.out


def test_load_model_gives_the_train_tokenizer(train_run):
    from ecospa.io.load import encode, load_model
    cfg, params, tok = load_model(str(train_run))
    ids = encode(tok, "héllo")
    assert ids.tolist() == list("héllo".encode("utf-8")) and ids.dtype == torch.long


def test_compress_reads_a_train_checkpoint(train_run, tmp_path):
    from ecospa.io.load import load_model
    out = tmp_path / "c"
    s = compress(Job(str(train_run), out=str(out), sparsity={"mlp": 0.5},
                     **dict(FAST, eval_seq_len=32)))
    assert s["ppl_recovered"] > 1
    _, params, tok = load_model(str(out))  # the compressed checkpoint keeps the tokenizer
    assert tok is not None and params["layers"][0]["w_up"].shape[1] == 16


@pytest.mark.parametrize("command", ["eval", "compress"])
def test_unknown_data_source_fails_before_loading(tiny_gguf, capsys, no_loading, command):
    extra = ["--budget", "0.3"] if command == "compress" else []
    rc = cli.main([command, "--model", str(tiny_gguf), "--data", "nope", *extra])
    assert rc == 2 and "unknown data source" in capsys.readouterr().err


def test_eval_accepts_the_train_run_directory(train_run, capsys):
    rc = cli.main(["eval", "--model", str(train_run.parent), "--seq-len", "32", "--max-windows", "1"])
    assert rc == 0 and "perplexity" in capsys.readouterr().out


def test_compress_out_cannot_be_the_input_checkpoint(train_run):
    for model in (train_run, train_run.parent):
        with pytest.raises(UsageError, match="input model"):
            Job(str(model), out=str(train_run), budget=0.3)
