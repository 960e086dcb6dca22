"""The cache of the dense model's held-out perplexities (ecospa.jobs.eval_cache): a second job on
the same weights and windows reads them, anything that changes the number changes the key, a bad
entry is recomputed, a cache that cannot be written never costs the job, and --no-eval-cache
touches nothing. conftest.py gives every test its own empty ECOSPA_CACHE_DIR."""
import json
import math

import pytest
import torch

from ecospa import cli
from ecospa.func import llama
from ecospa.jobs import compress as compress_mod
from ecospa.jobs import eval_cache
from ecospa.jobs.compress import Job, compress

pytest.importorskip("gguf")
from test_compress import tiny_gguf  # noqa: E402,F401  (the module-scoped fixture)

FAST = dict(steps=0, batch_size=2, seq_len=32, calib_batches=1, recon_batches=1, eval_seq_len=64,
            eval_windows=3, progress=False)


@pytest.fixture
def calls(monkeypatch):
    """The number of tokens of every perplexity the job computes."""
    seen = []
    real = compress_mod.perplexity

    def spy(forward, params, cfg, ids, **kw):
        seen.append(ids.numel())
        return real(forward, params, cfg, ids, **kw)

    monkeypatch.setattr(compress_mod, "perplexity", spy)
    return seen


def _entries() -> list:
    d = eval_cache.cache_dir()
    return sorted(p for p in d.iterdir() if p.suffix == ".json") if d.exists() else []


def test_a_second_job_reads_the_dense_perplexities_and_gets_the_same_numbers(tiny_gguf, calls, capsys):
    first = compress(Job(str(tiny_gguf), budget=0.5, **FAST))
    n_first = len(calls)
    assert first["dense_eval_cached"] == [] and len(_entries()) == 2  # pydoc val and stdlib val
    second = compress(Job(str(tiny_gguf), budget=0.5, **dict(FAST, progress=True)))
    assert len(calls) - n_first == n_first - 2  # the two dense evaluations are not run again
    assert second["dense_eval_cached"] == ["pydoc", "stdlib"]
    assert second["ppl_dense"] == first["ppl_dense"] and second["ppl_dense_extra"] == first["ppl_dense_extra"]
    assert second["ppl_pruned"] == first["ppl_pruned"]
    assert "read from the evaluation cache" in capsys.readouterr().out
    entry = json.loads(_entries()[0].read_text())
    assert entry["model"] == str(tiny_gguf) and entry["settings"]["seq_len"] == 64
    assert entry["settings"]["max_windows"] == 3 and entry["settings"]["chunked_loss"] is True


def test_the_job_really_uses_what_the_cache_holds_and_no_eval_cache_ignores_it(tiny_gguf, calls):
    """An entry planted for exactly these weights and windows is what the job reports (so it is
    read, not recomputed); with eval_cache=False the job evaluates, and writes nothing."""
    real = compress(Job(str(tiny_gguf), budget=0.5, **FAST))
    for p in _entries():
        e = json.loads(p.read_text())
        p.write_text(json.dumps(dict(e, ppl=123.5)))
    planted = compress(Job(str(tiny_gguf), budget=0.5, **FAST))
    assert planted["ppl_dense"] == 123.5 and planted["ppl_dense_extra"] == {"stdlib": 123.5}
    for p in _entries():
        p.unlink()
    off = compress(Job(str(tiny_gguf), budget=0.5, eval_cache=False, **FAST))
    assert off["ppl_dense"] == real["ppl_dense"] and off["dense_eval_cached"] == []
    assert _entries() == []


def test_another_window_setting_or_other_text_is_another_entry(tiny_gguf):
    """Each source is its own entry: without --eval-extra the pydoc number is still shared."""
    compress(Job(str(tiny_gguf), budget=0.5, **FAST))
    for change in (dict(eval_windows=2), dict(eval_seq_len=32), dict(eval_batch_size=2), dict(layerwise=False)):
        assert compress(Job(str(tiny_gguf), budget=0.5, **dict(FAST, **change)))["dense_eval_cached"] == [], change
    assert compress(Job(str(tiny_gguf), budget=0.5, eval_extra=(), **FAST))["dense_eval_cached"] == ["pydoc"]
    assert compress(Job(str(tiny_gguf), budget=0.5, **FAST))["dense_eval_cached"] == ["pydoc", "stdlib"]


def _model():
    cfg = llama.Config(vocab_size=40, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=24, max_seq_len=16)
    return cfg, llama.init(cfg, 0)


def test_the_fingerprint_changes_with_any_weight_dtype_path_or_config():
    cfg, p = _model()
    base = eval_cache.fingerprint(p, cfg)
    assert eval_cache.fingerprint(llama.init(cfg, 0), cfg) == base  # the same weights: the same key
    one_ulp = {**p, "norm": torch.nextafter(p["norm"], torch.full_like(p["norm"], 2.0))}
    bf = {**p, "norm": p["norm"].to(torch.bfloat16)}
    renamed = {**{k: v for k, v in p.items() if k != "norm"}, "norm_": p["norm"]}
    strided = {**p, "embed": p["embed"].t().contiguous().t()}  # same values, another layout
    for other, c in ((one_ulp, cfg), (bf, cfg), (renamed, cfg), (p, llama.Config(**{**cfg.__dict__, "norm_eps": 1e-6}))):
        assert eval_cache.fingerprint(other, c) != base
    assert eval_cache.fingerprint(strided, cfg) == base


