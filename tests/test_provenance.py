"""Which data feeds what in ``ecospa compress`` (issues 23 and 24): every batch that reaches the
Fisher calibration, the obs scores, the refit or a recovery step is a window of the TRAIN text,
and every perplexity the job reports is measured on a VAL split. Spied where each is consumed.

A batch drawn from the val split would (almost surely) not occur in the train token stream, so
"every row occurs in train" catches it; the search is a plain substring search of the int32 bytes.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ecospa.jobs.compress as job_mod
from ecospa.io.data import corpus
from ecospa.io.load import encode, load_model
from ecospa.jobs.compress import EXTRA_CHARS, Job, compress

gguf = pytest.importorskip("gguf")
from _helpers import spy_stages  # noqa: E402
from test_safety_io_cli import FAST, tiny_gguf  # noqa: E402,F401  (fixture)


def _bytes(ids: torch.Tensor) -> bytes:
    return np.ascontiguousarray(ids.numpy().astype(np.int32)).tobytes()


def _in(row: torch.Tensor, stream: bytes) -> bool:
    """``row`` occurs contiguously in the token stream (at a token boundary)."""
    needle, start = _bytes(row), 0
    while True:
        at = stream.find(needle, start)
        if at < 0:
            return False
        if at % 4 == 0:
            return True
        start = at + 1


def _flat(seen: dict) -> dict:
    """``spy_stages``' record as one list per stage: every batch a stage consumed (its calls
    joined), and the perplexities' token streams."""
    out = {k: [b for call in seen[k] for b in call] for k in ("fisher", "obs", "refit")}
    return dict(out, recover=seen["recover"], ppl=[ids for ids, _ in seen["ppl"]])


@pytest.fixture
def spied(monkeypatch):
    """What each stage consumes, call by call (``spy_stages``); read it through ``_flat``."""
    return spy_stages(monkeypatch.setattr, job_mod)


def test_every_stage_reads_train_and_every_reported_number_val(tiny_gguf, spied):
    job = Job(str(tiny_gguf), budget=0.3, rank_by="obs", reconstruct=True, distill=True,
              recon_batches=2, **dict(FAST, steps=2))
    compress(job)
    spied = _flat(spied)
    _, _, tok = load_model(str(tiny_gguf))
    train = _bytes(encode(tok, corpus("pydoc", "train")))
    val = encode(tok, corpus("pydoc", "val"))
    stdlib_val = encode(tok, corpus("stdlib", "val", max_chars=EXTRA_CHARS))
    counts = {stage: len(batches) for stage, batches in spied.items()}
    assert counts["fisher"] == job.calib_batches and counts["recover"] == 2
    assert counts["obs"] == counts["refit"] == job.recon_batches
    for stage in ("fisher", "obs", "refit", "recover"):
        for batch in spied[stage]:
            assert batch.shape == (job.batch_size, job.seq_len + 1)
            assert all(_in(row, train) for row in batch), f"a {stage} batch is not from the TRAIN text"
    streams = spied["ppl"]
    need = job.eval_windows * job.eval_seq_len + 1  # what the windows read: the held-out text's lead

    def stdlib_lead(s):
        return need <= s.numel() < stdlib_val.numel() and torch.equal(s, stdlib_val[:s.numel()])

    assert streams and all(torch.equal(s, val) or stdlib_lead(s) for s in streams)
    assert any(stdlib_lead(s) for s in streams)


