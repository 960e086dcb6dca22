"""Self-distillation after pruning rounds (PruneSchedule.distill_steps, issue 27): the loss, the
teacher it uses, the steps it covers, the FLOPs it costs, exact resume, the flags."""
from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import torch

from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.io import checkpoint, data
from ecospa.schedule import PruneSchedule
from ecospa.train import loop as train_mod
from ecospa.train import train
from ecospa.train.flops import forward_flops, train_step_flops
from test_train import MICRO, PLAIN, SOFT, assert_tree_equal
from tolerances import close

# rounds at 6 and 12 (sliced at once); each followed by 3 steps of distillation (6-8, 12-14)
DISTILL = dataclasses.replace(PLAIN, prune=dataclasses.replace(PLAIN.prune, distill_steps=3, distill_weight=0.3))


def _events(out):
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["event"], r["step"]) for r in lines if "event" in r], lines


def test_equals_the_plain_run_until_the_first_round(tmp_path):
    r1 = DISTILL.prune.rounds_at()[0][0]
    plain = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")), until=r1)
    kd = train(dataclasses.replace(DISTILL, out=str(tmp_path / "d")), until=r1)
    assert plain["losses"] == kd["losses"]
    assert_tree_equal(kd["params"], plain["params"])
    assert_tree_equal(kd["opt_state"], plain["opt_state"])
    # and the same units go at r1: distillation changes the loss, not the choice
    p1 = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")), resume=True, until=r1 + 1)
    d1 = train(dataclasses.replace(DISTILL, out=str(tmp_path / "d")), resume=True, until=r1 + 1)
    assert p1["kept_params"] == d1["kept_params"] < p1["dense_params"]
    assert p1["losses"] != d1["losses"]


def _hand_loss(student, teacher, batch, cfg, w):
    """(1 - w) CE + w KL(teacher || student), written out token by token."""
    x, y = batch[:, :-1], batch[:, 1:].flatten()
    ls = torch.log_softmax(llama.forward(student, x, cfg).flatten(0, 1).double(), -1)
    lt = torch.log_softmax(llama.forward(teacher, x, cfg).flatten(0, 1).double(), -1)
    ce = -ls[torch.arange(len(y)), y].mean()
    kl = (lt.exp() * (lt - ls)).sum(-1).mean()
    return float((1 - w) * ce + w * kl), float(ce)


def test_the_loss_is_the_weighted_sum_against_the_pre_round_snapshot(tmp_path, monkeypatch):
    r1 = DISTILL.prune.rounds_at()[0][0]
    before = train(dataclasses.replace(DISTILL, out=str(tmp_path / "b")), until=r1)["params"]
    sliced, real = [], train_mod._prune_round
    monkeypatch.setattr(train_mod, "_prune_round", lambda *a: sliced.append(real(*a)) or sliced[-1])
    run = train(dataclasses.replace(DISTILL, out=str(tmp_path / "b")), resume=True, until=r1 + 1)
    student = sliced[0][0]
    tok = data.tokenizer(DISTILL.tokenizer)
    batch = data.batch_at(tok.encode(data.corpus(DISTILL.data, "train")), r1, DISTILL.batch_size,
                          DISTILL.seq_len, DISTILL.seed)
    want, ce = _hand_loss(student, before, batch, DISTILL.model, 0.3)
    close(torch.tensor(run["losses"][0]), torch.tensor(want))
    assert abs(want - ce) > 1e-3  # the KL term is not zero: the snapshot is the wider model
    # weight 1: KL only (a formula that swapped the weights would give (1 - w) KL + w CE)
    kl_only, _ = _hand_loss(student, before, batch, DISTILL.model, 1.0)
    assert abs(want - (0.7 * kl_only + 0.3 * ce)) > 1e-3


def test_distils_for_its_steps_after_each_round_and_counts_the_teacher_flops(tmp_path):
    run = train(dataclasses.replace(DISTILL, out=str(tmp_path / "d")))
    plain = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")))
    events, lines = _events(tmp_path / "d")
    assert events == [("distill", 6), ("prune", 6), ("distill_end", 9),
                      ("distill", 12), ("prune", 12), ("distill_end", 15)]
    assert [r["until"] for r in lines if r.get("event") == "distill"] == [9, 15]
    assert run["kept_params"] == plain["kept_params"]
    # the loss differs from the plain run's exactly on the distillation steps and after them
    assert run["losses"][:6] == plain["losses"][:6] and run["losses"][6] != plain["losses"][6]

    def per_step(out):
        rows = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
        flops = [0] + [r["train_flops"] for r in rows if "train_flops" in r]
        return [b - a for a, b in zip(flops, flops[1:])]

    d, p = per_step(tmp_path / "d"), per_step(tmp_path / "p")
    dense = llama.init(DISTILL.model)
    f = lambda params: forward_flops(params, "llama", DISTILL.batch_size, DISTILL.seq_len)  # noqa: E731
    assert p[:6] == d[:6] == [train_step_flops(dense, "llama", DISTILL.batch_size, DISTILL.seq_len)] * 6
    assert [a - b for a, b in zip(d, p)] == [0] * 6 + [f(dense)] * 3 + [0] * 3 + [d[12] - p[12]] * 3 + [0] * 2
    assert 0 < d[12] - p[12] < f(dense)  # the second teacher is the once-pruned model
    assert run["train_flops"] == sum(d) > plain["train_flops"]
    # the logged loss is the mixed objective exactly on the steps that distil (steps 6-8, 12-14,
    # logged as step + 1), and those lines say so with the weight
    marked = {r["step"]: r.get("distilling") for r in lines if "loss" in r}
    assert {k for k, v in marked.items() if v is not None} == {7, 8, 9, 13, 14, 15}
    assert {v for v in marked.values() if v is not None} == {0.3}


