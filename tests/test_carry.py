"""Importance carried across pruning rounds (PruneSchedule.carry, issue 27): the blend, what the
next round receives, exact resume, soft removal, the flags."""
from __future__ import annotations

import argparse
import dataclasses

import pytest
import torch

from ecospa.errors import UsageError
from ecospa.schedule import PruneSchedule, blend_scores, kept_scores
from ecospa.train import loop as train_mod
from ecospa.train import train
from test_train import MICRO, PLAIN, SOFT, assert_tree_equal
from tolerances import EXACT, close

CARRY = dataclasses.replace(PLAIN, prune=dataclasses.replace(PLAIN.prune, carry=0.6))


def _by_hand_mean(scores: dict) -> float:
    """The mean over every unit of every group, written out unit by unit."""
    values = [float(v) for x in scores.values() for v in x.flatten()]
    return sum(values) / len(values)


def test_blend_and_carry_by_hand():
    """Two groups with different scales: the blend divides by the mean over ALL units (a
    per-group normalization, or none, gives other numbers), carried units are gathered in the
    keep's order and divided by their own mean."""
    now = {"a": torch.tensor([[1.0, 3.0, 8.0]], dtype=torch.float64),
           "b": torch.tensor([[10.0, 2.0], [4.0, 6.0]], dtype=torch.float64)}
    carried = {"a": torch.tensor([[0.5, 1.5, 1.0]], dtype=torch.float64),
               "b": torch.tensor([[2.0, 0.25], [1.0, 0.75]], dtype=torch.float64)}
    m = _by_hand_mean(now)  # (1 + 3 + 8 + 10 + 2 + 4 + 6) / 7
    got = blend_scores(carried, now, 0.3)
    for k in now:
        close(got[k], 0.3 * carried[k] + 0.7 * now[k] / m)
    assert blend_scores(None, now, 0.3) == now and blend_scores(carried, now, 0.0) == now
    keep = {"a": torch.tensor([[2, 0]]), "b": torch.tensor([[1], [0]])}
    kept = kept_scores(got, keep)
    picked = {"a": got["a"][0, [2, 0]][None], "b": torch.stack([got["b"][0, 1:2], got["b"][1, 0:1]])}
    mk = _by_hand_mean(picked)
    for k in picked:
        close(kept[k], picked[k] / mk)
    with pytest.raises(ValueError, match="previous round's kept units"):
        blend_scores({"a": carried["a"][:, :2], "b": carried["b"]}, now, 0.3)


def _spy(monkeypatch):
    """Record every blend (its inputs and result) and every hard round's keep."""
    seen = {"blend": [], "keep": []}
    real_blend, real_round = train_mod.blend_scores, train_mod._prune_round

    def blend(carried, scores, carry):
        out = real_blend(carried, scores, carry)
        seen["blend"].append((carried, scores, carry, out))
        return out

    def prune_round(params, opt_state, groups, scores, *a):
        out = real_round(params, opt_state, groups, scores, *a)
        seen["keep"].append((scores, out[2]))
        return out

    monkeypatch.setattr(train_mod, "blend_scores", blend)
    monkeypatch.setattr(train_mod, "_prune_round", prune_round)
    return seen


def test_the_second_round_ranks_by_the_blend_of_both_windows(tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    run = train(dataclasses.replace(CARRY, out=str(tmp_path / "c")), progress=False)
    (c1, own1, w1, out1), (c2, own2, w2, out2) = seen["blend"]
    assert c1 is None and w1 == w2 == 0.6 and out1 == own1  # the first round: its own window
    (s1, keep1), (s2, _) = seen["keep"]
    assert s1 is out1 and s2 is out2  # the blended scores are what the rounds rank by
    m1 = _by_hand_mean({k: x.double().gather(-1, keep1[k]) for k, x in own1.items()})
    m2 = _by_hand_mean(own2)
    for k in own2:  # by hand: round 1's scores of its kept units (mean 1) and round 2's own
        carried = own1[k].double().gather(-1, keep1[k]) / m1
        close(c2[k], carried)
        close(out2[k], 0.6 * carried + 0.4 * own2[k].double() / m2)
    # the same run without carry: equal until the second round, then other scores
    monkeypatch.undo()
    plain = train(dataclasses.replace(PLAIN, out=str(tmp_path / "p")), progress=False)
    r2 = PLAIN.prune.rounds_at()[1][0]
    assert plain["losses"][:r2] == run["losses"][:r2]


@pytest.mark.parametrize("base", [CARRY, dataclasses.replace(SOFT, prune=dataclasses.replace(SOFT.prune, carry=0.6))],
                         ids=["hard", "soft"])
def test_resume_between_rounds_is_exact(tmp_path, monkeypatch, base):
    """Stopped between the rounds (the carried scores only in the checkpoint) and resumed: the
    same losses and params as one run. With soft removal the carry is taken at the round and
    used after the slicing."""
    r1, r2 = (s for s, _ in base.prune.rounds_at())
    seen = _spy(monkeypatch)
    whole = train(dataclasses.replace(base, out=str(tmp_path / "w")), progress=False)
    carried = seen["blend"][1][0]
    assert carried is not None and carried.keys() == seen["blend"][1][1].keys()
    cut = dataclasses.replace(base, out=str(tmp_path / "r"))
    first = train(cut, until=(r1 + r2) // 2 + 1, progress=False)
    rest = train(cut, resume=True, progress=False)
    assert first["losses"] + rest["losses"] == whole["losses"]
    assert_tree_equal(rest["params"], whole["params"])
    assert whole["kept_params"] < whole["dense_params"]


def test_invalid_values_and_the_flag():
    from ecospa.cli.train import add_arguments, config_from_args
    from ecospa.train.config import check_resumable, config_from_json, config_json
    for bad in (1, 1.0, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match="carry"):
            PruneSchedule(carry=bad)
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--preset", "small", "--carry", "0.35", "--rounds", "10",
                                         "--gradual", "0.25", "0.75"]))
    assert cfg.prune.carry == 0.35 and len(cfg.prune.rounds_at()) == 10  # --gradual keeps it
    assert config_from_args(p.parse_args([])).prune.carry == 0.0
    for value in ("1", "-0.2", "x"):
        with pytest.raises(SystemExit):
            p.parse_args(["--carry", value])
    old = config_json(MICRO)  # a checkpoint from before the field: carry 0
    del old["prune"]["carry"]
    assert config_from_json(old) == MICRO
    with pytest.raises(UsageError, match="prune"):
        check_resumable(dataclasses.replace(MICRO, prune=dataclasses.replace(MICRO.prune, carry=0.5)), old)


