"""Layer-at-a-time gradients (``ecospa.func.layerwise``) equal ``torch.func.grad`` of the whole
forward, for every decoder family, dense and pruned, at head chunks that do and do not divide the
sequence; the calibration's scores do not depend on which of the two computed them."""
from __future__ import annotations

import optree
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import ecospa
from ecospa.func.families import FAMILIES, family_of
from ecospa.func.layerwise import (CE, chunked_loss, distill_loss, layer_grad_and_value, layer_reads,
                                   lm_layer_grads)
from ecospa.importance import coupled_fisher, fisher
from ecospa.train.step import lm_loss
from strategies import models, random_scores, seeds
from tolerances import close

gguf = pytest.importorskip("gguf")
from test_safety_io_cli import FAST, tiny_gguf  # noqa: E402,F401  (fixture)


def _model(module, cfg, seed, prune):
    params = optree.tree_map(lambda x: x.double(), module.init(cfg, seed=seed), namespace="")
    groups = module.coupled_groups(cfg)
    if prune:
        try:
            keep = ecospa.select(params, groups, random_scores(params, groups, seed), sparsity=0.5)
        except ValueError:
            assume(False)
        params = ecospa.slice_units(params, groups, keep)
    return params, groups


@settings(max_examples=12, deadline=None)
@given(models(decoders=True), seeds, st.booleans(), st.integers(1, 15), st.integers(2, 9))
def test_layer_grads_equal_the_whole_backward(model, seed, prune, chunk, T):
    module, cfg = model
    fam = family_of(cfg)
    params, groups = _model(module, cfg, seed, prune)
    T = min(T, cfg.max_seq_len)
    gen = torch.Generator().manual_seed(seed)
    batch = torch.randint(0, cfg.vocab_size, (2, T + 1), generator=gen)
    reads = tuple(m.path for g in groups for m in g.members if m.masked)
    whole = torch.func.grad(lm_loss(fam.forward, cfg))(params, batch)
    got = lm_layer_grads(fam, cfg, reads, head_chunk=chunk)(params, batch)
    for path in reads:
        close(ecospa._tree.get_path(got, path), ecospa._tree.get_path(whole, path))
    # nothing else was computed: every other leaf is None
    flat = optree.tree_flatten_with_path(got, none_is_leaf=True, namespace="")
    for path, leaf in zip(flat[0], flat[1]):
        assert (leaf is not None) == (tuple(path) in set(map(tuple, reads))), path


def test_fisher_scores_are_the_same_with_layer_grads():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=64, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=48)
    params = optree.tree_map(lambda x: x.double(), llama.init(cfg, seed=3), namespace="")
    groups = llama.coupled_groups(cfg)
    batches = [torch.randint(0, 64, (3, 11), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    est = coupled_fisher(groups)
    plain = fisher(lm_loss(llama.forward, cfg), params, groups, batches, estimator=est)
    lw = fisher(lm_loss(llama.forward, cfg), params, groups, batches, estimator=coupled_fisher(groups),
                grad_fn=lm_layer_grads(FAMILIES["llama"], cfg, est.reads, head_chunk=4))
    assert set(plain) == set(lw)
    for k in plain:
        close(lw[k], plain[k])
        assert plain[k].abs().sum() > 0


def test_leaves_outside_the_layers_are_refused():
    assert layer_reads([("layers", 0, "wq"), ("layers", 2, "wo")]) == {0: {"wq"}, 2: {"wo"}}
    assert layer_reads([("embed",)]) is None and layer_reads(None) is None
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48)
    with pytest.raises(ValueError, match="layer leaves only"):
        lm_layer_grads(FAMILIES["llama"], cfg, [("embed",)])
    with pytest.raises(ValueError, match="head_chunk"):
        lm_layer_grads(FAMILIES["llama"], cfg, [("layers", 0, "wq")], head_chunk=0)


def test_the_job_keeps_the_same_units_and_recovers_from_the_same_loss_either_way(tiny_gguf, monkeypatch):
    """``ecospa compress --layerwise`` (the default) and ``--no-layerwise``: the calibration's
    gradient, recovery's step and the evaluation's loss are computed two ways (spied where they
    are consumed), the same units are kept, the first recovery loss (before any update) and the
    dense and pruned perplexities are the same."""
    import ecospa.jobs.compress as job_mod
    from ecospa.jobs.compress import Job, compress
    kept, grad_fns, step_fns, losses, micro = [], [], [], [], []
    real_slice, real_fisher, real_step = job_mod.slice_units, job_mod.fisher, job_mod.make_step

    def slice_spy(params, groups, keep):
        kept.append({k: v.clone() for k, v in keep.items()})
        return real_slice(params, groups, keep)

    def fisher_spy(*args, grad_fn=None, **kw):
        grad_fns.append(grad_fn)
        micro.append(kw.get("micro_batch"))
        return real_fisher(*args, grad_fn=grad_fn, **kw)

    def step_spy(loss, opt, grad_and_value=None, **kw):
        step_fns.append(grad_and_value)
        micro.append(kw.get("micro_batch"))
        step = real_step(loss, opt, grad_and_value=grad_and_value, **kw)

        def wrapped(*a):
            out = step(*a)
            losses.append(float(out.loss))
            return out
        return wrapped

    monkeypatch.setattr(job_mod, "slice_units", slice_spy)
    monkeypatch.setattr(job_mod, "fisher", fisher_spy)
    monkeypatch.setattr(job_mod, "make_step", step_spy)
    evals, real_chunked = [], job_mod.chunked_loss
    monkeypatch.setattr(job_mod, "chunked_loss", lambda *a, **k: evals.append(a) or real_chunked(*a, **k))
    out = [compress(Job(str(tiny_gguf), budget=0.4, layerwise=layerwise, reconstruct=False, distill=True,
                        distill_weight=0.3, **dict(FAST, steps=2, calib_batches=2)))
           for layerwise in (True, False)]
    # the perplexities: a few tokens' logits at a time (chunked_loss) by layer, lm_loss otherwise
    assert len(evals) == 1
    for key in ("ppl_dense", "ppl_pruned"):
        assert out[0][key] == pytest.approx(out[1][key], rel=1e-5), key
    assert grad_fns[0] is not None and grad_fns[0].__qualname__.startswith("lm_layer_grads")
    assert step_fns[0] is not None and step_fns[0].__qualname__.startswith("layer_grad_and_value")
    assert grad_fns[1] is None and step_fns[1] is None
    # by layer: whole batches (no running gradient sum); whole graph: --micro-batch rows (default 1)
    assert micro == [None, None, 1, 1]
    a, b = kept
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not bool(v.all()) for v in a.values())  # something was pruned
    assert len(losses) == 4 and losses[0] == pytest.approx(losses[2], rel=1e-5)


