"""The training loop: exact resume through a pruning round, divergence, compile, CLI, custom loop."""
from __future__ import annotations

import dataclasses
import json

import optree
import pytest
import torch

import ecospa
import ecospa.cli
from ecospa.io import checkpoint
from ecospa.train import loop as train_mod
from ecospa.func import llama
from ecospa.schedule import PruneSchedule, dense_sizes
from ecospa.train import TrainConfig, TrainingDiverged, make_step, train
from tolerances import close

MICRO = TrainConfig(
    model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
    batch_size=4, seq_len=16, steps=13, lr=1e-2, lr_warmup=2, eval_every=6, eval_batches=2,
    log_every=3, prune=PruneSchedule(warmup_steps=3, window=3, rounds=2, every=4, sparsity=0.5))


def leaves(tree):
    return optree.tree_leaves(tree, namespace="")


def assert_tree_equal(a, b):
    assert optree.tree_structure(a, namespace="") == optree.tree_structure(b, namespace="")
    for x, y in zip(leaves(a), leaves(b)):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y


def test_resume_is_exact_through_a_pruning_round(tmp_path):
    assert MICRO.prune.rounds_at()[1][0] == 10 and MICRO.prune.in_window(8)
    full = train(dataclasses.replace(MICRO, out=str(tmp_path / "a")))
    cfg = dataclasses.replace(MICRO, out=str(tmp_path / "b"))
    first = train(cfg, until=9)  # stops inside the second round's estimation window
    assert first["steps"] == 9 and len(first["rounds"]) == 1
    second = train(cfg, resume=True)
    assert len(second["rounds"]) == 2 and second["kept_params"] < first["kept_params"]
    assert first["losses"] + second["losses"] == full["losses"]  # bit for bit
    assert_tree_equal(second["params"], full["params"])
    assert_tree_equal(second["opt_state"], full["opt_state"])
    assert second["val_ppl"] == full["val_ppl"]


def test_resume_refuses_other_settings(tmp_path):
    # (a schedule that fits in 4 steps: rounds past the end are refused since issue 9 B6)
    cfg = dataclasses.replace(MICRO, out=str(tmp_path), steps=4,
                              prune=PruneSchedule(warmup_steps=1, window=1, rounds=1, sparsity=0.5))
    train(cfg, until=2)
    with pytest.raises(ValueError, match="lr"):
        train(dataclasses.replace(cfg, lr=0.5), resume=True)


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real, calls = train_mod.lm_loss, {"n": 0}

    def poisoned(forward, cfg):
        fn = real(forward, cfg)

        def loss(params, batch):
            calls["n"] += 1
            out = fn(params, batch)
            return out * float("nan") if calls["n"] == 6 else out
        return loss

    monkeypatch.setattr(train_mod, "lm_loss", poisoned)
    cfg = dataclasses.replace(MICRO, out=str(tmp_path), ckpt_every=2, eval_every=100)
    with pytest.raises(TrainingDiverged, match="step 5.*lower learning rate"):
        train(cfg)
    ck = checkpoint.load_full(tmp_path / "checkpoint")
    assert ck.step == 4 and all(torch.isfinite(x).all() for x in leaves(ck.params))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "metrics.jsonl"]


@pytest.mark.slow
def test_compiled_step_matches_eager():
    cfg = MICRO.model
    params = llama.init(cfg, seed=0)
    loss_fn = train_mod.lm_loss(llama.forward, cfg)
    opt = ecospa.optim.adamw(1e-2)
    batch = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    eager, compiled = make_step(loss_fn, opt), make_step(loss_fn, opt, compile=True)
    a = b = (params, opt.init(params))
    for _ in range(2):
        ra, rb = eager(*a, batch), compiled(*b, batch)
        close(rb.loss, ra.loss)
        a, b = (ra.params, ra.opt_state), (rb.params, rb.opt_state)
    for x, y in zip(leaves(b[0]), leaves(a[0])):
        close(x, y)


@pytest.mark.slow
def test_cli_tiny_preset_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert ecospa.cli.main(["train", "--steps", "24", "--out", str(out), "--eval-every", "12"]) == 0
    text = capsys.readouterr().out
    assert "validation perplexity" in text and "tokens/s after pruning" in text
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    kept = [r["kept_params"] for r in lines if "kept_params" in r]
    dense = lines[-1]["dense_params"]
    assert kept == sorted(kept, reverse=True) and len(set(kept)) == 3  # shrinks at each round
    assert kept[-1] < 0.6 * dense
    assert sum(r.get("event") == "prune" for r in lines) == 3
    assert any("val_ppl" in r for r in lines)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["param_reduction"] > 0.4
    _, cfg, _ = checkpoint.load(out / "checkpoint")
    assert cfg.dim == 128


