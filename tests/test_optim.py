"""Functional AdamW against torch.optim.AdamW, and its moments under coupled pruning."""
from __future__ import annotations

import optree
import pytest
import torch
import torch.nn.functional as F

import ecospa
from ecospa import optim
from ecospa.func import gpt2, llama
from tolerances import close

CFG = llama.Config(vocab_size=17, dim=8, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=12,
                   attention_bias=True, init_std=0.3)


def loss_fn(model, cfg):
    def fn(params, batch):
        logits = model.forward(params, batch[:, :-1], cfg)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
    return fn


def batch(i, vocab=17):
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(i))


def clone(tree):
    return optree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, tree, namespace="")


def assert_tree_equal(a, b):
    assert optree.tree_structure(a, namespace="") == optree.tree_structure(b, namespace="")
    for x, y in zip(optree.tree_leaves(a, namespace=""), optree.tree_leaves(b, namespace="")):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


def small_tree(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"w": r(3, 4), "b": r(4), "layers": ({"u": r(2, 2, 3)}, {"u": r(5, 1)})}


@pytest.mark.parametrize("clip", [None, 0.5])
def test_matches_torch_adamw(clip):
    params, grads = small_tree(0), [small_tree(i) for i in (1, 2, 3)]
    hp = dict(lr=0.01, betas=(0.8, 0.97), eps=1e-6, weight_decay=0.2)
    opt = optim.adamw(hp["lr"], b1=0.8, b2=0.97, eps=1e-6, weight_decay=0.2, clip_norm=clip)
    state = opt.init(params)
    leaves = [x.clone().requires_grad_(True) for x in optree.tree_leaves(params, namespace="")]
    paths = optree.tree_paths(params, namespace="")
    decay = [x for x, p in zip(leaves, paths) if x.ndim > 1]
    no_decay = [x for x, p in zip(leaves, paths) if x.ndim <= 1]
    ref = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}], **hp)
    p = params
    for g in grads:
        for x, gx in zip(leaves, optree.tree_leaves(g, namespace="")):
            x.grad = gx.clone()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(leaves, clip)
        ref.step()
        p, state = opt.update(g, state, p)
    for x, y in zip(optree.tree_leaves(p, namespace=""), leaves):
        close(x, y.detach())
    assert state.count == 3


def test_schedule_lr_is_called_with_update_count():
    seen = []
    opt = optim.adamw(lambda s: seen.append(s) or 0.0, clip_norm=None)
    p = small_tree()
    state = opt.init(p)
    for _ in range(3):
        p2, state = opt.update(small_tree(1), state, p)
    assert seen == [0, 1, 2]
    assert_tree_equal(p2, p)  # lr 0: nothing moves (decay is lr-scaled too)


def test_inv_freq_untouched_and_inputs_not_modified():
    params = llama.init(CFG, seed=0, dtype=torch.float64)
    fn = loss_fn(llama, CFG)
    grads = torch.func.grad(fn)(params, batch(0))
    assert grads["layers"][0]["inv_freq"].abs().sum() > 0  # it does get a gradient ...
    opt = optim.adamw(0.1)
    state = opt.init(params)
    before = (clone(params), clone(grads), clone(state))
    new, new_state = opt.update(grads, state, params)
    assert_tree_equal(params, before[0])
    assert_tree_equal(grads, before[1])
    assert_tree_equal(state, before[2])
    for i in range(CFG.n_layers):  # ... but is never updated
        assert torch.equal(new["layers"][i]["inv_freq"], params["layers"][i]["inv_freq"])
        assert not torch.equal(new["layers"][i]["wq"], params["layers"][i]["wq"])
    assert not torch.equal(new["norm"], params["norm"])


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="b2"):
        optim.adamw(1e-3, b2=1.5)
    with pytest.raises(ValueError, match="lr"):
        optim.adamw(-1.0)


@pytest.mark.parametrize("model, cfg", [(llama, CFG), (gpt2, gpt2.Config(vocab_size=17, dim=8,
                                        n_layers=2, n_heads=2, ffn_dim=12, max_seq_len=8, init_std=0.3))])
