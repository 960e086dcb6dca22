"""``ecospa generate`` and the loaders it uses say what is wrong in one line (issue 23 item 14):
a prompt that is not UTF-8, a corrupt tokenizer.json, a temperature or seed torch cannot use, a
checkpoint manifest that names another family than its tensors."""
from __future__ import annotations

import json
import os

import pytest
from _helpers import exit_and_stderr, one_line

from ecospa import cli
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.io import checkpoint
from ecospa.io._manifest import manifest_sha256
from ecospa.io.load import encode, load_model
from ecospa.jobs.generate import MIN_TEMPERATURE, check_options

CFG = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=32, max_seq_len=64)
NOT_UTF8 = os.fsdecode(b"ab\xff\xfecd")  # what Python makes of these argv bytes (surrogateescape)


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model gets loaded: validation must come first."""
    import ecospa.io.load

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the arguments were validated")

    monkeypatch.setattr(ecospa.io.load, "load_model", refuse)


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """An ecospa checkpoint of a 256-token llama (its tokenizer: bytes)."""
    return checkpoint.save(tmp_path_factory.mktemp("ck") / "ck", llama.init(CFG, seed=0), CFG)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers directory with a byte-level BPE tokenizer.json (what ecospa exports carry)."""
    pytest.importorskip("tokenizers")
    from ecospa.io.gguf_tokenizer import _byte_alphabet, build_tokenizer
    from ecospa.io.hf import save_hf
    out = tmp_path_factory.mktemp("hf") / "model"
    save_hf(llama.init(CFG, seed=0), CFG, str(out))
    alpha = _byte_alphabet()
    build_tokenizer({"model": "gpt2", "tokens": [alpha[b] for b in range(256)], "merges": [],
                     "token_type": [1] * 256}).save(str(out / "tokenizer.json"))
    return out


def _generate(argv, capsys):
    """(exit code, stderr) of ``ecospa generate ARGV``."""
    return exit_and_stderr(cli.main, ["generate", "--max-new-tokens", "2", *argv], capsys)


_one_line = one_line


# --- (a) a prompt that is not UTF-8 ------------------------------------------------------------

def test_prompt_that_is_not_utf8_is_a_usage_error(hf_dir, capsys, no_loading):
    rc, err = _generate(["--model", str(hf_dir), "--prompt", NOT_UTF8], capsys)
    line = _one_line(err)
    assert rc == 2 and "--prompt" in line and "not valid UTF-8" in line and "0xff 0xfe" in line


def test_encode_names_undecodable_text_whatever_the_tokenizer(hf_dir):
    """The library path (eval, the lm-eval adapter): a ValueError, not the TypeError the
    tokenizers package raises for lone surrogates."""
    _, _, tok = load_model(str(hf_dir))
    assert encode(tok, "abc").tolist() == [97, 98, 99]
    with pytest.raises(ValueError, match=r"not valid Unicode at character 2"):
        encode(tok, NOT_UTF8)


# --- (b) a corrupt tokenizer.json is not "no tokenizer" ------------------------------------------

def test_corrupt_tokenizer_json_is_named_with_the_parsers_reason(hf_dir, tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    for name in os.listdir(hf_dir):
        (bad / name).write_bytes((hf_dir / name).read_bytes())
    (bad / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    rc, err = _generate(["--model", str(bad), "--prompt", "hi"], capsys)
    line = _one_line(err)
    assert rc == 1 and "corrupt or unreadable" in line and str(bad / "tokenizer.json") in line
    assert "EOF while parsing" in line and "no tokenizer" not in line


def test_a_directory_without_tokenizer_files_still_has_no_tokenizer(hf_dir, tmp_path, capsys):
    bare = tmp_path / "model"
    bare.mkdir()
    for name in os.listdir(hf_dir):
        if name != "tokenizer.json":
            (bare / name).write_bytes((hf_dir / name).read_bytes())
    assert load_model(str(bare))[2] is None
    rc, err = _generate(["--model", str(bare), "--prompt", "hi"], capsys)
    assert rc == 1 and "has no tokenizer" in _one_line(err)


# --- (c) temperature and seed ranges -----------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--temperature", "1e-45"], "temperature"), (["--temperature", "0.00005"], "temperature"),
    (["--temperature", "nan"], "temperature"), (["--temperature", "-1"], "temperature"),
    (["--temperature", "inf"], "temperature"),
    (["--seed", "1e23"], "--seed"), (["--seed", str(10**23)], "--seed"),
    (["--seed", str(2**63)], "--seed"), (["--seed", "-1"], "--seed"),
])
def test_temperature_and_seed_out_of_range_exit_2_before_loading(capsys, no_loading, flags, words):
    rc, err = _generate(["--model", "m", "--prompt", "hi", *flags], capsys)
    assert rc == 2 and words in _one_line(err)


def test_the_extremes_of_the_ranges_generate(native, capsys):
    rc, err = _generate(["--model", str(native), "--prompt", "hi", "--temperature", str(MIN_TEMPERATURE),
                         "--seed", str(2**63 - 1)], capsys)
    assert rc == 0, err
    check_options(1, 0.0, None, 0)
    with pytest.raises(UsageError, match="seed"):
        check_options(1, 1.0, None, 2**63)
    with pytest.raises(UsageError, match="temperature"):
        check_options(1, 1e-45, None, 0)


# --- (d) a manifest that names another family than its tensors ---------------------------------

def test_manifest_claiming_another_family_says_they_disagree(native, tmp_path, capsys):
    edited = tmp_path / "ck"
    edited.mkdir()
    for name in os.listdir(native):
        (edited / name).write_bytes((native / name).read_bytes())
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["family"] = "gpt2"  # edited by hand, with a config gpt2 accepts and a fresh checksum
    manifest["config"] = {"vocab_size": 256, "dim": 16, "n_layers": 1, "n_heads": 2, "ffn_dim": 32,
                          "name": "gpt2"}
    manifest["manifest_sha256"] = manifest_sha256(manifest)
    (edited / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"manifest and the tensors disagree.*'gpt2'.*'llama' model"):
        checkpoint.load(edited)
    rc, err = _generate(["--model", str(edited), "--prompt", "hi"], capsys)
    line = _one_line(err)
    assert rc == 1 and "disagree" in line and "missing key" not in line