def test_the_key_changes_with_the_tokens_the_settings_and_the_version(monkeypatch):
    ids = torch.arange(100)
    s = dict(seq_len=8, batch_size=1, max_windows=3, chunked_loss=True)
    k = eval_cache.entry_key("m", ids, s)
    assert eval_cache.entry_key("m", ids.clone(), dict(s)) == k
    others = [eval_cache.entry_key("m2", ids, s), eval_cache.entry_key("m", ids[:-1], s),
              eval_cache.entry_key("m", ids.flip(0), s), eval_cache.entry_key("m", ids.to(torch.int32), s)]
    others += [eval_cache.entry_key("m", ids, dict(s, **{f: v})) for f, v in
               (("seq_len", 9), ("batch_size", 2), ("max_windows", None), ("chunked_loss", False))]
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")  # another torch: other kernels
    others.append(eval_cache.entry_key("m", ids, s))
    monkeypatch.undo()
    monkeypatch.setattr(eval_cache, "CACHE_VERSION", eval_cache.CACHE_VERSION + 1)
    others.append(eval_cache.entry_key("m", ids, s))
    assert len(set(others)) == len(others) and k not in others


@pytest.mark.parametrize("content", ["{not json", json.dumps({"key": "KEY", "ppl": -1.0}),
                                     json.dumps({"key": "KEY", "ppl": 0.0}),
                                     json.dumps({"key": "KEY", "ppl": float("nan")}),
                                     json.dumps({"key": "KEY", "ppl": "12"}), json.dumps({"key": "KEY", "ppl": True}),
                                     json.dumps({"key": "other", "ppl": 12.0}), json.dumps({"ppl": 12.0}),
                                     json.dumps([12.0])])
def test_an_untrustworthy_entry_is_recomputed_and_replaced(content, capsys):
    ids, s = torch.arange(50), dict(seq_len=8)
    key = eval_cache.entry_key("m", ids, s)
    path = eval_cache.cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content.replace("KEY", key))
    ppl, hit = eval_cache.cached(lambda: 7.25, "m", ids, s, {"source": "x"})
    assert (ppl, hit) == (7.25, False)
    assert json.loads(path.read_text())["ppl"] == 7.25
    assert eval_cache.cached(lambda: 1 / 0, "m", ids, s, {}) == (7.25, True)


def test_an_untrustworthy_entry_says_so(capsys):
    ids, s = torch.arange(50), dict(seq_len=8)
    key = eval_cache.entry_key("m", ids, s)
    path = eval_cache.cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{not json")
    eval_cache.cached(lambda: 7.25, "m", ids, s, {})
    out = capsys.readouterr()
    assert f"ignoring the evaluation cache entry {path}" in out.out + out.err


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_job(tiny_gguf, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache directory should be")
    monkeypatch.setenv("ECOSPA_CACHE_DIR", str(blocker / "eval"))
    s = compress(Job(str(tiny_gguf), budget=0.5, **FAST))
    assert math.isfinite(s["ppl_dense"]) and s["dense_eval_cached"] == []
    out = capsys.readouterr()
    assert "could not write the evaluation cache entry" in out.out + out.err
    assert blocker.read_text() == "a file where the cache directory should be"


def test_a_non_finite_perplexity_is_not_cached():
    ids, s = torch.arange(50), dict(seq_len=8)
    assert eval_cache.cached(lambda: float("inf"), "m", ids, s, {}) == (float("inf"), False)
    assert _entries() == []


def test_given_dense_perplexities_skip_the_cache_and_the_hashing(tiny_gguf, monkeypatch):
    monkeypatch.setattr(eval_cache, "fingerprint", lambda *a: pytest.fail("hashed the weights"))
    s = compress(Job(str(tiny_gguf), budget=0.5, ppl_dense=9.5, ppl_dense_extra={"stdlib": 8.5}, **FAST))
    assert (s["ppl_dense"], s["ppl_dense_extra"]) == (9.5, {"stdlib": 8.5}) and _entries() == []


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ECOSPA_CACHE_DIR", str(tmp_path / "c"))
    assert eval_cache.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("ECOSPA_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert eval_cache.cache_dir() == tmp_path / "x" / "ecospa" / "eval"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert eval_cache.cache_dir() == tmp_path / "h" / ".cache" / "ecospa" / "eval"


def test_the_flag_reaches_the_job(monkeypatch, tiny_gguf, tmp_path):
    import ecospa.cli.compress as cli_mod
    seen = []
    monkeypatch.setattr(cli_mod, "compress", lambda job, *a, **k: seen.append(job) or {})
    monkeypatch.setattr(cli_mod, "table", lambda summary: "")
    for flag, want in ((None, True), ("--no-eval-cache", False), ("--eval-cache", True)):
        argv = ["compress", "--model", str(tiny_gguf), "--budget", "0.4", "--out", str(tmp_path / "x")]
        assert cli.main(argv + ([flag] if flag else [])) == 0
        assert seen[-1].eval_cache is want, flag


def test_a_write_that_fails_midway_leaves_no_entry_and_no_temporary_file(monkeypatch, capsys):
    """A full disk at the rename (after the bytes were written): a warning, the number still
    returned, no entry and no temporary file left in the cache directory."""
    import errno
    import ecospa.io.files as files

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full)
    ids, s = torch.arange(50), dict(seq_len=8)
    assert eval_cache.cached(lambda: 7.25, "m", ids, s, {}) == (7.25, False)
    out = capsys.readouterr()
    assert "could not write the evaluation cache entry" in out.out + out.err and "No space left" in out.out + out.err
    assert list(eval_cache.cache_dir().iterdir()) == []