def test_pruned_step_equals_masked_dense_step(model, cfg):
    """Prune params + moments after some steps; one step on the small tree equals the masked
    dense step (masked params, moments and grads) restricted to the kept units."""
    fn = loss_fn(model, cfg)
    groups = model.coupled_groups(cfg)
    params = model.init(cfg, seed=1, dtype=torch.float64)
    opt = optim.adamw(0.05, weight_decay=0.1, clip_norm=0.5)
    state = opt.init(params)
    est = ecospa.coupled_fisher(groups)
    imp = est.init(params)
    for i in range(3):
        grads = torch.func.grad(fn)(params, batch(i))
        imp = est.update(imp, params, grads)
        params, state = opt.update(grads, state, params)
    keep = ecospa.select(params, groups, est.scores(imp), sparsity=0.5)

    small = ecospa.slice_units(params, groups, keep)
    small_state = optim.slice_state(state, groups, keep)
    small_new, small_state_new = opt.update(torch.func.grad(fn)(small, batch(9)), small_state, small)

    masked = ecospa.mask(params, groups, keep)
    m_state = optim.AdamWState(state.count, ecospa.mask(state.mu, groups, keep),
                               ecospa.mask(state.nu, groups, keep))
    m_grads = ecospa.mask(torch.func.grad(fn)(masked, batch(9)), groups, keep)
    dense_new, dense_state_new = opt.update(m_grads, m_state, masked)

    restricted = ecospa.slice_units(dense_new, groups, keep)
    for x, y in zip(optree.tree_leaves(small_new, namespace=""), optree.tree_leaves(restricted, namespace="")):
        close(x, y)
    for a, b in ((small_state_new.mu, dense_state_new.mu), (small_state_new.nu, dense_state_new.nu)):
        for x, y in zip(optree.tree_leaves(a, namespace=""),
                        optree.tree_leaves(ecospa.slice_units(b, groups, keep), namespace="")):
            close(x, y)
    # The removed units stay exactly zero in the masked dense model (decoupled decay keeps 0 at 0).
    assert_tree_equal(ecospa.mask(dense_new, groups, keep), dense_new)


def test_slice_state_shapes_follow_params():
    params = llama.init(CFG, seed=0)
    groups = llama.coupled_groups(CFG)
    opt = optim.adamw(1e-3)
    state = opt.init(params)
    scores = {g.name: torch.rand(*g.sizes(params)) for g in groups}
    keep = ecospa.select(params, groups, scores, sparsity=0.5)
    small = ecospa.slice_units(params, groups, keep)
    s2 = optim.slice_state(state, groups, keep)
    shapes = lambda t: [x.shape for x in optree.tree_leaves(t, namespace="")]  # noqa: E731
    assert shapes(s2.mu) == shapes(small) == shapes(s2.nu)
    assert s2.count == state.count


@pytest.mark.parametrize("clip", [None, 0.05])
def test_donated_update_is_the_pure_update_in_the_given_tensors(clip):
    """``update(..., donate=True)``: bit for bit the pure update's params and moments over three
    steps (weight decay 0.2 on matrices only, clipping active at 0.05), written into the given
    tensors (no new ones), and the buffer (inv_freq) still untouched."""
    params = llama.init(CFG, seed=0, dtype=torch.float64)
    fn = loss_fn(llama, CFG)
    opt = optim.adamw(0.01, b1=0.8, b2=0.97, weight_decay=0.2, clip_norm=clip)
    pure_p, pure_s = params, opt.init(params)
    don_p, don_s = clone(params), opt.init(params)
    ids = [id(x) for x in optree.tree_leaves((don_p, don_s.mu, don_s.nu), namespace="")]
    freq = clone(params)["layers"][0]["inv_freq"]
    for i in range(3):
        grads = torch.func.grad(fn)(pure_p, batch(i))
        pure_p, pure_s = opt.update(grads, pure_s, pure_p)
        don_p, don_s = opt.update(clone(grads), don_s, don_p, donate=True)
        assert don_s.count == pure_s.count == i + 1
    assert_tree_equal(don_p, pure_p)
    assert_tree_equal((don_s.mu, don_s.nu), (pure_s.mu, pure_s.nu))
    assert [id(x) for x in optree.tree_leaves((don_p, don_s.mu, don_s.nu), namespace="")] == ids
    assert torch.equal(don_p["layers"][0]["inv_freq"], freq)
    assert not torch.equal(don_p["layers"][0]["wq"], params["layers"][0]["wq"])