def test_a_val_batch_would_be_caught(tiny_gguf):
    """The check above can fail: windows of the val text are not in the train stream."""
    _, _, tok = load_model(str(tiny_gguf))
    train = _bytes(encode(tok, corpus("pydoc", "train")))
    val = encode(tok, corpus("pydoc", "val"))
    rows = [val[i:i + 33] for i in range(0, len(val) - 33, len(val) // 20)]
    assert sum(_in(r, train) for r in rows) <= 1


def test_distillation_loss_is_kl_teacher_to_student_at_its_weight(tiny_gguf):
    """The recovery loss at --distill-weight 0.3 equals a hand computation: 0.7 x CE(labels) +
    0.3 x KL(teacher || student) (Hinton's direction: the teacher's distribution weights the log
    ratio); KL(student || teacher) or the weights swapped give other numbers."""
    cfg, dense, _ = load_model(str(tiny_gguf))
    fwd = job_mod.family_of(cfg).forward
    noise = torch.randn(dense["embed"].shape, generator=torch.Generator().manual_seed(1))
    student = {**dense, "embed": dense["embed"] * 3.0 + noise}  # far from the teacher: KL is not symmetric there
    job = Job(str(tiny_gguf), budget=0.3, distill=True, distill_weight=0.3, **FAST)
    _, loss, by_layer = job_mod._losses(job_mod.family_of(cfg), cfg, dense, job)
    batch = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    s = fwd(student, batch[:, :-1], cfg).double().log_softmax(-1)
    t = fwd(dense, batch[:, :-1], cfg).double().log_softmax(-1)
    kl_ts = (t.exp() * (t - s)).sum(-1).mean()
    kl_st = (s.exp() * (s - t)).sum(-1).mean()
    ce = F.nll_loss(s.flatten(0, 1), batch[:, 1:].flatten())
    want = 0.7 * ce + 0.3 * kl_ts
    got = float(loss(student, batch))
    assert abs(got - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    got = float(by_layer(student, batch)[1])  # what recovery differentiates (--layerwise, the default)
    assert abs(got - float(want)) < 1e-4 * max(1.0, abs(float(want)))
    for wrong in (0.7 * ce + 0.3 * kl_st, 0.3 * ce + 0.7 * kl_ts):
        assert abs(got - float(wrong)) > 1e-3


@pytest.fixture
def made(monkeypatch):
    """Every ``generate`` call of the job: (params, prompt, n, keywords, the sampled sequences)."""
    calls = []
    real = job_mod.generate

    def generate(params, cfg, prompt, n, **kw):
        out = real(params, cfg, prompt, n, **kw)
        calls.append((params, prompt, n, kw, out))
        return out

    monkeypatch.setattr(job_mod, "generate", generate)
    return calls


def test_teacher_rows_are_the_dense_models_own_text_and_the_rest_train(tiny_gguf, spied, made):
    """``--teacher-rows 1 --teacher-pool 3``: the pool is sampled once, from the DENSE model (the
    teacher, before pruning) at temperature 1, each sequence from one TRAIN token; every recovery
    batch is TRAIN windows plus the pool's rows in turn (0, 1, 2, 0: cycled), and no val text."""
    job = Job(str(tiny_gguf), budget=0.3, teacher_rows=1, teacher_pool=3, **dict(FAST, steps=4))
    compress(job)
    _, dense, tok = load_model(str(tiny_gguf))
    train = _bytes(encode(tok, corpus("pydoc", "train")))
    (params, prompt, n, kw, pool), = made  # one generate call: 3 sequences < GEN_BATCH
    assert all(torch.equal(params[k], dense[k]) for k in ("embed", "norm"))
    assert params["layers"][0]["w_up"].shape == dense["layers"][0]["w_up"].shape  # not the pruned model
    assert kw["temperature"] == 1.0 and n == job.seq_len and prompt.shape == (3, 1)
    assert all(_in(t, train) for t in prompt)
    assert pool.shape == (3, job.seq_len + 1)
    assert not any(_in(row, train) for row in pool)  # generated, not copied from the text
    batches = _flat(spied)["recover"]
    assert len(batches) == 4
    for step, batch in enumerate(batches):
        assert batch.shape == (job.batch_size, job.seq_len + 1)
        assert all(_in(row, train) for row in batch[:-1])
        assert torch.equal(batch[-1], pool[step % 3])


def test_recovery_batch_cycles_the_pool_rows():
    ids = torch.arange(1000)
    pool = torch.arange(5 * 9).reshape(5, 9) + 10_000
    job = Job("x", budget=0.3, batch_size=4, seq_len=8, teacher_rows=2, progress=False)
    got = [job_mod.recovery_batch(ids, pool, job, s, seed=0) for s in range(3)]
    for s, b in enumerate(got):
        assert b.shape == (4, 9)
        assert torch.equal(b[:2], job_mod.batch_at(ids, s, 2, 8, 0))
        assert torch.equal(b[2:], pool[[(2 * s) % 5, (2 * s + 1) % 5]])
    whole = Job("x", budget=0.3, batch_size=2, seq_len=8, teacher_rows=2, progress=False)
    assert torch.equal(job_mod.recovery_batch(ids, pool, whole, 1, seed=0), pool[[2, 3]])
    assert torch.equal(job_mod.recovery_batch(ids, None, job, 1, seed=0), job_mod.batch_at(ids, 1, 4, 8, 0))


@pytest.mark.parametrize("kw, msg", [(dict(teacher_rows=5), r"--teacher-rows must be a whole number in \[0, --batch-size 4\], got 5"),
                                     (dict(teacher_rows=-1), "--teacher-rows"),
                                     (dict(teacher_pool=0), "--teacher-pool must be a whole number >= 1, got 0")])
def test_teacher_options_are_checked(kw, msg):
    from ecospa.errors import UsageError
    with pytest.raises(UsageError, match=msg):
        Job("x", budget=0.3, batch_size=4, **kw)


@pytest.mark.parametrize("text", ["teacher", "mix"])
def test_calib_text_batches_are_the_dense_models_own_text_each_batch_its_own(tiny_gguf, spied, made, text):
    """``--calib-text teacher|mix``: one pool sampled before the first round from the DENSE model
    at temperature 1 (each sequence from one TRAIN token), as many rows as the calibration, obs and
    refit batches take; each of those batches holds its OWN pool rows (calibration batch i rows
    i*k.., refit batch j rows (calib_batches + j)*k..), the rest TRAIN windows; obs and refit read
    the same batches; recovery stays TRAIN text; no val text anywhere."""
    job = Job(str(tiny_gguf), budget=0.3, calib_text=text, recon_batches=3, rank_by="obs",
              **dict(FAST, steps=2, calib_batches=2))
    compress(job)
    _, dense, tok = load_model(str(tiny_gguf))
    train = _bytes(encode(tok, corpus("pydoc", "train")))
    k = {"teacher": 2, "mix": 1}[text]  # FAST's batch_size is 2
    (params, prompt, n, kw, pool), = made  # (2 + 3) * k sequences < GEN_BATCH: one call
    assert all(torch.equal(params[name], dense[name]) for name in ("embed", "norm"))
    assert params["layers"][0]["w_up"].shape == dense["layers"][0]["w_up"].shape  # the dense model
    assert kw["temperature"] == 1.0 and n == job.seq_len and prompt.shape == (5 * k, 1)
    assert all(_in(t, train) for t in prompt)
    assert not any(_in(row, train) for row in pool)
    # the seeds are the job's own, distinct from --teacher-rows' text (seed + 0, its starts + 3):
    # the calibration text is not the recovery's teacher text and changes with --seed
    ids = encode(tok, corpus("pydoc", "train"))
    assert kw["seed"] == job.seed + 7
    assert torch.equal(prompt, job_mod.batch_at(ids, 0, 5 * k, 1, job.seed + 10)[:, :1])
    got = _flat(spied)
    assert len(got["fisher"]) == 2 and len(got["refit"]) == 3 and len(got["obs"]) == 3
    for slot, batch in enumerate(got["fisher"] + got["refit"]):
        assert batch.shape == (job.batch_size, job.seq_len + 1)
        assert torch.equal(batch[job.batch_size - k:], pool[slot * k:(slot + 1) * k])
        assert all(_in(row, train) for row in batch[:job.batch_size - k])
    assert all(torch.equal(a, b) for a, b in zip(got["obs"], got["refit"]))
    assert all(_in(row, train) for b in got["recover"] for row in b)


def test_calib_batch_takes_its_own_slot_of_the_pool_and_train_windows_for_the_rest():
    """``calib_batch``: an odd batch with ``mix`` takes batch_size // 2 pool rows (1 of 3); the
    TRAIN rows are exactly ``batch_at(ids, index, rest, seq_len, seed)``; slot s takes pool rows
    s*k.. (cycled when the pool is shorter)."""
    ids = torch.arange(1000)
    pool = torch.arange(3 * 9).reshape(3, 9) + 10_000
    mix = Job("x", budget=0.3, batch_size=3, seq_len=8, calib_text="mix", progress=False)
    assert [job_mod.calib_rows(Job("x", budget=0.3, batch_size=b, calib_text=t, progress=False))
            for b, t in ((3, "mix"), (4, "mix"), (3, "teacher"), (3, "train"))] == [1, 2, 3, 0]
    for slot in range(5):
        b = job_mod.calib_batch(ids, pool, mix, 40 + slot, slot, seed=5)
        assert torch.equal(b[:2], job_mod.batch_at(ids, 40 + slot, 2, 8, 5))
        assert torch.equal(b[2:], pool[[slot % 3]])
    whole = Job("x", budget=0.3, batch_size=2, seq_len=8, calib_text="teacher", progress=False)
    assert torch.equal(job_mod.calib_batch(ids, pool, whole, 0, 1, seed=5), pool[[2, 0]])
    train = Job("x", budget=0.3, batch_size=2, seq_len=8, progress=False)
    assert torch.equal(job_mod.calib_batch(ids, None, train, 7, 1, seed=5), job_mod.batch_at(ids, 7, 2, 8, 5))


def test_sampled_text_comes_in_chunks_each_with_its_own_seed(monkeypatch):
    """More sequences than ``GEN_BATCH``: generated GEN_BATCH at a time, chunk i with seed + i,
    every sequence kept, each from its own TRAIN start token (drawn with seed + 3)."""
    from ecospa.func import llama
    cfg = llama.Config(vocab_size=32, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, max_seq_len=16)
    params = llama.init(cfg, seed=0)
    ids = torch.arange(500) % 32
    calls, real = [], job_mod.generate
    monkeypatch.setattr(job_mod, "generate", lambda p, c, prompt, n, **kw: (calls.append((prompt, kw["seed"])),
                                                                           real(p, c, prompt, n, **kw))[1])
    n = job_mod.GEN_BATCH + 4
    out = job_mod.sampled_text(params, cfg, ids, n, 5, seed=11)
    assert out.shape == (n, 6)
    starts = job_mod.batch_at(ids, 0, n, 1, 14)[:, :1]
    assert [(p.shape[0], seed) for p, seed in calls] == [(job_mod.GEN_BATCH, 11), (4, 11 + job_mod.GEN_BATCH)]
    assert torch.equal(torch.cat([p for p, _ in calls]), starts) and torch.equal(out[:, :1], starts)


def test_calib_text_pool_has_only_the_rows_its_batches_take(tiny_gguf, made):
    """Without the refit and the obs scores (no refit batches) the pool holds the calibration
    batches' rows only."""
    compress(Job(str(tiny_gguf), budget=0.3, calib_text="teacher", rank_by="estimator", reconstruct=False,
                 **dict(FAST, steps=0, calib_batches=2)))
    (_, prompt, *_), = made
    assert prompt.shape == (2 * FAST["batch_size"], 1)


def test_calib_text_train_samples_nothing(tiny_gguf, monkeypatch):
    monkeypatch.setattr(job_mod, "generate", lambda *a, **k: pytest.fail("sampled text for --calib-text train"))
    compress(Job(str(tiny_gguf), budget=0.3, **dict(FAST, steps=0)))


@pytest.mark.parametrize("kw, msg", [(dict(calib_text="val"), "--calib-text must be one of train, teacher, mix, got 'val'"),
                                     (dict(calib_text="mix", batch_size=1), r"--calib-text mix .* needs --batch-size >= 2, got 1")])
def test_calib_text_is_checked(kw, msg):
    from ecospa.errors import UsageError
    with pytest.raises(UsageError, match=msg):
        Job("x", budget=0.3, **kw)


def test_calib_text_flag_reaches_the_job(monkeypatch, tiny_gguf, tmp_path):
    from ecospa import cli
    import ecospa.cli.compress as cli_mod
    seen = []
    monkeypatch.setattr(cli_mod, "compress", lambda job, *a, **k: seen.append(job) or {})
    monkeypatch.setattr(cli_mod, "table", lambda summary: "")
    argv = ["compress", "--model", str(tiny_gguf), "--budget", "0.4", "--out", str(tmp_path / "x")]
    for flag, want in (([], "train"), (["--calib-text", "mix"], "mix"), (["--calib-text", "teacher"], "teacher")):
        assert cli.main(argv + flag) == 0
        assert seen[-1].calib_text == want
