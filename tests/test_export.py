"""hf-padded export of PRUNED trees (pruned attention, per-layer MLP widths) loads in stock
``transformers`` with no custom code and gives the same logits and the same greedy tokens as
ecospa; ``ecospa export`` writes both formats from a native checkpoint."""
from __future__ import annotations

import os

import optree
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

import ecospa  # noqa: E402
from ecospa import cli  # noqa: E402
from ecospa.io import checkpoint  # noqa: E402
from ecospa.jobs.export import export  # noqa: E402
from ecospa.func import gpt2, llama  # noqa: E402
from ecospa.func.padding import compact  # noqa: E402
from ecospa.jobs.generate import generate  # noqa: E402
from ecospa.io.hf import load_hf  # noqa: E402
from strategies import random_scores  # noqa: E402
from tolerances import HF, close  # noqa: E402

CASES = {
    "llama_gqa_tied": (llama, llama.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2,
                                           ffn_dim=48, rope_theta=500.0, init_std=0.2)),
    "qwen2_mqa_untied": (llama, llama.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=1,
                                             ffn_dim=40, tie_embeddings=False, attention_bias=True,
                                             init_std=0.2)),
    "gpt2": (gpt2, gpt2.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, max_seq_len=32, init_std=0.2)),
}


def _pruned(module, cfg, budget, dtype=torch.float64):
    params = module.init(cfg, seed=5, dtype=dtype)
    groups = module.coupled_groups(cfg)
    return ecospa.pruner(groups, budget=budget)(params, random_scores(params, groups, 5))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("budget", [0.3, 0.6])
def test_padded_export_loads_in_stock_transformers(tmp_path, case, budget):
    module, cfg = CASES[case]
    small = _pruned(module, cfg, budget)
    widths = {p["wv"].shape[-1] for p in small["layers"]} | {2 * p["wq"].shape[-1] for p in small["layers"]}
    assert widths != {cfg.head_dim}, "the case must prune attention"
    res = export(small, cfg, tmp_path / "hf", "hf-padded")
    model = transformers.AutoModelForCausalLM.from_pretrained(res["path"], attn_implementation="eager",
                                                              torch_dtype=torch.float64).eval()
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(x).logits
    close(hf, module.forward(small, x, cfg), HF)
    # greedy generation: transformers' generate == ecospa's cached decoder
    prompt = x[:1, :4]
    with torch.no_grad():
        want = model.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                              attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(generate(small, cfg, prompt, 8), want)
    # back in: load_hf + compact gives the pruned shapes and the same logits
    _, back_cfg, back = load_hf(res["path"], dtype=torch.float64)
    again = compact(back, back_cfg)
    assert [t.shape for t in optree.tree_leaves(again, namespace="")] == \
        [t.shape for t in optree.tree_leaves(small, namespace="")]
    close(module.forward(again, x, back_cfg), module.forward(small, x, cfg), HF)


def test_export_cli_writes_both_formats_from_a_checkpoint(tmp_path, capsys):
    module, cfg = CASES["llama_gqa_tied"]
    small = _pruned(module, cfg, 0.5, torch.float32)
    checkpoint.save(tmp_path / "ck", small, cfg, extra={})
    assert cli.main(["export", "--model", str(tmp_path / "ck"), "--format", "hf-padded",
                     "--out", str(tmp_path / "hf")]) == 0
    assert cli.main(["export", "--model", str(tmp_path / "ck"), "--format", "gguf",
                     "--out", str(tmp_path / "m.gguf")]) == 0
    text = capsys.readouterr().out
    assert "wrote hf-padded" in text and "wrote gguf" in text and "padded" in text
    from ecospa.io.load import load_model
    x = torch.randint(0, 64, (1, 7), generator=torch.Generator().manual_seed(2))
    for spec in (tmp_path / "hf", tmp_path / "m.gguf"):
        c2, p2, _ = load_model(str(spec))
        close(llama.forward(p2, x, c2), llama.forward(small, x, cfg), HF)


def test_export_cli_refuses_before_loading(tmp_path, capsys):
    (tmp_path / "m.gguf").write_bytes(b"keep me")
    (tmp_path / "file").write_text("x")
    for fmt, out, needle in (("gguf", "m.gguf", "exists"), ("gguf", "m.bin", "end in .gguf"),
                             ("hf-padded", "file", "is a file"), ("hf-padded", "file/sub", "which is a file")):
        rc = cli.main(["export", "--model", str(tmp_path / "does-not-exist"), "--format", fmt,
                       "--out", str(tmp_path / out)])
        assert rc == 2 and needle in capsys.readouterr().err
    assert (tmp_path / "m.gguf").read_bytes() == b"keep me"
    assert sorted(os.listdir(tmp_path)) == ["file", "m.gguf"]