def test_normalization_of_empty_all_zero_and_small_scores():
    """The mean over every unit: below 1 it still divides (0.25, 0.5, 0.75 -> 0.5, 1, 1.5), all
    zero scores stay zero (not 0/0), no groups at all give no groups."""
    small = {"a": torch.tensor([[0.25, 0.5, 0.75]], dtype=torch.float64)}
    all_of_a = {"a": torch.tensor([[0, 1, 2]])}
    assert torch.equal(kept_scores(small, all_of_a)["a"], torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64))
    zero = kept_scores({"a": torch.zeros(1, 3)}, {"a": torch.tensor([[2, 0]])})
    assert torch.equal(zero["a"], torch.zeros(1, 2, dtype=torch.float64))
    assert kept_scores({}, {}) == {} and blend_scores({}, {}, 0.5) == {}


def test_blend_errors_name_both_shapes_and_missing_groups():
    now = {"a": torch.tensor([[1.0, 3.0, 8.0]], dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"'a' has shape \(1, 2\), this round's \(1, 3\)"):
        blend_scores({"a": torch.ones(1, 2, dtype=torch.float64)}, now, 0.3)
    with pytest.raises(ValueError, match=r"'a' has shape None, this round's \(1, 3\)"):
        blend_scores({"b": torch.ones(1, 3, dtype=torch.float64)}, now, 0.3)


def test_float32_carried_scores_are_blended_in_float64():
    """Carried scores in another dtype are converted before the product (``carry x carried`` in
    float64, not rounded to float32)."""
    now = {"a": torch.tensor([[1.0, 3.0]], dtype=torch.float64)}
    third = torch.tensor([[1 / 3, 2 / 3]], dtype=torch.float32)
    got = blend_scores({"a": third}, now, 0.3)["a"]
    assert got.dtype == torch.float64
    close(got, 0.3 * third.double() + 0.7 * now["a"] / 2.0)


def test_carried_scores_round_trip_the_state_exactly():
    """What ``_carry_on`` writes into the checkpoint state (JSON lists) ``_carried`` reads back
    bit for bit in float64 (1/3 is not a float32); carry 0 writes nothing, no state reads None."""
    scores = {"a": torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64),
              "b": torch.tensor([[3.0], [5.0]], dtype=torch.float64)}
    keep = {"a": torch.tensor([[2, 1]]), "b": torch.tensor([[0], [0]])}
    state = {}
    train_mod._carry_on(state, PruneSchedule(carry=0.0), scores, keep)
    assert state == {} and train_mod._carried(state) is None
    train_mod._carry_on(state, PruneSchedule(carry=0.5), scores, keep)
    assert set(state) == {"carried"}
    back = train_mod._carried(state)
    want = kept_scores(scores, keep)  # 4, 2, 3, 5 over their mean 3.5
    assert back.keys() == want.keys()
    for k in want:
        assert back[k].dtype == torch.float64 and torch.equal(back[k], want[k])
    close(back["a"], torch.tensor([[4.0, 2.0]], dtype=torch.float64) / 3.5)
    exact = train_mod._carried({"carried": {"a": [[0.1, 1 / 3]]}})["a"]
    assert exact.dtype == torch.float64 and exact.tolist() == [[0.1, 1 / 3]]
