"""``ecospa compress --no-train-embedding`` (issue 28): recovery holds the token embedding (with a
tied head, the head too) at the dense values. The layer-at-a-time gradient of the rest equals
``torch.func.grad_and_value`` of the loss with the embedding closed over; a recovery step equals
AdamW that leaves the embedding untrained; the embedding stays the teacher's own tensor (no copy);
the job's checkpoint has the dense embedding bit for bit and the default still trains it."""
from __future__ import annotations

import dataclasses

import optree
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ecospa import optim
from ecospa.func import llama
from ecospa.func.families import family_of
from ecospa.func.layerwise import layer_grad_and_value
from ecospa.train.step import lm_loss, make_step
from strategies import models, seeds
from test_layerwise import _losses_of, close_trees
from tolerances import close

gguf = pytest.importorskip("gguf")
from test_safety_io_cli import FAST, tiny_gguf  # noqa: E402,F401  (fixture)


@settings(max_examples=10, deadline=None)
@given(models(decoders=True), seeds, st.booleans(), st.integers(1, 11), st.sampled_from([None, 0.3]))
def test_frozen_leaf_gets_no_gradient_and_the_rest_equal_grad_and_value(model, seed, prune, chunk, weight):
    fam, cfg, params, batch, whole_loss, tl = _losses_of(model, seed, prune, weight, rows=2, T=6)
    name = fam.embed_leaf
    fixed = {name: params[name]}
    rest = {k: v for k, v in params.items() if k != name}
    g0, v0 = torch.func.grad_and_value(lambda r, b: whole_loss({**r, **fixed}, b))(rest, batch)
    g1, v1 = layer_grad_and_value(fam, cfg, tl, head_chunk=chunk, frozen=(name,))(params, batch)
    assert name not in g1 and set(g1) == set(rest)
    close(v1, v0.float())
    close_trees(g1, g0)


def test_frozen_is_refused_where_it_means_nothing():
    cfg = llama.Config(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16)
    fam = family_of(cfg)
    with pytest.raises(ValueError, match="top-level leaves outside 'layers'"):
        layer_grad_and_value(fam, cfg, frozen=("layers",))
    with pytest.raises(ValueError, match="reads=None"):
        layer_grad_and_value(fam, cfg, reads=[("layers", 0, "wq")], frozen=("embed",))


CFG = llama.Config(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=24,
                   tie_embeddings=True)


@pytest.mark.parametrize("layerwise", [True, False])
def test_recovery_with_a_frozen_embedding_is_adamw_that_never_trains_it(layerwise):
    """Three steps at lr 3e-3 (large enough that a step that touched the embedding, clipped the
    gradient with the embedding's norm included, or reset the moments would differ): the rest
    equals AdamW with ``trainable`` excluding the embedding on the whole tree; the embedding is
    the very tensor given (never copied, never written)."""
    from ecospa.jobs import compress as job_mod
    from ecospa.jobs.compress_job import Job
    params = llama.init(CFG, seed=1)
    embed = params["embed"]
    before = embed.clone()
    job = Job("tiny", budget=0.3, lr=3e-3, steps=3, batch_size=2, seq_len=8, progress=False,
              train_embedding=False)
    ids = torch.randint(0, 64, (400,), generator=torch.Generator().manual_seed(0))
    loss = lm_loss(llama.forward, CFG)
    fam = family_of(CFG)
    frozen = job_mod.frozen_leaves(fam, job)
    assert frozen == ("embed",)
    gv = layer_grad_and_value(fam, CFG, frozen=frozen) if layerwise else None
    start = optree.tree_map(torch.clone, params, namespace="")
    got, losses = job_mod.recover(loss, params, ids, job, 3, seed=0, grad_and_value=gv, frozen=frozen)
    assert got["embed"] is embed and torch.equal(embed, before)

    opt = optim.adamw(3e-3, weight_decay=0.0,
                      trainable=lambda path, x: optim.default_trainable(path, x) and path[0] != "embed")
    step = make_step(loss, opt)
    p, s = start, opt.init(start)
    for i in range(3):
        p, s, _, _ = step(p, s, job_mod.batch_at(ids, i, 2, 8, 0))
    assert torch.equal(p["embed"], before)
    for path, x, y in zip(*optree.tree_flatten_with_path(got, namespace="")[:2],
                          optree.tree_leaves(p, namespace="")):
        close(x, y)
    moved = [k for k in ("norm",) if not torch.equal(got[k], start[k])]
    assert moved == ["norm"]  # the rest did train


def test_the_job_keeps_the_dense_embedding_bit_for_bit_and_the_default_trains_it(tiny_gguf, tmp_path):
    from ecospa.io.load import load_model
    from ecospa.jobs.compress import Job, compress
    _, dense, _ = load_model(str(tiny_gguf))
    outs = {}
    for train in (False, True):
        out = tmp_path / f"c{int(train)}"
        compress(Job(str(tiny_gguf), out=str(out), budget=0.4, train_embedding=train,
                     **dict(FAST, lr=1e-2)))
        outs[train] = load_model(str(out))[1]
    assert torch.equal(outs[False]["embed"], dense["embed"])
    assert not torch.equal(outs[True]["embed"], dense["embed"])
    assert not torch.equal(outs[False]["norm"], dense["norm"])  # recovery ran


def test_the_recovery_flags_reach_the_job(monkeypatch, tiny_gguf, tmp_path):
    from ecospa import cli
    import ecospa.cli.compress as cli_mod
    seen = []
    monkeypatch.setattr(cli_mod, "compress", lambda job, *a, **k: seen.append(job) or {})
    monkeypatch.setattr(cli_mod, "table", lambda summary: "")
    for flag, want in (("--no-train-embedding", False), ("--train-embedding", True), (None, True)):
        argv = ["compress", "--model", str(tiny_gguf), "--budget", "0.4", "--out", str(tmp_path / "x")]
        assert cli.main(argv + ([flag] if flag else [])) == 0
        assert seen[-1].train_embedding is want, flag
        assert (seen[-1].teacher_rows, seen[-1].teacher_pool) == (0, 32)  # the defaults
    assert cli.main(argv + ["--teacher-rows", "3", "--teacher-pool", "7"]) == 0
    assert (seen[-1].teacher_rows, seen[-1].teacher_pool) == (3, 7)