def _kd_loss(fam, cfg, teacher, w):
    """The distillation mix of ``ecospa compress`` written whole (as jobs.compress._losses does)."""
    import torch.nn.functional as F

    def loss(params, batch):
        logits = fam.forward(params, batch[:, :-1], cfg)
        with torch.no_grad():
            ref = fam.forward(teacher, batch[:, :-1], cfg)
        kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(ref, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        hard = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        return (1 - w) * hard + w * kl
    return loss


def _losses_of(model, seed, prune, weight, rows, T):
    """(fam, cfg, params, batch [rows, T+1], the whole-logits loss, its TokenLoss): plain
    cross-entropy (weight None) or the distillation mix with a teacher 1.1x the student."""
    module, cfg = model
    fam = family_of(cfg)
    params, _ = _model(module, cfg, seed, prune)
    teacher = optree.tree_map(lambda x: x * 1.1, params, namespace="")
    T = min(T, cfg.max_seq_len)
    batch = torch.randint(0, cfg.vocab_size, (rows, T + 1), generator=torch.Generator().manual_seed(seed))
    if weight is None:
        return fam, cfg, params, batch, lm_loss(fam.forward, cfg), CE
    return fam, cfg, params, batch, _kd_loss(fam, cfg, teacher, weight), distill_loss(fam, cfg, teacher, weight)


@settings(max_examples=10, deadline=None)
@given(models(decoders=True), seeds, st.booleans(), st.integers(1, 11), st.sampled_from([None, 0.3]))
def test_every_leaf_and_the_loss_equal_grad_and_value(model, seed, prune, chunk, weight):
    """reads=None (a training step): every leaf's gradient, a tied embedding's two uses summed,
    and the loss value, equal torch.func.grad_and_value; with a teacher (weight 0.3, where
    swapping the two terms' weights gives another loss) as with plain cross-entropy."""
    fam, cfg, params, batch, whole_loss, tl = _losses_of(model, seed, prune, weight, rows=2, T=6)
    g0, v0 = torch.func.grad_and_value(whole_loss)(params, batch)
    g1, v1 = layer_grad_and_value(fam, cfg, tl, head_chunk=chunk)(params, batch)
    close(v1, v0.float())
    close_trees(g1, g0)


def close_trees(got, want):
    """Two trees of one structure, leaf by leaf within the dtype's tolerance."""
    a, sa = optree.tree_flatten(want, namespace="")
    b, sb = optree.tree_flatten(got, namespace="")
    assert sa == sb
    for x, y in zip(b, a):
        close(x, y)


@settings(max_examples=10, deadline=None)
@given(models(decoders=True), seeds, st.booleans(), st.integers(1, 11), st.sampled_from([None, 0.3]))
def test_chunked_loss_equals_the_whole_logits_loss(model, seed, prune, chunk, weight):
    """``chunked_loss`` (the evaluation's loss, a few tokens' logits at a time) has the value of
    the whole-logits loss: plain cross-entropy and the distillation mix, at chunks that do and
    do not divide the positions, with no gradient kept."""
    fam, cfg, params, batch, whole_loss, tl = _losses_of(model, seed, prune, weight, rows=3, T=7)
    got = chunked_loss(fam, cfg, tl, head_chunk=chunk)(params, batch)
    assert not got.requires_grad
    close(got, whole_loss(params, batch).float())


def test_chunked_loss_refuses_an_empty_chunk():
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8)
    with pytest.raises(ValueError, match="head_chunk must be >= 1, got 0"):
        chunked_loss(family_of(cfg), cfg, head_chunk=0)

