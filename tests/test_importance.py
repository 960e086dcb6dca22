"""The coupled Fisher identity and the estimators' shared signature."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given

import ecospa
from ecospa._tree import map_paths
from ecospa.func import gpt2, llama
from ecospa.func.families import family_of
from strategies import models, seeds, tokens
from tolerances import close


def lm_loss(model, cfg):
    def loss(params, batch):
        logits = model.forward(params, batch[:, :-1], cfg)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    return loss


def task_loss(model, cfg):
    """Next-token loss for a decoder; for an encoder (a classifier), cross-entropy against
    labels fixed by the example's index."""
    if family_of(cfg).decoder:
        return lm_loss(model, cfg)

    def loss(params, batch):
        logits = model.forward(params, batch, cfg)
        labels = torch.arange(logits.shape[0]) % logits.shape[-1]
        return F.cross_entropy(logits, labels)
    return loss


def scale_units(params, group, m, side):
    """Multiply every side-`side` member's unit slices by m [n_blocks, n_units] (a virtual mask)."""
    def scaler(member):
        def fn(leaf):
            shape = [1] * leaf.ndim
            shape[member.unit_axis] = m.shape[1]
            mm = m
            if member.block_axis is not None:
                shape[member.block_axis] = m.shape[0]
                mm = m.T if member.block_axis > member.unit_axis else m
            else:
                mm = m[0]
            return leaf * mm.reshape(shape)
        return fn
    return map_paths(params, {mem.path: scaler(mem) for mem in group.side(side)})


@given(models(), seeds)
def test_fisher_identity_left_right_and_mask_derivative(model_cfg, seed):
    """v_j from the right matrix == dL/dm_j of a mask on the inner dim (fp64); from the left one
    too, equal to it wherever the two sides are linear factors of one product (``sides_agree``;
    not across Qwen3's q/k norms, where each side is the derivative of its own pre-norm mask)."""
    model, cfg = model_cfg
    params = model.init(cfg, seed=seed, dtype=torch.float64)
    groups = model.coupled_groups(cfg)
    loss = task_loss(model, cfg)
    batch = tokens(cfg, seed, length=6)
    grads = torch.func.grad(loss)(params, batch)
    v_b = ecospa.unit_dots(params, grads, groups, side="b")
    for g in groups:
        ones = torch.ones(g.sizes(params), dtype=torch.float64)
        dm = {side: torch.func.grad(lambda m: loss(scale_units(params, g, m, side), batch))(ones)
              for side in ("a", "b") if g.side(side)}  # GPT-2's MLP input is behind GELU: no side a
        close(v_b[g.name], dm["b"])
        if g.side("a"):
            close(ecospa.unit_dots(params, grads, (g,), side="a")[g.name], dm["a"])
            if g.sides_agree:
                close(dm["a"], dm["b"])