def test_resumes_exactly_in_the_middle_of_a_distillation(tmp_path):
    full = train(dataclasses.replace(DISTILL, out=str(tmp_path / "a")))
    cfg = dataclasses.replace(DISTILL, out=str(tmp_path / "b"))
    first = train(cfg, until=7)  # one step into the first distillation
    ck = checkpoint.load_full(tmp_path / "b" / "checkpoint")
    assert ck.extra["distill"] == {"step": 6, "end": 9} and set(ck.state) == {"importance", "teacher"}
    second = train(cfg, resume=True, until=13)  # one step into the second
    third = train(cfg, resume=True)
    assert first["losses"] + second["losses"] + third["losses"] == full["losses"]  # bit for bit
    assert_tree_equal(third["params"], full["params"])
    assert third["train_flops"] == full["train_flops"] and third["val_ppl"] == full["val_ppl"]
    assert not isinstance(checkpoint.load_full(tmp_path / "b" / "checkpoint").state, dict)  # teacher gone


def test_with_soft_removal_the_teacher_is_the_model_before_the_ramp(tmp_path, monkeypatch):
    cfg = dataclasses.replace(SOFT, prune=dataclasses.replace(SOFT.prune, distill_steps=2))
    assert cfg.prune.distill_end(6) == 11  # the 3-step ramp, sliced at 9, then 2 more steps
    before = train(dataclasses.replace(cfg, out=str(tmp_path)), until=6)["params"]
    teachers, real = [], train_mod.self_distill_loss
    monkeypatch.setattr(train_mod, "self_distill_loss", lambda f, c, t, w: teachers.append(t) or real(f, c, t, w))
    train(dataclasses.replace(cfg, out=str(tmp_path)), resume=True)
    assert_tree_equal(teachers[0], before)
    events, _ = _events(tmp_path)
    assert events == [("distill", 6), ("decay", 6), ("prune", 9), ("distill_end", 11),
                      ("distill", 12), ("decay", 12), ("prune", 15)]  # the run ends at 17, in the second


def test_invalid_settings_and_the_flags(tmp_path):
    from ecospa.cli.train import add_arguments, config_from_args
    from ecospa.train.config import check_resumable, config_from_json, config_json
    for bad in ({"distill_steps": -1}, {"distill_steps": 1.5}, {"distill_weight": 0},
                {"distill_weight": 1.5}, {"distill_weight": True}):
        with pytest.raises(ValueError, match="distill"):
            PruneSchedule(**bad)
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "small", "--distill-steps", "40", "--distill-weight",
                                         "0.25", "--rounds", "10", "--gradual", "0.25", "0.75"]))
    assert (cfg.prune.distill_steps, cfg.prune.distill_weight) == (40, 0.25)
    assert [s for s, _ in cfg.prune.rounds_at()] == list(range(450, 1351, 100))  # --gradual keeps them
    assert config_from_args(p.parse_args([])).prune.distill_steps == 0
    for flag, value in (("--distill-weight", "0"), ("--distill-weight", "1.2"), ("--distill-steps", "-3")):
        with pytest.raises(SystemExit):
            p.parse_args([flag, value])
    # a checkpoint written before the fields existed reads back at their neutral values
    old = config_json(MICRO)
    del old["prune"]["distill_steps"], old["prune"]["distill_weight"]
    assert config_from_json(old) == MICRO
    check_resumable(MICRO, old)
    with pytest.raises(UsageError, match="prune"):
        check_resumable(dataclasses.replace(MICRO, prune=dataclasses.replace(MICRO.prune, distill_steps=2)), old)


def test_killed_between_the_renames_while_distilling_then_resume_is_exact(tmp_path, monkeypatch):
    """A save that dies between its renames while the teacher and the carried importance are in
    the checkpoint: the resume finds the earlier complete one (with its teacher) and ends equal
    to the run that was never killed."""
    from test_safety_train import Killed, kill_between_renames, revive
    cfg = dataclasses.replace(DISTILL, ckpt_every=2,
                              prune=dataclasses.replace(DISTILL.prune, carry=0.5))
    full = train(dataclasses.replace(cfg, out=str(tmp_path / "full")))
    run = dataclasses.replace(cfg, out=str(tmp_path / "run"))
    kill_between_renames(monkeypatch, nth=4)  # saving step 10: step 8's (distilling 6-8) moved aside
    with pytest.raises(Killed):
        train(run)
    revive(monkeypatch)
    aside = [p for p in (tmp_path / "run").glob(".checkpoint.*")]
    assert aside and not (tmp_path / "run" / "checkpoint").exists()
    held = [checkpoint.load_full(p) for p in aside if ".old-" in p.name]  # the complete one set aside
    names = sorted(g.name for g in llama.coupled_groups(cfg.model))
    assert [(c.step, c.extra["distill"], sorted(c.state), sorted(c.extra["carried"])) for c in held] == \
        [(8, {"step": 6, "end": 9}, ["importance", "teacher"], names)]
    rest = train(run, resume=True)
    assert_tree_equal(rest["params"], full["params"])
    assert_tree_equal(rest["opt_state"], full["opt_state"])
    assert full["losses"][-len(rest["losses"]):] == rest["losses"]