def test_cli_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:  # argparse's own exit (since issue 9: typed flags)
        ecospa.cli.main(["train", "--steps", "4", "--budget", "1.5", "--out", str(tmp_path)])
    assert exit_.value.code == 2
    assert "budget" in capsys.readouterr().err


def test_custom_loop_example():
    # --- the README's custom loop: coupled Fisher from the step's own gradients, then prune ---
    import torch.nn.functional as F
    from ecospa import optim
    from ecospa.io.data import ByteTokenizer, corpus, token_batches

    cfg = llama.Config(vocab_size=256, dim=32, n_layers=2, n_heads=4, ffn_dim=64)
    params = llama.init(cfg, seed=0)
    groups = llama.coupled_groups(cfg)

    def loss_fn(params, batch):  # batch [B, T+1]
        logits = llama.forward(params, batch[:, :-1], cfg)  # [B, T, V]
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    grad_fn = torch.func.grad_and_value(loss_fn)
    opt = optim.adamw(3e-3)
    est = ecospa.coupled_fisher(groups)
    opt_state, imp = opt.init(params), est.init(params)
    batches = token_batches(ByteTokenizer().encode(corpus("pydoc", "train")), 4, 32, seed=0)
    losses = []
    for step in range(30):
        grads, loss = grad_fn(params, next(batches))
        if 10 <= step < 15:  # estimation window: reuse the gradients the step already has
            imp = est.update(imp, params, grads)
        params, opt_state = opt.update(grads, opt_state, params)
        if step == 14:  # aligned removal of half the units; moments sliced by the same call
            keep = ecospa.select(params, groups, est.scores(imp), sparsity=0.5)
            params = ecospa.slice_units(params, groups, keep)
            opt_state = optim.slice_state(opt_state, groups, keep)
        losses.append(float(loss))
    # --- end of the example ---
    assert params["layers"][0]["w_up"].shape == (32, 32)
    assert opt_state.mu["layers"][0]["w_up"].shape == (32, 32)
    assert sum(losses[-5:]) < sum(losses[:5])


@pytest.mark.parametrize("estimator", ["magnitude", "random", "taylor"])
def test_other_estimators_and_budget_resume(tmp_path, estimator):
    prune = PruneSchedule(warmup_steps=2, window=2, rounds=2, every=2, budget=0.4)
    cfg = dataclasses.replace(MICRO, out=str(tmp_path), steps=8, estimator=estimator, prune=prune)
    first = train(cfg, until=5)
    second = train(cfg, resume=True)
    full = train(dataclasses.replace(cfg, out=str(tmp_path / "full")))
    assert first["losses"] + second["losses"] == full["losses"]
    groups = llama.coupled_groups(cfg.model)
    group_params = lambda p: sum(n for _, n in dense_sizes(p, groups).values())  # noqa: E731
    removed = 1 - group_params(full["params"]) / group_params(llama.init(cfg.model))
    assert 0.4 <= removed < 0.45  # the budget counts the groups' parameters (whole columns)


def test_rewarm_and_moment_reset_levers(tmp_path):
    """--rewarm scales the lr after each round (as logged and as applied); --moments reset zeroes
    AdamW's moments at a round (the run then differs from the carried one), the count goes on."""
    from ecospa.train.config import opt_lr
    sched = dataclasses.replace(MICRO.prune, rewarm=3)
    cfg = dataclasses.replace(MICRO, prune=sched)
    r1 = sched.rounds_at()[0][0]
    assert opt_lr(cfg, r1) == pytest.approx(opt_lr(MICRO, r1) / 3)
    assert opt_lr(cfg, r1 + 2) == pytest.approx(opt_lr(MICRO, r1 + 2))
    assert opt_lr(cfg, r1 - 1) == opt_lr(MICRO, r1 - 1)
    base = train(dataclasses.replace(MICRO, out=str(tmp_path / "a")))
    warm = train(dataclasses.replace(cfg, out=str(tmp_path / "b")))
    assert warm["losses"][:r1 + 1] == base["losses"][:r1 + 1] and warm["losses"][r1 + 1] != base["losses"][r1 + 1]
    reset_cfg = dataclasses.replace(MICRO, out=str(tmp_path / "c"),
                                    prune=dataclasses.replace(MICRO.prune, moments="reset"))
    seen = {}
    real = train_mod._prune_round

    def spy(*a, **k):
        out = real(*a, **k)
        seen.setdefault("state", out[1])
        return out

    import unittest.mock as mock
    with mock.patch.object(train_mod, "_prune_round", spy):
        reset = train(reset_cfg)
    state = seen["state"]
    assert state.count == r1 and all(not x.any() for x in leaves(state.mu) + leaves(state.nu))
    assert reset["losses"][:r1 + 1] == base["losses"][:r1 + 1]  # the loss at r1 comes before its update
    assert reset["losses"][r1 + 1] != base["losses"][r1 + 1]
    assert reset["kept_params"] == base["kept_params"]


