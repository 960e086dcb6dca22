"""WHICH units are kept (issue 24, "Direction"): in every ranking path the kept units are the
highest-scored ones, checked against ``_top`` (written here, independent of ``ecospa.select``),
not only their counts; and golden allocations with UNEQUAL unit costs, computed by hand.

``_top(s, k)``: per block, the k units with the highest score, ties to the lower index (as
``ecospa.select`` documents), returned sorted.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import ecospa
import ecospa.jobs.compress as job_mod
from ecospa import allocation
from ecospa.func import llama
from ecospa.groups import Group, Member, validate
from ecospa.io.data import ByteTokenizer
from ecospa.jobs.compress import Job, compress
from ecospa.schedule import PruneSchedule, dense_sizes, round_target
from ecospa.select import keep_top
from ecospa.train import TrainConfig, train
from ecospa.train import loop as train_mod


def _top(s: torch.Tensor, k: int) -> torch.Tensor:
    """The k best units of every block (ties: the lower index), sorted: [blocks, k] int64."""
    rows = []
    for row in s.reshape(-1, s.shape[-1]).tolist():
        best = sorted(range(len(row)), key=lambda u: (-row[u], u))[:k]
        rows.append(sorted(best))
    return torch.tensor(rows, dtype=torch.int64)


def _assert_top(keep: dict, scores: dict) -> int:
    """Every group's kept units are ``_top`` of its scores; returns how many groups lost units."""
    pruned = 0
    for name, idx in keep.items():
        s = scores[name]
        assert torch.equal(idx, _top(s, idx.shape[1])), f"{name}: kept {idx.tolist()}, scores {s.tolist()}"
        pruned += idx.shape[1] < s.shape[-1]
    return pruned


def test_top_breaks_ties_to_the_lower_index_and_is_not_the_bottom():
    s = torch.tensor([[3.0, 1.0, 3.0, 2.0], [0.0, 5.0, 5.0, 5.0]])
    assert _top(s, 2).tolist() == [[0, 2], [1, 2]]
    assert torch.equal(keep_top(s, 2), _top(s, 2))


# --- the compress job ----------------------------------------------------------------------------

CFG = llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, init_std=0.3)
TINY = dict(steps=0, batch_size=2, seq_len=16, calib_batches=1, recon_batches=1, eval_seq_len=16,
            eval_windows=1, eval_extra=(), ppl_dense=1.0, progress=False)


@pytest.fixture
def job_spy(monkeypatch):
    """Per round: the Fisher scores, the obs scores and the kept units the job sliced with."""
    seen = {"fisher": [], "obs": [], "keep": []}

    def record(name, key, arg=None):
        real = getattr(job_mod, name)

        def wrapper(*a, **k):
            out = real(*a, **k)
            seen[key].append(a[arg] if arg is not None else out)
            return out

        monkeypatch.setattr(job_mod, name, wrapper)

    record("fisher", "fisher")
    record("obs_scores", "obs")
    record("slice_units", "keep", arg=2)
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)  # not what is measured here
    return seen


@pytest.mark.parametrize("rank_by", ["estimator", "obs"])
def test_compress_keeps_the_highest_scored_units_in_every_round(job_spy, rank_by):
    """Kills: ``_keep`` selecting with negated scores (the lowest-ranked units), ``keep_top(-obs)``
    for the obs path, or the obs scores of another round/group."""
    loaded = (CFG, llama.init(CFG, seed=3), ByteTokenizer())
    compress(Job("tiny", budget=0.4, rounds=2, rank_by=rank_by, reconstruct=False, **TINY), loaded=loaded)
    assert len(job_spy["keep"]) == 2 and len(job_spy["fisher"]) == 2
    assert len(job_spy["obs"]) == (2 if rank_by == "obs" else 0)
    for r, keep in enumerate(job_spy["keep"]):
        scores = dict(job_spy["fisher"][r])
        if rank_by == "obs":
            obs = job_spy["obs"][r]
            assert {n.rsplit(".", 1)[1] for n in obs} == {"vo", "mlp"}  # qk stays on the Fisher scores
            scores.update(obs)
        assert _assert_top(keep, scores) >= 2  # something was pruned, so the order mattered


