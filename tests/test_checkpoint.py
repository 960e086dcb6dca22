"""Checkpoint round trips (pruned trees, optimizer moments) and clear errors on bad files."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import optree
import pytest
import torch

import ecospa
from ecospa import optim
from ecospa.io import checkpoint
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


# --- issue 9: leftovers of interrupted saves, edited and broken manifests ---------------------

RMTREE = shutil.rmtree


def _killed_between_renames(monkeypatch):
    """The next save that replaces a checkpoint dies between its two renames (the old one moved
    aside, the new one complete in its temporary directory), like a kill -9: nothing after that
    point runs, so nothing is cleaned up."""
    real_replace, calls = checkpoint.os.replace, {"aside": False}

    def replace(src, dst):
        if calls["aside"]:
            monkeypatch.setattr(checkpoint.os, "replace", real_replace)
            monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # dead process
            raise OSError("injected: killed between the renames")
        calls["aside"] = ".old-" in Path(dst).name
        return real_replace(src, dst)
    monkeypatch.setattr(checkpoint.os, "replace", replace)


def test_two_interrupted_swaps_resume_from_the_newest_complete_one(tmp_path, monkeypatch):
    """issue 9 B7: two ``.ck.old-*`` leftovers made load say 'no checkpoint directory here'."""
    params, state = pruned()
    path = tmp_path / "ck"
    checkpoint.save(path, params, CFG, extra={"v": 1}, step=1)
    _killed_between_renames(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(path, params, CFG, extra={"v": 2}, step=2)  # step 1 aside, 2 in a temp
    monkeypatch.setattr(checkpoint.shutil, "rmtree", RMTREE)
    assert not path.exists() and checkpoint.load_full(path).step == 2  # the complete temp
    RMTREE(next(tmp_path.glob(".ck.tmp-*")))  # as if killed before the temp was complete
    assert checkpoint.load_full(path).step == 1
    monkeypatch.setattr(checkpoint.shutil, "rmtree", lambda *a, **k: None)  # killed after the swap
    checkpoint.save(path, params, CFG, opt_state=state, extra={"v": 3}, step=3)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", RMTREE)
    _killed_between_renames(monkeypatch)
    with pytest.raises(OSError, match="injected"):
        checkpoint.save(path, params, CFG, extra={"v": 4}, step=4)  # step 3 aside
    monkeypatch.setattr(checkpoint.shutil, "rmtree", RMTREE)
    RMTREE(next(tmp_path.glob(".ck.tmp-*")))
    assert not path.exists() and len(list(tmp_path.glob(".ck.old-*"))) == 2  # the case
    # and an incomplete leftover (a kill during the rmtree of an old one, or while writing)
    (tmp_path / ".ck.tmp-dead").mkdir()
    (tmp_path / ".ck.tmp-dead" / "model.safetensors").write_bytes(b"partial")
    ck = checkpoint.load_full(path)
    assert ck.step == 3 and ck.extra == {"v": 3} and ck.opt_state is not None
    checkpoint.save(path, params, CFG, extra={"v": 5}, step=5)  # a successful save cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert checkpoint.load_full(path).step == 5


def test_corrupt_leftover_is_skipped(tmp_path):
    params, _ = pruned()
    checkpoint.save(tmp_path / "ck", params, CFG, extra={"v": 1}, step=1)
    (tmp_path / "ck").rename(tmp_path / ".ck.old-aaaa")
    checkpoint.save(tmp_path / "x", params, CFG, extra={"v": 2}, step=2)
    (tmp_path / "x").rename(tmp_path / ".ck.old-bbbb")
    f = tmp_path / ".ck.old-bbbb" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-10])  # the newer one is damaged: not complete
    assert checkpoint.load_full(tmp_path / "ck").step == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.load_full(tmp_path / "other")


def _edit_manifest(path, fn):
    m = json.loads((path / "manifest.json").read_text())
    fn(m)
    (path / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit", [
    lambda m: m["config"].update(norm_eps=0.1),
    lambda m: m["config"].update(head_dim=4),
    lambda m: m["trees"]["model"]["dict"]["layers"]["tuple"].reverse(),
    lambda m: m.update(step=99),
])
def test_edited_manifest_does_not_load_silently(tmp_path, edit):
    """issue 9 C: the manifest's own content is checksummed."""
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, step=3)
    _edit_manifest(path, edit)
    with pytest.raises(ValueError, match="manifest.json.*(edited|checksum)"):
        checkpoint.load_full(path)