@pytest.mark.parametrize("case", ["llama_gqa_tied", "qwen2_mqa_untied"])
def test_compact_export_with_remote_code(tmp_path, case):
    module, cfg = CASES[case]
    small = _pruned(module, cfg, 0.5)
    res = export(small, cfg, tmp_path / "compact", "hf-compact")
    assert "modeling_ecospa.py" in os.listdir(res["path"])
    model = transformers.AutoModelForCausalLM.from_pretrained(res["path"], trust_remote_code=True,
                                                              torch_dtype=torch.float64).eval()
    # the pruned shapes are real: parameter count equals the compact tree's (a tied head is shared)
    n_small = sum(t.numel() for t in optree.tree_leaves(small, namespace="")
                  if t.is_floating_point()) - sum(p["inv_freq"].numel() for p in small["layers"])
    assert sum(p.numel() for p in model.parameters()) == n_small
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_embeddings
    x = torch.randint(0, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hf = model(x).logits
    close(hf, module.forward(small, x, cfg), HF)
    prompt = x[:, :5]
    with torch.no_grad():
        want = model.generate(prompt, do_sample=False, max_new_tokens=8, min_new_tokens=8,
                              attention_mask=torch.ones_like(prompt), pad_token_id=0)
    assert torch.equal(generate(small, cfg, prompt, 8), want)


def test_compact_export_left_padded_batch(tmp_path):
    module, cfg = CASES["llama_gqa_tied"]
    small = _pruned(module, cfg, 0.5)
    path = export(small, cfg, tmp_path / "compact", "hf-compact")["path"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                              torch_dtype=torch.float64).eval()
    a, b = torch.tensor([[5, 9, 11, 2, 7]]), torch.tensor([[8, 3, 1]])
    batch = torch.tensor([[5, 9, 11, 2, 7], [0, 0, 8, 3, 1]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    with torch.no_grad():
        out = model.generate(batch, attention_mask=mask, do_sample=False, max_new_tokens=6,
                             min_new_tokens=6, pad_token_id=0)
    assert torch.equal(out[0, 5:], generate(small, cfg, a, 6)[0, 5:])
    assert torch.equal(out[1, 5:], generate(small, cfg, b, 6)[0, 3:])


def test_compact_export_rejects_gpt2(tmp_path):
    module, cfg = CASES["gpt2"]
    with pytest.raises(ValueError, match="llama family only"):
        export(_pruned(module, cfg, 0.3), cfg, tmp_path / "c", "hf-compact")
    assert not (tmp_path / "c").exists()


def test_reexport_replaces_only_our_export_with_its_extra_files(tmp_path):
    from tokenizers import Tokenizer, models
    module, cfg = CASES["llama_gqa_tied"]
    small = _pruned(module, cfg, 0.5, torch.float32)
    tok = Tokenizer(models.BPE({"a": 0, "b": 1}, []))
    for fmt in ("hf-compact", "hf-padded"):
        out = tmp_path / fmt
        export(small, cfg, out, fmt, tokenizer=tok)
        assert "tokenizer.json" in os.listdir(out)
        with pytest.raises(ValueError, match="--overwrite"):  # issue 23: not without the flag
            export(small, cfg, out, fmt, tokenizer=tok)
        export(small, cfg, out, fmt, tokenizer=tok, overwrite=True)  # an earlier export of ours
        (out / "notes.txt").write_text("mine")
        with pytest.raises(ValueError, match="did not write"):
            export(small, cfg, out, fmt, overwrite=True)
        assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("fmt", ["hf-padded", "hf-compact", "gguf", "gguf-compact"])
def test_exports_come_back_compact(tmp_path, fmt):
    from ecospa.io.load import load_model
    module, cfg = CASES["llama_gqa_tied"]
    small = _pruned(module, cfg, 0.5, torch.float32)
    path = export(small, cfg, tmp_path / ("m.gguf" if fmt.startswith("gguf") else "out"), fmt)["path"]
    c2, p2, _ = load_model(path, compact=True)
    assert [t.shape for t in optree.tree_leaves(p2, namespace="")] == \
        [t.shape for t in optree.tree_leaves(small, namespace="")]
    for a, b in zip(optree.tree_leaves(p2, namespace=""), optree.tree_leaves(small, namespace="")):
        assert torch.equal(a, b)
    assert c2.tie_embeddings == cfg.tie_embeddings


def test_exported_tokenizer_loads_without_running_remote_code(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from ecospa.io.load import encode, load_model
    module, cfg = CASES["llama_gqa_tied"]
    tok = Tokenizer(models.BPE({chr(97 + i): i for i in range(26)}, []))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = export(_pruned(module, cfg, 0.5, torch.float32), cfg, tmp_path / "c", "hf-compact", tokenizer=tok)["path"]
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked whether to run remote code"))
    _, _, tok2 = load_model(path)
    assert encode(tok2, "abc").tolist() == [0, 1, 2]


from hypothesis import HealthCheck, assume, given, settings  # noqa: E402

from ecospa.func.families import family_of  # noqa: E402
from strategies import models, seeds, targets, tokens  # noqa: E402


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(model=models(), seed=seeds, target=targets)
def test_random_pruned_trees_export_padded_to_stock_transformers(tmp_path_factory, model, seed, target):
    """Random LLaMA/Qwen2 (MHA/GQA/MQA, biases, tied or not), GPT-2 and ViT/DeiT structures,
    random targets."""
    module, cfg = model
    assume(cfg.dim % cfg.n_heads == 0)  # transformers 5 rejects other configs, whatever head_dim says
    params = module.init(cfg, seed=seed, dtype=torch.float64)
    groups = module.coupled_groups(cfg)
    try:
        small = ecospa.pruner(groups, **target)(params, random_scores(params, groups, seed))
    except ValueError:
        small = params
    path = export(small, cfg, tmp_path_factory.mktemp("hyp") / "hf", "hf-padded")["path"]
    decoder = family_of(cfg).decoder  # an encoder (ViT) is an image classifier
    auto = transformers.AutoModelForCausalLM if decoder else transformers.AutoModelForImageClassification
    hf = auto.from_pretrained(path, attn_implementation="eager", torch_dtype=torch.float64).eval()
    x = tokens(cfg, seed, batch=2, length=6)
    with torch.no_grad():
        close(hf(x).logits if decoder else hf(pixel_values=x).logits, module.forward(small, x, cfg), HF)