def test_compress_kept_units_follow_the_scores_not_the_positions(job_spy, monkeypatch):
    """Scores that rank units in REVERSE index order: the job must keep the high indices (a job
    that kept a prefix, or the lowest-ranked units, keeps the low ones). Kills ``_keep``
    returning ``arange(k)`` per block with the right counts."""
    def reversed_scores(loss, params, groups, batches, **kw):
        return {name: torch.arange(n, dtype=torch.float64).expand(b, n).clone()
                for name, (b, n) in validate(params, groups).items()}

    monkeypatch.setattr(job_mod, "fisher", reversed_scores)
    loaded = (CFG, llama.init(CFG, seed=3), ByteTokenizer())
    compress(Job("tiny", sparsity=0.5, rank_by="estimator", reconstruct=False, **TINY), loaded=loaded)
    (keep,) = job_spy["keep"]
    for name, idx in keep.items():
        n = validate(llama.init(CFG, seed=3), llama.coupled_groups(CFG))[name][1]
        k = idx.shape[1]
        assert k < n and idx.tolist() == [list(range(n - k, n))] * idx.shape[0], name


# --- prune / pruner ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", [dict(sparsity=0.5), dict(budget=0.4), dict(sparsity={"mlp": 0.75})])
def test_pruner_slices_out_exactly_the_lowest_scored_units(target):
    """The sliced tree holds the weights of ``_top(scores)``: w_down's rows, wv's columns per KV
    head. Kills ``keep_top`` ranking ``-s`` (the bottom units), or slicing with other indices."""
    cfg = CFG
    params, groups = llama.init(cfg, seed=1), llama.coupled_groups(cfg)
    g = torch.Generator().manual_seed(7)
    scores = {name: torch.rand(*bn, generator=g, dtype=torch.float64) for name, bn in validate(params, groups).items()}
    small = ecospa.pruner(groups, **target)(params, scores)
    for i, (p, q) in enumerate(zip(params["layers"], small["layers"])):
        mlp = _top(scores[f"layers.{i}.mlp"], q["w_down"].shape[0])[0]
        assert torch.equal(q["w_down"], p["w_down"][mlp]) and torch.equal(q["w_up"], p["w_up"][:, mlp])
        vo = _top(scores[f"layers.{i}.vo"], q["wv"].shape[2])  # [Hkv, k]
        for h in range(vo.shape[0]):
            assert torch.equal(q["wv"][:, h], p["wv"][:, h, vo[h]])
            assert torch.equal(q["wo"][h], p["wo"][h][:, vo[h]])
    assert any(q["w_down"].shape[0] < cfg.ffn_dim for q in small["layers"])


# --- the pre-training loop -----------------------------------------------------------------------

TRAIN = TrainConfig(model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24),
                    batch_size=2, seq_len=8, steps=6, lr=1e-2, lr_warmup=1, eval_every=6, eval_batches=1,
                    log_every=3, prune=PruneSchedule(warmup_steps=1, window=2, rounds=2, every=2, sparsity=0.5))


@pytest.mark.parametrize("prune", [TRAIN.prune, dataclasses.replace(TRAIN.prune, sparsity=None, budget=0.4)])
def test_training_rounds_keep_the_highest_scored_units(tmp_path, monkeypatch, prune):
    """Each pruning round of ``ecospa train`` keeps ``_top`` of the scores it was given.
    Kills ``_prune_round`` selecting with negated scores (or keeping a prefix)."""
    seen = []
    real_prune, real_slice = train_mod._prune_round, train_mod.slice_units

    def prune_round(params, opt_state, groups, scores, *a, **k):
        seen.append({"scores": scores})
        return real_prune(params, opt_state, groups, scores, *a, **k)

    def slice_units(tree, groups, keep):
        if seen and "keep" not in seen[-1]:
            seen[-1]["keep"] = keep
        return real_slice(tree, groups, keep)

    monkeypatch.setattr(train_mod, "_prune_round", prune_round)
    monkeypatch.setattr(train_mod, "slice_units", slice_units)
    train(dataclasses.replace(TRAIN, out=str(tmp_path), prune=prune), progress=False)
    assert len(seen) == 2
    for r in seen:
        assert _assert_top(r["keep"], r["scores"]) >= 2


