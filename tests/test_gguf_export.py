"""GGUF export: a pruned LLaMA tree written by save_gguf reads back (ecospa's own GGUF reader,
which undoes llama.cpp's Q/K permutation) to the same logits; compact() of it is the pruned tree."""
from __future__ import annotations

import os

import optree
import pytest
import torch

import ecospa
from ecospa.func import gpt2, llama
from ecospa.func.padding import compact
from strategies import random_scores
from tolerances import EXACT, close

pytest.importorskip("gguf")
from ecospa.io.gguf import load_gguf  # noqa: E402
from ecospa.io.gguf_export import save_gguf  # noqa: E402

CFG = llama.Config(vocab_size=37, dim=16, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=24,
                   rope_theta=500.0, init_std=0.3, max_seq_len=64)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("budget", [0.0, 0.5])
def test_round_trip_same_logits(tmp_path, tied, budget):
    cfg = llama.Config(**{**CFG.__dict__, "tie_embeddings": tied})
    params = llama.init(cfg, seed=1)
    groups = llama.coupled_groups(cfg)
    small = ecospa.pruner(groups, budget=budget)(params, random_scores(params, groups, 1)) if budget else params
    before = optree.tree_map(torch.clone, small, namespace="")
    info = save_gguf(small, cfg, tmp_path / "m.gguf")
    back_cfg, back, _ = load_gguf(tmp_path / "m.gguf")
    x = torch.randint(0, 37, (2, 9), generator=torch.Generator().manual_seed(0))
    close(llama.forward(back, x, back_cfg), llama.forward(small, x, cfg), EXACT)
    again = compact(back, back_cfg)
    assert [t.shape for t in optree.tree_leaves(again, namespace="")] == \
        [t.shape for t in optree.tree_leaves(small, namespace="")]
    for a, b in zip(optree.tree_leaves(small, namespace=""), optree.tree_leaves(before, namespace="")):
        assert torch.equal(a, b)
    assert bool(info["notes"]) == (budget > 0)


def test_tokenizer_metadata_is_carried(tmp_path):
    from ecospa.io.gguf import tokenizer_info
    import gguf
    params = llama.init(CFG)
    tok = {"model": "gpt2", "tokens": [chr(ord("a") + i % 26) * (1 + i // 26) for i in range(37)],
           "token_type": [1] * 37, "merges": ["a a"], "bos_token_id": 1, "eos_token_id": 2}
    save_gguf(params, CFG, tmp_path / "t.gguf", tokenizer_info=tok)
    got = tokenizer_info(gguf.GGUFReader(str(tmp_path / "t.gguf")))
    assert got["tokens"] == tok["tokens"] and got["merges"] == tok["merges"]
    assert got["eos_token_id"] == 2 and got["model"] == "gpt2"


def test_refuses_to_overwrite_and_leaves_nothing_behind(tmp_path):
    params = llama.init(CFG)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"user data")
    with pytest.raises(ValueError, match="exists"):
        save_gguf(params, CFG, target)
    assert target.read_bytes() == b"user data"
    with pytest.raises(ValueError, match="end in .gguf"):
        save_gguf(params, CFG, tmp_path / "m.bin")
    with pytest.raises(ValueError, match="llama family only"):
        save_gguf(gpt2.init(gpt2.Config()), gpt2.Config(), tmp_path / "g.gguf")
    assert sorted(os.listdir(tmp_path)) == ["m.gguf"]