@pytest.mark.parametrize("name", sorted(ecospa.ESTIMATORS))
def test_estimators_share_one_signature_and_drive_pruning(name):
    cfg = llama.Config(vocab_size=17, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
    params = llama.init(cfg, seed=1)
    groups = llama.coupled_groups(cfg)
    est = ecospa.ESTIMATORS[name](groups)
    loss = lm_loss(llama, cfg)
    state = est.init(params)
    for s in range(3):
        state = est.update(state, params, torch.func.grad(loss)(params, tokens(cfg, s)))
    scores = est.scores(state)
    assert set(scores) == {g.name for g in groups}
    for g in groups:
        assert scores[g.name].shape == g.sizes(params)
        assert torch.isfinite(scores[g.name]).all() and (scores[g.name] >= 0).all()
    small = ecospa.pruner(groups, sparsity=0.5)(params, scores)
    assert small["layers"][0]["w_up"].shape == (8, 6)


def test_fisher_is_mean_of_squared_unit_dots():
    cfg = gpt2.Config(vocab_size=17, dim=8, n_layers=1, n_heads=2, ffn_dim=6, max_seq_len=8)
    params = gpt2.init(cfg, seed=0, dtype=torch.float64)
    groups = gpt2.coupled_groups(cfg)
    loss = lm_loss(gpt2, cfg)
    batches = [tokens(cfg, s) for s in range(3)]
    vs = [ecospa.unit_dots(params, torch.func.grad(loss)(params, b), groups) for b in batches]
    scores = ecospa.fisher(loss, params, groups, batches)
    for g in groups:
        close(scores[g.name], torch.stack([v[g.name] ** 2 for v in vs]).mean(0))
    ema = ecospa.coupled_fisher(groups, ema=0.5)
    st = ema.init(params)
    for b in batches:
        st = ema.update(st, params, torch.func.grad(loss)(params, b))
    name = groups[0].name
    sq = [v[name] ** 2 for v in vs]
    close(ema.scores(st)[name], 0.25 * sq[0] + 0.25 * sq[1] + 0.5 * sq[2])


def test_scores_without_batches_is_a_clear_error():
    cfg = gpt2.Config(vocab_size=5, dim=4, n_layers=1, n_heads=1, max_seq_len=4)
    est = ecospa.coupled_fisher(gpt2.coupled_groups(cfg))
    with pytest.raises(ValueError, match="no batches"):
        est.scores(est.init(gpt2.init(cfg)))


# --- one constructor signature, typed contracts, small static states ---------------------------

@pytest.mark.parametrize("name", sorted(ecospa.ESTIMATORS))
def test_every_estimator_takes_groups_and_a_seed_and_meets_the_protocol(name):
    from ecospa._types import EstimatorProtocol, OptimizerProtocol
    from ecospa import optim
    cfg = gpt2.Config(vocab_size=7, dim=4, n_layers=1, n_heads=2, ffn_dim=6, max_seq_len=8)
    groups = gpt2.coupled_groups(cfg)
    est = ecospa.ESTIMATORS[name](groups, seed=3)
    assert isinstance(est, EstimatorProtocol) and isinstance(optim.adamw(1e-3), OptimizerProtocol)
    assert not isinstance(optim.adamw(1e-3), EstimatorProtocol)  # no scores: not an estimator
    with pytest.raises(TypeError):
        ecospa.ESTIMATORS[name](groups, 3)  # options are keyword-only, the same for all


@pytest.mark.parametrize("name", ["magnitude", "norm_product", "random"])
def test_static_estimators_keep_scores_not_a_copy_of_the_params(name):
    """The state (which checkpoints save) holds [n_blocks, n_units] per group, no params."""
    cfg = llama.Config(vocab_size=17, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
    params, groups = llama.init(cfg, seed=1), llama.coupled_groups(cfg)
    est = ecospa.ESTIMATORS[name](groups, seed=2)
    grads = torch.func.grad(lm_loss(llama, cfg))(params, tokens(cfg, 0))
    moved = {k: v for k, v in params.items()}
    moved["layers"] = tuple({**layer, "w_up": layer["w_up"] * 2} for layer in params["layers"])
    state = est.update(est.init(params), moved, grads)
    assert set(state.stat) == {g.name for g in groups} and state.count == 1
    assert all(state.stat[g.name].shape == g.sizes(params) for g in groups)
    assert sum(v.numel() for v in state.stat.values()) < sum(
        x.numel() for layer in params["layers"] for x in layer.values()) / 10
    want = est.scores(est.init(moved))  # the params of the last update count
    assert all(torch.equal(est.scores(state)[k], want[k]) for k in want)


@pytest.mark.parametrize("name", ["magnitude", "norm_product", "random"])
def test_a_static_state_from_an_old_checkpoint_still_scores(name):
    """Before, static states were ImportanceState({"params": params}, n); they still work."""
    cfg = llama.Config(vocab_size=17, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12)
    params, groups = llama.init(cfg, seed=1), llama.coupled_groups(cfg)
    est = ecospa.ESTIMATORS[name](groups, seed=2)
    old = ecospa.ImportanceState({"params": params}, 3)
    want = est.scores(est.init(params))
    got = est.scores(old)
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
