"""Tests that kill mutants of the jobs (issue 24, profile ``jobs`` of tools/mutation.sh):
``ecospa.jobs.compress`` on a tiny in-memory model (a byte tokenizer, no file to load, well
under a second a job), ``compress_job``, ``export``, ``generate`` and ``harness``.

Numbers are compared with what is computed here from the model itself (perplexities, parameter
counts, the batches each stage may read), at non-default option values."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ecospa.jobs.compress as job_mod
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.io import checkpoint
from ecospa.io.data import ByteTokenizer, batch_at, corpus
from ecospa.jobs.compress import EXTRA_CHARS, Job, RecoveryDiverged, compress

CFG = llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, init_std=0.3)
SMALL = dict(batch_size=2, seq_len=16, calib_batches=2, recon_batches=2, eval_seq_len=16, eval_windows=2,
             progress=False)


def _loaded(seed=3):
    return CFG, llama.init(CFG, seed=seed), ByteTokenizer()


def _ppl(params, ids, T, n):
    """exp(mean next-token cross-entropy) over the first n non-overlapping windows of T + 1 tokens."""
    w = torch.stack([ids[i * T:i * T + T + 1] for i in range(n)])
    with torch.no_grad():
        logits = llama.forward(params, w[:, :-1], CFG)
    return math.exp(float(F.cross_entropy(logits.flatten(0, 1).double(), w[:, 1:].flatten())))


def _n_params(tree) -> int:
    return sum(x.numel() for x in torch.utils._pytree.tree_leaves(tree) if torch.is_tensor(x))


def _bytes(ids):
    return np.ascontiguousarray(ids.numpy().astype(np.int32)).tobytes()


def _in(row, stream: bytes) -> bool:
    needle, start = _bytes(row), 0
    while (at := stream.find(needle, start)) >= 0:
        if at % 4 == 0:
            return True
        start = at + 1
    return False


# ---- compress: which data feeds which stage ---------------------------------------------------

@pytest.fixture(scope="module")
def spied_job():
    """One two-round job with every stage on (obs ranking, refit, distilled recovery, a curve, an
    extra held-out source), what each stage consumed, and its summary."""
    seen = {k: [] for k in ("fisher", "obs", "refit", "recover", "ppl")}
    mp = pytest.MonkeyPatch()

    def spy(name, stage, index):
        real = getattr(job_mod, name)
        mp.setattr(job_mod, name, lambda *a, **k: (seen[stage].append(list(a[index])), real(*a, **k))[1])

    spy("fisher", "fisher", 3)
    spy("obs_scores", "obs", 3)
    spy("reconstruct", "refit", 3)
    real_step, real_ppl = job_mod.make_step, job_mod.perplexity

    def make_step(loss, opt, **kw):
        step = real_step(loss, opt, **kw)
        return lambda p, s, batch: (seen["recover"].append(batch), step(p, s, batch))[1]

    def perplexity(forward, params, cfg, ids, **kw):
        seen["ppl"].append((ids, kw))
        return real_ppl(forward, params, cfg, ids, **kw)

    mp.setattr(job_mod, "make_step", make_step)
    mp.setattr(job_mod, "perplexity", perplexity)
    cfg, dense, tok = _loaded()
    before = {k: v.clone() for k, v in dense["layers"][0].items()}
    job = Job("tiny", budget=0.4, rounds=2, rank_by="obs", reconstruct=True, distill=True, distill_weight=0.3,
              steps=4, eval_at=(1, 4), seed=5, **SMALL)
    try:
        summary = compress(job, loaded=(cfg, dense, tok))
    finally:
        mp.undo()
    return job, seen, summary, dense, before


def test_every_stage_reads_its_own_train_windows_and_every_number_val(spied_job):
    job, seen, summary, _, _ = spied_job
    tok = ByteTokenizer()
    train_ids = tok.encode(corpus("pydoc", "train"))
    train, val = _bytes(train_ids), tok.encode(corpus("pydoc", "val"))
    stdlib = tok.encode(corpus("stdlib", "val", max_chars=EXTRA_CHARS))
    # two rounds of 2 calibration and 2 refit batches, read by the obs scores and the refit alike;
    # 4 recovery steps in two rounds of 2
    assert [len(seen[k]) for k in ("fisher", "obs", "refit")] == [2, 2, 2]
    assert all(len(b) == 2 for k in ("fisher", "obs", "refit") for b in seen[k])
    assert len(seen["recover"]) == 4
    for stage in ("fisher", "obs", "refit"):
        for batches in seen[stage]:
            for b in batches:
                assert b.shape == (2, 17) and all(_in(row, train) for row in b), stage
    for b in seen["recover"]:
        assert b.shape == (2, 17) and all(_in(row, train) for row in b)
    # the refit's batches are the obs scores' ones, other windows than the calibration's, new each round
    for r in range(2):
        assert all(torch.equal(a, b) for a, b in zip(seen["obs"][r], seen["refit"][r]))
        assert not any(torch.equal(a, b) for a in seen["fisher"][r] for b in seen["refit"][r])
    assert not any(torch.equal(a, b) for a in seen["fisher"][0] for b in seen["fisher"][1])
    assert not any(torch.equal(a, b) for a in seen["refit"][0] for b in seen["refit"][1])
    # each round's recovery draws its own windows (another seed per round)
    assert not any(torch.equal(a, b) for a in seen["recover"][:2] for b in seen["recover"][2:])
    assert summary["calibration_tokens"] == 2 * (2 + 2) * 2 * 17
    # every perplexity: the val split, or the leading tokens of the extra source's val split
    ev = dict(seq_len=16, batch_size=1, max_windows=2, progress=False)
    for ids, kw in seen["ppl"]:
        assert {k: kw[k] for k in ev} == ev and kw["loss_fn"] is not None  # layer-wise: chunked
        assert torch.equal(ids, val) or (33 <= ids.numel() < stdlib.numel() and torch.equal(ids, stdlib[:ids.numel()]))
    # val: dense, pruned and refit in each round, the curve's 2 points, round 1's recovered model
    # (its last step, 2, is not a curve point; round 2's is: reused); stdlib: dense and the curve
    assert sum(torch.equal(ids, val) for ids, _ in seen["ppl"]) == 1 + 2 * 2 + 2 + 1
    assert len(seen["ppl"]) == 8 + 1 + 2


def test_the_summary_numbers_are_the_models_own(spied_job, tmp_path):
    job, _, s, dense, before = spied_job
    tok = ByteTokenizer()
    val, stdlib = tok.encode(corpus("pydoc", "val")), tok.encode(corpus("stdlib", "val", max_chars=EXTRA_CHARS))
    assert s["ppl_dense"] == pytest.approx(_ppl(dense, val, 16, 2), rel=1e-4)
    assert s["ppl_dense_extra"]["stdlib"] == pytest.approx(_ppl(dense, stdlib, 16, 2), rel=1e-4)
    # recovery never writes the teacher (the dense model the caller gave)
    assert all(torch.equal(v, dense["layers"][0][k]) for k, v in before.items())
    assert [c["step"] for c in s["curve"]] == [1, 4] and [r["steps"] for r in s["rounds"]] == [2, 2]
    assert s["ppl_recovered"] == s["rounds"][1]["ppl_recovered"] == s["curve"][-1]["ppl"]
    assert s["ppl_extra"] == s["curve"][-1]["ppl_extra"] and set(s["ppl_extra"]) == {"stdlib"}
    assert s["ppl_pruned"] == s["rounds"][0]["ppl_pruned"]
    assert s["ppl_reconstructed"] == s["rounds"][0]["ppl_reconstructed"]
    assert s["ppl_reconstructed"] != s["ppl_pruned"] and s["rounds"][1]["ppl_pruned"] != s["ppl_pruned"]
    for r in s["rounds"]:
        assert math.isfinite(r["final_train_loss"]) and r["reconstruct_seconds"] > 0 and r["recover_seconds"] > 0
    assert s["job"]["budget"] == 0.4 and s["job"]["eval_at"] == (1, 4) and s["job"]["seed"] == 5
    assert s["latency_ratio"] > 0 and s["dense_bytes"] == 4 * _n_params(dense)
    assert s["model"] == "tiny"


def test_a_saved_job_reports_what_it_saved(tmp_path):
    """--out: the checkpoint holds the summary; its params are the ones the numbers describe."""
    cfg, dense, tok = _loaded(seed=4)
    out = tmp_path / "c"
    s = compress(Job("tiny", out=str(out), sparsity={"mlp": 0.5, "vo": 0.25}, rank_by="estimator",
                     reconstruct=False, steps=2, eval_extra=(), seed=2, **SMALL), loaded=(cfg, dense, tok))
    params, _, extra = checkpoint.load(str(out))
    assert extra["summary"]["ppl_recovered"] == s["ppl_recovered"] and extra["tokenizer"] == "tiny"
    val = tok.encode(corpus("pydoc", "val"))
    assert s["ppl_recovered"] == pytest.approx(_ppl(params, val, 16, 2), rel=1e-4)
    assert s["ppl_extra"] == {} and s["curve"] == [] and s["ppl_reconstructed"] is None
    layer, dlayer = params["layers"][0], dense["layers"][0]
    assert layer["w_up"].shape[1] == 12 and layer["wv"].shape[-1] == 3 and layer["wk"].shape == dlayer["wk"].shape
    # the counts, by hand, per layer: MLP 24 -> 12 neurons of 3 x 16 weights; V/O 4 -> 3 dims in
    # each of 2 KV heads, 16 (wv) + 2 x 16 (wo, 2 query heads) weights a dim; Q/K 2 KV heads x 2
    # rotary pairs of 16 x 2 x 2 (wq) + 16 x 2 (wk) weights
    removed_per_layer = 12 * 3 * 16 + 2 * 1 * (16 + 2 * 16)
    assert s["dense_params"] == _n_params(dense) and s["kept_params"] == _n_params(params)
    assert s["dense_params"] - s["kept_params"] == 2 * removed_per_layer
    group_dense = 2 * (24 * 3 * 16 + 2 * 4 * (16 + 2 * 16) + 2 * 2 * (16 * 2 * 2 + 16 * 2))
    assert s["group_params"] == group_dense
    assert s["group_fraction_removed"] == pytest.approx(2 * removed_per_layer / group_dense)
    assert s["block_params"] == _n_params(dense["layers"])
    assert s["block_fraction_removed"] == pytest.approx(2 * removed_per_layer / _n_params(dense["layers"]))
    assert [r["steps"] for r in s["rounds"]] == [2] and s["rounds"][0]["final_train_loss"] > 0