# --- soft removal: the chosen units ramp to exactly zero, then are sliced (issue 27) ----------

SOFT = dataclasses.replace(MICRO, steps=17, log_every=1, prune=PruneSchedule(
    warmup_steps=3, window=3, rounds=2, every=6, sparsity=0.5, decay_steps=3))
PLAIN = dataclasses.replace(SOFT, prune=dataclasses.replace(SOFT.prune, decay_steps=0))


def _pending(out):
    ck = checkpoint.load_full(out / "checkpoint")
    keep = ck.extra["pending"]["keep"]
    return ck, {k: torch.tensor(v, dtype=torch.int64) for k, v in keep.items()}


def test_soft_removal_equals_the_plain_run_until_the_first_round(tmp_path, monkeypatch):
    r1 = SOFT.prune.rounds_at()[0][0]
    assert r1 == 6 and SOFT.prune.slice_step(r1) == 9
    chosen, real = [], train_mod._choose
    monkeypatch.setattr(train_mod, "_choose", lambda *a: chosen.append(real(*a)) or chosen[-1])
    plain = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")), until=r1)
    soft = train(dataclasses.replace(SOFT, out=str(tmp_path / "s")), until=r1)
    assert_tree_equal(soft["params"], plain["params"]) and plain["losses"] == soft["losses"]
    assert_tree_equal(soft["opt_state"], plain["opt_state"])
    # at r1 the soft run chooses exactly the units the plain run slices, and keeps them (dense)
    p1 = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")), resume=True, until=r1 + 1)
    s1 = train(dataclasses.replace(SOFT, out=str(tmp_path / "s")), resume=True, until=r1 + 1)
    assert len(chosen) == 2
    assert_tree_equal(chosen[1], chosen[0])
    assert_tree_equal(_pending(tmp_path / "s")[1], chosen[0])
    assert p1["kept_params"] < s1["kept_params"] == s1["dense_params"]
    assert p1["losses"] != s1["losses"]  # the plain run's step r1 runs sliced, the soft one dense


def test_soft_removal_ramps_to_exactly_zero_and_slicing_changes_no_output(tmp_path, monkeypatch):
    import ecospa.train.loop as loop
    factors, real = [], loop.scale_units
    monkeypatch.setattr(loop, "scale_units", lambda t, g, k, f: factors.append(f) or real(t, g, k, f))
    cfg = dataclasses.replace(SOFT, out=str(tmp_path))
    groups = llama.coupled_groups(SOFT.model)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))

    def logits(p):
        return llama.forward(p, x, SOFT.model)

    before = train(cfg, until=8)["params"]  # after steps 6, 7 of the ramp: 1/3 of the way left
    assert factors == [2 / 3, 1 / 2]
    _, keep = _pending(tmp_path)
    assert not torch.equal(before["layers"][0]["w_up"], ecospa.mask(before, groups, keep)["layers"][0]["w_up"])
    with pytest.raises(AssertionError):  # not yet decayed: slicing would change the output
        close(logits(ecospa.slice_units(before, groups, keep)), logits(before))
    decayed = train(cfg, resume=True, until=9)["params"]  # the ramp's last step: factor exactly 0
    assert factors == [2 / 3, 1 / 2, 0.0]
    assert all(v.shape[1] < ecospa.validate(decayed, groups)[k][1] for k, v in keep.items() if k.endswith("mlp"))
    assert_tree_equal(decayed, ecospa.mask(decayed, groups, keep))  # the chosen units are exactly zero
    close(logits(ecospa.slice_units(decayed, groups, keep)), logits(decayed))
    after = train(cfg, resume=True, until=10)  # sliced before step 9
    assert after["rounds"][0][0] == 6 and len(after["rounds"]) == 1
    assert ecospa.validate(after["params"], groups) == ecospa.validate(
        ecospa.slice_units(decayed, groups, keep), groups)
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    events = [(r["event"], r["step"]) for r in lines if "event" in r]
    assert events == [("decay", 6), ("prune", 9)]