def test_manifest_format_version(tmp_path):
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, step=3)
    assert json.loads((path / "manifest.json").read_text())["format"] == checkpoint.FORMAT
    _edit_manifest(path, lambda m: m.update(format=99))
    with pytest.raises(ValueError, match="format 99.*newer"):
        checkpoint.load_full(path)
    _edit_manifest(path, lambda m: m.pop("format"))
    with pytest.raises(ValueError, match="format"):
        checkpoint.load_full(path)


def test_format_1_checkpoints_still_load(tmp_path):
    """Checkpoints written before the manifest checksum (format 1) keep loading."""
    params, state = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state, step=3)
    _edit_manifest(path, lambda m: (m.pop("manifest_sha256"), m.update(format=1)))
    ck = checkpoint.load_full(path)
    assert_same(ck.params, params) and ck.step == 3


def test_old_static_importance_states_still_load_and_score(tmp_path):
    """Static estimators used to keep the params in their state (so checkpoints held them twice);
    such a checkpoint still loads, and its state still gives the same scores as a new one."""
    params, state = pruned()
    groups = llama.coupled_groups(CFG)
    old = ecospa.ImportanceState({"params": params}, 5)
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state, state=old, step=3)
    loaded = ecospa.ImportanceState(*checkpoint.load_full(path).state)
    for name in ("magnitude", "norm_product", "random"):
        est = ecospa.ESTIMATORS[name](groups, seed=1)
        got, want = est.scores(loaded), est.scores(est.init(params))
        assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
        new = est.update(loaded, params, None)  # the next update drops the params copy
        assert set(new.stat) == {g.name for g in groups} and new.count == 6
    small = checkpoint.save(tmp_path / "new", params, CFG, state=est.init(params))
    assert (small / "state.safetensors").stat().st_size < (path / "state.safetensors").stat().st_size / 4


@pytest.mark.parametrize("text", [
    "[]", "null", "3", '"x"', "{}", '{"format": 1}', '{"format": "1", "family": "llama"}',
    '{"format": 1, "family": "llama", "config": [], "trees": {}, "tensors": {}, "files": {}}',
    '{"format": 1, "family": "llama", "config": {"dim": "8"}, "trees": {}, "tensors": {}, "files": {}}',
    '{"format": 1, "family": ["llama"], "config": {}, "trees": {}, "tensors": {}, "files": {}}',
    "[" * 100000 + "]" * 100000,
])
def test_structurally_broken_manifest_gives_one_clear_error(tmp_path, text):
    params, _ = pruned()
    path = checkpoint.save(tmp_path / "ck", params, CFG)
    (path / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="manifest"):
        checkpoint.load_full(path)


def _mutations():
    from hypothesis import strategies as st
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
        max_leaves=8)
    return st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "del", "replace_root"]),
                              json_values), min_size=1, max_size=4)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


def test_manifest_reader_fuzz(tmp_path_factory):
    """Random mutations of a real manifest (format 1: no manifest checksum to stop them early,
    and format 2 with the checksum recomputed) give a checkpoint or a ValueError, nothing else."""
    from hypothesis import given, settings

    params, state = pruned()
    root = tmp_path_factory.mktemp("fuzz")
    good = checkpoint.save(root / "ck", params, CFG, opt_state=state, state={"a": torch.ones(2)}, step=2)
    base = json.loads((good / "manifest.json").read_text())

    @settings(max_examples=60, deadline=None)
    @given(_mutations(), st_bool())
    def check(edits, legacy):
        m = json.loads(json.dumps(base))
        for where, op, value in edits:
            paths = list(_paths(m))
            p = paths[where % len(paths)]
            if op == "replace_root" or not p:
                m = value
                continue
            parent = m
            for k in p[:-1]:
                parent = parent[k]
            if op == "del":
                del parent[p[-1]]
            else:
                parent[p[-1]] = value
        if isinstance(m, dict):
            m.pop("manifest_sha256", None)
            if legacy:
                m["format"] = 1
            else:
                m["manifest_sha256"] = checkpoint._manifest_sha256(m)
        (good / "manifest.json").write_text(json.dumps(m))
        try:
            checkpoint.load_full(good)
        except ValueError:
            pass

    check()


def st_bool():
    from hypothesis import strategies as st
    return st.booleans()
