"""Checkpoint round trips (pruned trees, optimizer moments) and clear errors on bad files."""
from __future__ import annotations

import json

import optree
import pytest
import torch

import ecospa
from ecospa import checkpoint, optim
from ecospa.func import gpt2, llama

CFG = llama.Config(vocab_size=13, dim=8, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=10)


def pruned(dtype=torch.float32):
    params = llama.init(CFG, seed=0, dtype=dtype)
    groups = llama.coupled_groups(CFG)
    g = torch.Generator().manual_seed(0)
    scores = {gr.name: torch.rand(*gr.sizes(params), generator=g, dtype=torch.float64) for gr in groups}
    keep = ecospa.select(params, groups, scores, budget=0.4)  # widths differ per layer
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    state = state._replace(mu=optree.tree_map(lambda x: x + 1, state.mu, namespace=""), count=7)
    return ecospa.slice_units(params, groups, keep), optim.slice_state(state, groups, keep)


def assert_same(a, b):
    assert optree.tree_structure(a, namespace="") == optree.tree_structure(b, namespace="")
    for x, y in zip(optree.tree_leaves(a, namespace=""), optree.tree_leaves(b, namespace="")):
        if torch.is_tensor(x):
            assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)
        else:
            assert x == y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_of_pruned_tree(tmp_path, dtype):
    params, state = pruned(dtype)
    widths = {p["w_up"].shape[1] for p in params["layers"]}
    assert len(widths) > 1  # the point: per-layer shapes differ
    imp = ecospa.ImportanceState({"layers.0.qk": torch.ones(2, 3, dtype=torch.float64)}, 4)
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state, extra={"note": "x"},
                           state=imp, step=12)
    p2, cfg2, extra = checkpoint.load(path)
    assert_same(p2, params)
    assert isinstance(p2["layers"], tuple) and cfg2 == CFG and extra == {"note": "x"}
    full = checkpoint.load_full(path)
    assert_same(full.opt_state, state) and isinstance(full.opt_state, optim.AdamWState)
    assert_same(ecospa.ImportanceState(*full.state), imp) and full.step == 12
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp leftovers


def test_gpt2_round_trip_and_overwrite(tmp_path):
    cfg = gpt2.Config(vocab_size=7, dim=4, n_layers=1, n_heads=2, max_seq_len=8)
    params = gpt2.init(cfg)
    checkpoint.save(tmp_path / "ck", llama.init(CFG), CFG)
    checkpoint.save(tmp_path / "ck", params, cfg)  # replaces the previous one
    p2, cfg2, _ = checkpoint.load(tmp_path / "ck")
    assert_same(p2, params) and cfg2 == cfg
    assert checkpoint.load_full(tmp_path / "ck").opt_state is None


def test_truncated_file(tmp_path):
    params, state = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        checkpoint.load(path)
    (path / "manifest.json").write_text('{"family": "llama", "conf')
    with pytest.raises(ValueError, match="manifest.json is truncated or corrupt"):
        checkpoint.load(path)


def test_manifest_mismatch_and_unknown_family(tmp_path):
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG)
    m = json.loads((path / "manifest.json").read_text())
    m["tensors"]["model"]["layers.0.wq"][0][0] += 1
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="layers.0.wq"):
        checkpoint.load(path)
    m["family"] = "bert"
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match="unknown model family"):
        checkpoint.load(path)


def test_failed_save_keeps_previous(tmp_path):
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, extra={"v": 1})
    with pytest.raises(ValueError, match="JSON"):
        checkpoint.save(path, params, CFG, extra={"bad": object()})
    assert checkpoint.load(path)[2] == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    with pytest.raises(FileNotFoundError):
        checkpoint.load(tmp_path / "missing")


def test_interrupted_swap_falls_back_to_old(tmp_path):
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, extra={"v": 1})
    path.rename(tmp_path / ".ck.old-1234")  # as if a save died between its two renames
    assert checkpoint.load(tmp_path / "ck")[2] == {"v": 1}
