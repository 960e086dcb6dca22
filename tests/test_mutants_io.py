"""Tests that kill realistic bugs in the checkpoint writer/reader and the training step wiring
(issue 15, bugs 2, 3 and 6): a same-size byte flip must not load, a failed save over an existing
checkpoint must leave it byte for byte, and the importance estimator must see the params the
gradients were taken at."""
from __future__ import annotations

import dataclasses

import optree
import pytest
import torch

import ecospa.io.checkpoint as checkpoint
import ecospa.train.runtime as distributed
from ecospa import importance, optim
from ecospa.func import llama
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train

CFG = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=10)


def leaves(tree):
    return optree.tree_leaves(tree, namespace="")


def same(a, b) -> bool:
    la, lb = leaves(a), leaves(b)
    return (optree.tree_structure(a, namespace="") == optree.tree_structure(b, namespace="")
            and all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(la, lb)))


def saved(tmp_path, seed=0):
    params = llama.init(CFG, seed=seed)
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    state = state._replace(mu=optree.tree_map(lambda x: x + seed + 1, state.mu, namespace=""), count=3)
    return params, state


# --- bug 2: load must check the sha256, not only the size --------------------------------------

@pytest.mark.parametrize("name", ["model", "optim", "state"])
@pytest.mark.parametrize("where", [-1, -4, 0.5])
def test_same_size_byte_flip_is_rejected(tmp_path, name, where):
    """A flipped bit in a tensor's bytes keeps the file size and the safetensors header valid:
    only the checksum can tell, and load must refuse it instead of returning wrong weights."""
    params, state = saved(tmp_path)
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state,
                           state=(torch.arange(6.0), 4), step=5)
    f = path / f"{name}.safetensors"
    data = bytearray(f.read_bytes())
    i = int(len(data) * where) if isinstance(where, float) else len(data) + where
    header_end = 8 + int.from_bytes(data[:8], "little")
    i = max(i, header_end)  # inside the tensor data, so the file still parses
    data[i] ^= 0x10
    f.write_bytes(bytes(data))
    assert f.stat().st_size == len(data)
    with pytest.raises(ValueError, match=rf"{name}\.safetensors.*corrupt"):
        checkpoint.load_full(path)


# --- bug 3: save writes a temporary directory and swaps it in ------------------------------------