def test_soft_removal_resumes_exactly_in_the_middle_of_a_ramp(tmp_path):
    full = train(dataclasses.replace(SOFT, out=str(tmp_path / "a")))
    assert [r[0] for r in full["rounds"]] == [6, 12]
    cfg = dataclasses.replace(SOFT, out=str(tmp_path / "b"))
    first = train(cfg, until=7)  # one step into the first ramp
    assert checkpoint.load_full(tmp_path / "b" / "checkpoint").extra["pending"]["step"] == 6
    second = train(cfg, resume=True, until=13)  # one step into the second ramp
    third = train(cfg, resume=True)
    assert first["losses"] + second["losses"] + third["losses"] == full["losses"]  # bit for bit
    assert_tree_equal(third["params"], full["params"])
    assert_tree_equal(third["opt_state"], full["opt_state"])
    assert third["val_ppl"] == full["val_ppl"] and third["train_flops"] == full["train_flops"]
    plain = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")))
    assert full["kept_params"] == plain["kept_params"] and full["losses"] != plain["losses"]


def test_soft_removal_counts_the_decaying_units_as_dense_flops(tmp_path):
    from ecospa.train.flops import train_step_flops

    def per_step(out):
        lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        flops = [0] + [r["train_flops"] for r in lines if "train_flops" in r]
        return [b - a for a, b in zip(flops, flops[1:])]

    soft = train(dataclasses.replace(SOFT, out=str(tmp_path / "s")))
    train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")))
    s, p = per_step(tmp_path / "s"), per_step(tmp_path / "p")
    dense = train_step_flops(llama.init(SOFT.model), "llama", SOFT.batch_size, SOFT.seq_len)
    assert len(s) == len(p) == 17
    assert s[:9] == [dense] * 9  # steps 0-8: the ramp's steps 6, 7, 8 still compute every unit
    assert p[:6] == [dense] * 6 and p[6] < dense  # the plain run is sliced from step 6
    assert s[9:12] == [p[6]] * 3  # sliced before step 9: the same shapes as the plain run's first round
    assert s[12:15] == [p[9]] * 3 and s[15] < s[14] and s[15:] == [p[12]] * 2
    assert soft["train_flops"] == sum(s) > sum(p)


def test_soft_removal_must_slice_within_the_run(tmp_path):
    from ecospa.errors import UsageError
    with pytest.raises(UsageError, match="decay-steps"):
        train(dataclasses.replace(SOFT, steps=15, out=str(tmp_path)))


def test_train_cli_soft_removal_and_gradual_flags(tmp_path):
    import argparse
    from ecospa.cli.train import add_arguments, config_from_args
    from ecospa.errors import UsageError
    from ecospa.schedule import gradual
    from ecospa.train.config import check_resumable, config_from_json, config_json
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "small", "--decay-steps", "50", "--rounds", "10",
                                         "--gradual", "0.25", "0.75"]))
    assert cfg.prune == gradual(1800, 10, 0.25, 0.75, window=40, budget=0.5, decay_steps=50)
    assert [s for s, _ in cfg.prune.rounds_at()] == list(range(450, 1351, 100))
    assert config_from_args(p.parse_args(["--decay-steps", "7"])).prune.decay_steps == 7
    assert config_from_args(p.parse_args([])).prune.decay_steps == 0
    with pytest.raises(UsageError, match="--gradual 0.9 0.5"):
        config_from_args(p.parse_args(["--gradual", "0.9", "0.5"]))
    with pytest.raises(SystemExit):
        p.parse_args(["--decay-steps", "-1"])
    # a checkpoint written before decay_steps existed reads back (neutral 0) and resumes
    old = config_json(MICRO)
    del old["prune"]["decay_steps"]
    assert config_from_json(old) == MICRO
    check_resumable(MICRO, old)
    with pytest.raises(UsageError, match="prune"):
        check_resumable(dataclasses.replace(MICRO, prune=dataclasses.replace(MICRO.prune, decay_steps=1)), old)