# --- allocation variants: golden cases with unequal unit costs -----------------------------------
#
# A tree of L layers, two groups per layer: "a" (1 block, a column costs 3 parameters) and "b"
# (2 blocks of 2-parameter units: a column, the c-th unit of both blocks, costs 4).

def _tree(a_units, b_units):
    layers = tuple({"a": torch.zeros(a, 3), "b": torch.zeros(2, b, 2)} for a, b in zip(a_units, b_units))
    groups = []
    for i in range(len(layers)):
        groups += [Group(f"layers.{i}.a", "a", (Member(("layers", i, "a"), 0, None, "b"),)),
                   Group(f"layers.{i}.b", "b", (Member(("layers", i, "b"), 1, 0, "b"),))]
    return {"layers": layers}, groups


def _cost(params, groups, counts):
    sizes = validate(params, groups)
    return sum(sizes[g.name][0] * g.numel_per_unit(params) * counts[g.name] for g in groups)


A = torch.tensor([9.0, 1.0, 7.0, 3.0])               # a's column values per parameter: 3, 7/3, 1, 1/3
B = torch.tensor([[4.0, 8.0, 2.0], [6.0, 0.0, 4.0]])  # b's column sums 14, 8, 2: per parameter 3.5, 2, 0.5


def test_golden_global_ranks_by_importance_per_parameter():
    """11 parameters: the two first columns (3 + 4), then a's second (7/3 per parameter, +3 = 10);
    b's second (2 per parameter, +4) no longer fits. Ranking by the raw column sum would take b's
    (8 > 7) instead: {a: 1, b: 2} (the mutant ``_columns(s) / cost`` -> ``_columns(s)`` fails)."""
    params, groups = _tree([4], [3])
    scores = {"layers.0.a": A, "layers.0.b": B}
    counts = allocation.counts("global", params, groups, scores, 11)
    assert counts == {"layers.0.a": 2, "layers.0.b": 1}
    keep = ecospa.select(params, groups, scores, counts=counts)
    assert keep["layers.0.a"].tolist() == [[0, 2]] and keep["layers.0.b"].tolist() == [[1], [0]]


def test_golden_zscore_standardizes_per_group_not_per_parameter():
    """a's scores x100 (global would then take a's columns first: {a: 3, b: 1} at 14). z-scores:
    a's columns 1.26, 0.63, -0.63, -1.26; b's (sum over 2 blocks / 2) 1.16, 0, -1.16. Greedy at
    14 parameters: a's 2nd (+3 = 10), b's 2nd (+4 = 14), nothing else fits: {a: 2, b: 2}.
    Kills zscore without the standardization (raw scores per unit)."""
    params, groups = _tree([4], [3])
    scores = {"layers.0.a": A * 100, "layers.0.b": B}
    assert allocation.counts("global", params, groups, scores, 14) == {"layers.0.a": 3, "layers.0.b": 1}
    assert allocation.counts("zscore", params, groups, scores, 14) == {"layers.0.a": 2, "layers.0.b": 2}


def test_golden_protect_keeps_the_ends_and_spends_the_rest_by_importance_per_parameter():
    """3 layers: ceil(3/8) = 1 first and ceil(3/16) = 1 last kept whole (24 parameters each);
    layer 1 gets 59 - 48 = 11: the global golden case, {a: 2, b: 1}. Kills the last layer
    left out of the protected ends (``>=`` -> ``>``)."""
    params, groups = _tree([4] * 3, [3] * 3)
    scores = {f"layers.{i}.{k}": v for i in range(3) for k, v in (("a", A), ("b", B))}
    counts = allocation.counts("protect", params, groups, scores, 59)
    assert counts == {"layers.0.a": 4, "layers.0.b": 3, "layers.2.a": 4, "layers.2.b": 3,
                      "layers.1.a": 2, "layers.1.b": 1}