@pytest.mark.parametrize("fail_on", ["model", "optim", "state"])
def test_failed_save_over_a_checkpoint_leaves_it_intact(tmp_path, monkeypatch, fail_on):
    """Saving DIFFERENT params over an existing checkpoint and failing halfway (disk full while
    writing the second or third file) leaves the old checkpoint loadable and unchanged, and no
    stray directories beside it."""
    import safetensors.torch
    old_params, old_state = saved(tmp_path, seed=0)
    path = checkpoint.save(tmp_path / "ck", old_params, CFG, opt_state=old_state,
                           state=(torch.zeros(3), 1), extra={"v": 1}, step=10)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, *args, **kwargs):
        if str(filename).endswith(f"{fail_on}.safetensors"):
            real(tensors, filename, *args, **kwargs)  # a partial write first
            with open(filename, "r+b") as fh:
                fh.truncate(max(1, fh.seek(0, 2) // 2))
            raise OSError(28, "No space left on device")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    if hasattr(checkpoint, "save_file"):  # imported by name
        monkeypatch.setattr(checkpoint, "save_file", full_disk)
    new_params, new_state = saved(tmp_path, seed=1)
    with pytest.raises(Exception):  # noqa: B017  (the message is the caller's business)
        checkpoint.save(path, new_params, CFG, opt_state=new_state, state=(torch.ones(3), 2),
                        extra={"v": 2}, step=20)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    ck = checkpoint.load_full(tmp_path / "ck")
    assert ck.extra == {"v": 1} and ck.step == 10
    assert same(ck.params, old_params) and same(ck.opt_state, old_state)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_successful_save_replaces_every_file(tmp_path):
    """After a save over a checkpoint that had optimizer moments, a save without them leaves no
    stale optim.safetensors behind (a fresh directory is swapped in, not files overwritten)."""
    params, state = saved(tmp_path)
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state, state=(torch.ones(2),))
    other = llama.init(CFG, seed=3)
    checkpoint.save(path, other, CFG, step=1)
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    ck = checkpoint.load_full(path)
    assert same(ck.params, other) and ck.opt_state is None and ck.state is None and ck.step == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


# --- bug 6: the estimator sees the params the gradients were taken at ---------------------------

TINY = TrainConfig(
    model=llama.Config(vocab_size=256, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8),
    batch_size=2, seq_len=8, steps=6, lr=1e-2, lr_warmup=1, eval_every=6, eval_batches=1, log_every=3,
    prune=PruneSchedule(warmup_steps=1, window=3, rounds=1, every=3, sparsity=0.5))


def test_importance_sees_the_params_the_grads_were_taken_at(tmp_path, monkeypatch):
    """train() must call ``estimator.update(state, params, grads)`` with the params BEFORE the
    optimizer step (those ``grads`` were computed at), not the updated ones."""
    taken = []  # (params, grads) of every step, as the step function saw them

    class Spy(distributed.Local):
        def make_step(self, loss_fn, optimizer, compile=False):
            step = super().make_step(loss_fn, optimizer, compile)

            def spied(params, opt_state, batch):
                out = step(params, opt_state, batch)
                taken.append((params, out.grads))
                return out
            return spied

    fed = []

    def spy_estimator(groups, **kwargs):
        est = importance.coupled_fisher(groups)

        def update(state, params, grads):
            fed.append((params, grads))
            return est.update(state, params, grads)
        return importance.Importance(est.init, update, est.scores)

    monkeypatch.setitem(importance.ESTIMATORS, "spy", spy_estimator)
    cfg = dataclasses.replace(TINY, estimator="spy", out=str(tmp_path / "run"))
    train(cfg, parallel=Spy(), progress=False)
    assert len(fed) == 3  # the window: steps 1, 2, 3
    for params, grads in fed:
        match = [p for p, g in taken if same(g, grads)]
        assert len(match) == 1, "the estimator got gradients no step produced"
        assert same(params, match[0]), "the estimator got other params than the gradients' (after the step?)"


# --- the pruning round applies the schedule's kind of target --------------------------------------

@pytest.mark.parametrize("by", ["budget", "sparsity"])
def test_prune_round_uses_the_schedules_target_kind(by):
    """A budget schedule allocates globally (round_target(by="budget")); a sparsity schedule
    keeps round((1 - t) * n) units per group. The two differ on these scores."""
    from ecospa.prune import slice_units
    from ecospa.select import select
    from ecospa.schedule import dense_sizes, round_target
    from ecospa.train.loop import _prune_round
    cfg = llama.Config(vocab_size=13, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=4, ffn_dim=12)
    params = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)
    g = torch.Generator().manual_seed(0)
    scores = {gr.name: torch.rand(*gr.sizes(params), generator=g, dtype=torch.float64) ** 4 for gr in groups}
    opt_state = optim.adamw(1e-3).init(params)
    dense = dense_sizes(params, groups)
    schedule = PruneSchedule(rounds=1, window=1, **{by: 0.4})
    small, small_state, _ = _prune_round(params, opt_state, groups, scores, 0.4, dense, schedule)
    keeps = {b: select(params, groups, scores, **round_target(0.4, groups, dense, params, by=b))
             for b in ("budget", "sparsity")}
    assert not same(slice_units(params, groups, keeps["budget"]),
                    slice_units(params, groups, keeps["sparsity"]))
    assert same(small, slice_units(params, groups, keeps[by]))
    assert same(small_state, optim.slice_state(opt_state, groups, keeps[by]))


# --- the step wiring: compile only when asked, the random estimator's seed ----------------------

def test_make_step_compiles_only_when_asked(monkeypatch):
    from ecospa.train.step import make_step
    calls = []

    def fake_compile(fn, **kwargs):
        calls.append(kwargs)
        return fn
    monkeypatch.setattr(torch, "compile", fake_compile)
    params = {"w": torch.tensor([1.0, -2.0])}

    def loss(p, batch):
        return (p["w"] * batch).sum() ** 2
    opt = optim.adamw(0.1, clip_norm=None)
    out = make_step(loss, opt)(params, opt.init(params), torch.tensor([1.0, 1.0]))
    assert calls == []
    assert out.loss.item() == 1.0 and out.grads["w"].tolist() == [-2.0, -2.0]
    want, _ = opt.update(out.grads, opt.init(params), params)
    assert torch.equal(out.params["w"], want["w"]) and out.opt_state.count == 1
    out2 = make_step(loss, opt, compile=True)(params, opt.init(params), torch.tensor([1.0, 1.0]))
    assert calls == [{"dynamic": False}] and torch.equal(out2.params["w"], out.params["w"])


def test_estimator_for_passes_the_seed_to_random():
    from ecospa.train.step import estimator_for
    cfg = llama.Config(vocab_size=11, dim=4, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=6)
    params, groups = llama.init(cfg), llama.coupled_groups(cfg)

    def scores(est):
        return est.scores(est.update(est.init(params), params, None))
    a, b = scores(estimator_for("random", groups, 3)), scores(importance.random(groups, seed=3))
    c = scores(importance.random(groups, seed=0))
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    fisher = estimator_for("fisher", groups, 3)
    assert fisher.init(params) == importance.ImportanceState({}, 0)