def test_golden_depth_ramp_on_equal_layers():
    """72 parameters, 43.2 kept: mean fraction 0.4, removed 0.2 / 0.4 / 0.6 by depth (0.5x..1.5x).
    a (4 units): round(3.2, 2.4, 1.6) = 3, 2, 2; b (3 units): round(2.4, 1.8, 1.2) = 2, 2, 1.
    Kills a ramp over ``l / L`` instead of ``l / (L - 1)`` (0.5x..1.17x: it misses the budget)."""
    params, groups = _tree([4] * 3, [3] * 3)
    scores = {f"layers.{i}.{k}": v for i in range(3) for k, v in (("a", A), ("b", B))}
    counts = allocation.counts("depth", params, groups, scores, 0.6 * 72)
    assert [counts[f"layers.{i}.a"] for i in range(3)] == [3, 2, 2]
    assert [counts[f"layers.{i}.b"] for i in range(3)] == [2, 2, 1]


def test_golden_depth_ramp_meets_the_budget_on_unequal_layers():
    """Layers of unequal cost (44, 44, 32: the last one already pruned, as in a later round):
    keep 72 of 120. The fractions removed must still ramp 0.5x..1.5x AND remove 48: the mean m
    solves m (0.5 x 44 + 1.0 x 44 + 1.5 x 32) = 48, m = 48/114: removed 0.211 / 0.421 / 0.632.
    a: round(6.32, 4.63, 1.47) = 6, 5, 1; b: round(3.95, 2.89, 1.84) = 4, 3, 2: exactly 72.
    The unweighted mean (0.4) removes only 45.6 before rounding and keeps 75 here (a[2] = 2)."""
    params, groups = _tree([8, 8, 4], [5, 5, 5])
    scores = {n: torch.arange(u, dtype=torch.float64).expand(b, u) for n, (b, u) in validate(params, groups).items()}
    counts = allocation.counts("depth", params, groups, scores, 72)
    assert [counts[f"layers.{i}.a"] for i in range(3)] == [6, 5, 1]
    assert [counts[f"layers.{i}.b"] for i in range(3)] == [4, 3, 2]
    assert _cost(params, groups, counts) == 72


@pytest.mark.parametrize("how", allocation.ALLOCATIONS)
def test_every_variant_meets_a_two_round_budget_within_rounding(how):
    """``compress --rounds 2 --allocation HOW``: after the second round the removed fraction of
    the DENSE groups' parameters is the budget, within half a column of every group (the whole
    units a count is rounded to). Wide groups, so rounding is small: a ramp that misses the budget
    by about one percent (the depth ramp on a tree pruned unevenly by round 1) fails."""
    cfg = llama.Config(vocab_size=11, dim=8, n_layers=8, n_heads=2, n_kv_heads=1, head_dim=64, ffn_dim=800,
                       init_std=0.3)
    params, groups = llama.init(cfg, 0), llama.coupled_groups(cfg)
    dense = dense_sizes(params, groups)
    total = sum(v[1] for v in dense.values())
    gen = torch.Generator().manual_seed(0)
    for target in (0.25, 0.5):
        sizes = validate(params, groups)
        half_columns = sum(0.5 * sizes[g.name][0] * g.numel_per_unit(params) for g in groups)
        scores = {n: torch.rand(*bn, generator=gen, dtype=torch.float64) for n, bn in sizes.items()}
        counts = round_target(target, groups, dense, params, by="budget", scores=scores, allocation=how)["counts"]
        params = ecospa.slice_units(params, groups, ecospa.select(params, groups, scores, counts=counts))
        kept = sum(v[1] for v in dense_sizes(params, groups).values())
        assert abs(kept - (1 - target) * total) <= half_columns, (how, target, 1 - kept / total)