# --- checkpoint reader: every refusal says what is wrong and what to do ---------------------------

HINT = "restore it or use an earlier checkpoint"


def _rewrite(path, edit):
    """Apply ``edit`` to the manifest and re-seal it (file entries and its own checksum), as a
    tool that knows the format would: only the deeper checks can then refuse it."""
    import json
    m = json.loads((path / "manifest.json").read_text())
    edit(m)
    for name in m["files"]:
        f = path / name
        if f.is_file():
            m["files"][name] = {"bytes": f.stat().st_size, "sha256": checkpoint._sha256(f)}
    if "manifest_sha256" in m:
        m["manifest_sha256"] = checkpoint._manifest_sha256(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_checkpoint_refusals_name_the_problem_and_the_remedy(tmp_path):
    import json
    import safetensors.torch
    params, state = saved(tmp_path)
    path = checkpoint.save(tmp_path / "ck", params, CFG, opt_state=state, step=5)
    f = path / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"model\.safetensors: truncated or corrupt \({len(data)} bytes, manifest says "
                                         rf"{len(data)} with another checksum\); {HINT}$"):
        checkpoint.load(path)
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    (path / "optim.safetensors").unlink()
    with pytest.raises(ValueError, match=r": optim\.safetensors is missing \(the manifest lists "
                                         r"\['model\.safetensors', 'optim\.safetensors'\]\)$"):
        checkpoint.load(path)
    path = checkpoint.save(tmp_path / "ck2", params, CFG, step=5)
    m = json.loads((path / "manifest.json").read_text())
    m["step"] = 6
    (path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=rf"manifest\.json was edited or is corrupt: its checksum does not match "
                                         rf"its content; {HINT}$"):
        checkpoint.load(path)
    path = checkpoint.save(tmp_path / "ck3", params, CFG, step=5)
    (path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    _rewrite(path, lambda m: None)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file \("):
        checkpoint.load(path)
    names = [f"k{i}" for i in range(7)]
    safetensors.torch.save_file({k: torch.zeros(1) for k in names}, str(path / "model.safetensors"))
    _rewrite(path, lambda m: None)
    expected = sorted(set(names) ^ set(json.loads((path / "manifest.json").read_text())["tensors"]["model"]))[:5]
    with pytest.raises(ValueError, match=r"model\.safetensors: tensors disagree with the manifest \(differing keys "
                                         + __import__("re").escape(str(expected)) + r"\)$"):
        checkpoint.load(path)


def test_checkpoint_bad_manifest_hint(tmp_path):
    params, _ = saved(tmp_path)
    path = checkpoint.save(tmp_path / "ck", params, CFG, step=5)
    _rewrite(path, lambda m: m.update(trees=5))
    with pytest.raises(ValueError, match=rf"manifest\.json is not a valid ecospa manifest: .*; {HINT}$"):
        checkpoint.load(path)


def test_resolve_picks_the_newest_complete_leftover(tmp_path):
    import os
    import time
    params, _ = saved(tmp_path)
    a = checkpoint.save(tmp_path / "a", params, CFG, step=7)
    b = checkpoint.save(tmp_path / "b", params, CFG, step=0)   # written later, but an earlier step
    c = checkpoint.save(tmp_path / "c", params, CFG)           # no step at all: ranks below both
    os.utime(b / "manifest.json", (time.time() + 10, time.time() + 10))
    os.utime(c / "manifest.json", (time.time() + 20, time.time() + 20))
    bad = tmp_path / ".ck.old-0000"  # sorts first, incomplete: skipped, the others still looked at
    bad.mkdir()
    a.rename(tmp_path / ".ck.old-1111")
    b.rename(tmp_path / ".ck.tmp-2222")
    c.rename(tmp_path / ".ck.old-3333")
    assert checkpoint.load_full(tmp_path / "ck").step == 7
    (tmp_path / ".ck.old-1111" / "model.safetensors").write_bytes(b"x")
    assert checkpoint.load_full(tmp_path / "ck").step == 0
    (tmp_path / ".ck.tmp-2222" / "manifest.json").unlink()
    assert checkpoint.load_full(tmp_path / "ck").step is None
    (tmp_path / ".ck.old-3333" / "manifest.json").write_text("{")
    with pytest.raises(FileNotFoundError, match=r"ck: no checkpoint directory here \(the 4 leftover\(s\) of "
                                                r"interrupted saves beside it are incomplete\)$"):
        checkpoint.load(tmp_path / "ck")
    with pytest.raises(FileNotFoundError, match=r"other: no checkpoint directory here$"):
        checkpoint.load(tmp_path / "other")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match=r"file is a file, not a checkpoint directory$"):
        checkpoint.load(tmp_path / "file")
