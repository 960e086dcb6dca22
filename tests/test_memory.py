"""Memory savings that must not change a number (issue 28 item 1): loading that frees each layer's
source tensors as it converts, gradients computed a few rows at a time (calibration and
recovery), and the per-phase record of the compress job. Memory itself is measured in
benchmarks/compress_memory.py, never asserted here."""
from __future__ import annotations

import copy

import optree
import pytest
import torch

from ecospa import optim
from ecospa.func import llama
from ecospa.importance import coupled_fisher, fisher, microbatched
from ecospa.io.hf_llama import from_hf
from ecospa.train.step import lm_loss, make_step
from strategies import tokens
from tolerances import EXACT, close

CFG = llama.Config(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)


def _params():
    return llama.init(CFG, 0, dtype=torch.float64)


def _leaves(tree):
    return torch.utils._pytree.tree_leaves(tree)


def test_consuming_conversion_gives_the_same_tree_and_empties_the_input():
    from test_gguf import HF_CFG, _hf_state_dict
    sd = _hf_state_dict(HF_CFG)
    keep = {k: v.clone() for k, v in sd.items()}
    cfg_a, ref = from_hf(sd, HF_CFG)
    assert all(torch.equal(sd[k], keep[k]) for k in keep)  # the copying path leaves sd alone
    cfg_b, got = from_hf(sd, HF_CFG, consume=True)
    assert sd == {} and cfg_a == cfg_b
    assert len(_leaves(got)) == len(_leaves(ref))
    for a, b in zip(_leaves(got), _leaves(ref)):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_gguf_load_is_the_copying_conversion(tmp_path):
    pytest.importorskip("gguf")
    from ecospa.io.gguf import hf_config, hf_state_dict, load_gguf, open_reader
    from test_gguf import HF_CFG, _hf_state_dict, write_gguf
    write_gguf(tmp_path / "m.gguf", _hf_state_dict(HF_CFG), HF_CFG)
    reader = open_reader(tmp_path / "m.gguf")
    c = hf_config(reader)
    _, ref = from_hf(hf_state_dict(reader, c), c)
    _, got, _ = load_gguf(tmp_path / "m.gguf")
    for a, b in zip(_leaves(got), _leaves(ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("micro", [1, 3])
def test_fisher_a_few_rows_at_a_time_is_the_batch_fisher(micro):
    params, groups = _params(), llama.coupled_groups(CFG)
    batches = [tokens(CFG, s, batch=4, length=9) for s in range(2)]
    loss = lm_loss(llama.forward, CFG)
    ref = fisher(loss, params, groups, batches, estimator=coupled_fisher(groups))
    got = fisher(loss, params, groups, batches, estimator=coupled_fisher(groups), micro_batch=micro)
    assert ref.keys() == got.keys()
    for k in ref:
        close(got[k], ref[k], EXACT)


@pytest.mark.parametrize("distill", [False, True])
def test_recovery_step_a_few_rows_at_a_time_is_the_batch_step(distill):
    params = _params()
    teacher = copy.deepcopy(params)
    teacher["norm"] = teacher["norm"] * 1.5  # a teacher that differs from the student
    def ce(p, batch):  # lm_loss in float64 (lm_loss itself computes the loss in float32)
        logits = llama.forward(p, batch[:, :-1], CFG)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def kd(p, batch):
        logits = llama.forward(p, batch[:, :-1], CFG)
        with torch.no_grad():
            ref = llama.forward(teacher, batch[:, :-1], CFG)
        kl = torch.nn.functional.kl_div(logits.log_softmax(-1).flatten(0, 1), ref.log_softmax(-1).flatten(0, 1),
                                        log_target=True, reduction="batchmean")
        return 0.5 * ce(p, batch) + 0.5 * kl

    loss = kd if distill else ce
    opt = optim.adamw(1e-2, weight_decay=0.0)
    batch = tokens(CFG, 3, batch=4, length=9)
    a = make_step(loss, opt)(params, opt.init(params), batch)
    b = make_step(loss, opt, micro_batch=1)(params, opt.init(params), batch)
    close(b.loss, a.loss, EXACT)
    for x, y in zip(_leaves(b.params), _leaves(a.params)):
        close(x, y, EXACT)
    for x, y in zip(_leaves(b.opt_state), _leaves(a.opt_state)):
        if torch.is_tensor(y) and y.is_floating_point():
            close(x, y, EXACT)


def test_microbatched_leaves_small_batches_and_none_alone():
    calls = []

    def fn(params, batch):
        calls.append(batch.shape[0])
        return {"g": batch.double().sum(0)}

    assert microbatched(fn, None) is fn
    batch = torch.arange(10.0).reshape(5, 2)
    out = microbatched(fn, 2)(None, batch)
    assert calls == [2, 2, 1]
    parts = batch.double().split(2)  # weights 2/5, 2/5, 1/5: the parts' row counts
    close(out["g"], sum(p.sum(0) * (p.shape[0] / 5) for p in parts), EXACT)
    calls.clear()
    microbatched(fn, 8)(None, batch)
    assert calls == [5]


@pytest.mark.parametrize("name", ["fisher", "taylor", "uncoupled", "magnitude"])
def test_gradients_of_the_read_leaves_only_give_the_same_scores(name):
    """``fisher`` differentiates only the leaves an estimator reads (``Importance.reads``): the
    same scores as with the whole gradient tree."""
    from ecospa.importance import ESTIMATORS
    params, groups = _params(), llama.coupled_groups(CFG)
    batches = [tokens(CFG, s, batch=2, length=9) for s in range(2)]
    loss = lm_loss(llama.forward, CFG)
    est = ESTIMATORS[name](groups)
    assert est.reads is not None and set(est.reads) <= {m.path for g in groups for m in g.members}
    ref = fisher(loss, params, groups, batches, estimator=est._replace(reads=None))
    got = fisher(loss, params, groups, batches, estimator=est)
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_owned_copies_exactly_the_leaves_another_tree_uses():
    from ecospa.jobs.compress import _owned
    dense = {"embed": torch.randn(4, 3), "layers": ({"w": torch.randn(3, 3)},)}
    student = {"embed": dense["embed"], "layers": ({"w": torch.randn(3, 2)},)}
    view = {"embed": dense["embed"][:2], "layers": ({"w": student["layers"][0]["w"]},)}
    got = _owned(student, dense)
    assert got["embed"] is not dense["embed"] and torch.equal(got["embed"], dense["embed"])
    assert got["layers"][0]["w"] is student["layers"][0]["w"]  # its own tensor: not copied
    assert _owned(view, dense)["embed"].untyped_storage().data_ptr() != dense["embed"].untyped_storage().data_ptr()
    assert _owned(student, None)["embed"] is dense["embed"]
    # --no-train-embedding: the fixed leaf stays the teacher's tensor, the others are still copied
    both = {"embed": dense["embed"], "norm": dense["layers"][0]["w"][0], "layers": student["layers"]}
    got = _owned(both, dense, skip=("embed",))
    assert got["embed"] is dense["embed"] and list(got) == list(both)
    assert got["norm"].untyped_storage().data_ptr() != dense["layers"][0]["w"].untyped_storage().data_ptr()


def test_in_place_recovery_leaves_the_teacher_and_the_numbers_as_they_were(tmp_path, monkeypatch):
    """Recovery updates the student in place (AdamW with donate=True); the distillation teacher,
    which shares the unpruned leaves (embedding, norms) with the student, is unchanged, and the
    job's numbers are bit for bit those of the pure update."""
    pytest.importorskip("gguf")
    import ecospa.jobs.compress as job_mod
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    from test_gguf import HF_CFG, _hf_state_dict, write_gguf
    alpha = _byte_alphabet()
    info = {"tokens": [alpha[b] for b in range(256)], "merges": [], "token_type": [1] * 256}
    path = tmp_path / "t.gguf"
    write_gguf(path, _hf_state_dict(dict(HF_CFG, vocab_size=256)), dict(HF_CFG, vocab_size=256), tokenizer=info)
    teachers, real_losses, real_step = [], job_mod._losses, job_mod.make_step

    def losses_spy(fam, cfg, teacher, job):
        teachers.append((teacher, copy.deepcopy(teacher)))
        return real_losses(fam, cfg, teacher, job)

    monkeypatch.setattr(job_mod, "_losses", losses_spy)
    fast = dict(steps=3, batch_size=2, seq_len=16, calib_batches=1, recon_batches=1, eval_seq_len=32,
                eval_windows=2, progress=False, distill=True, lr=3e-2, budget=0.4)
    donated = job_mod.compress(job_mod.Job(str(path), **fast))
    monkeypatch.setattr(job_mod, "make_step", lambda *a, donate=False, **kw: real_step(*a, **kw))
    pure = job_mod.compress(job_mod.Job(str(path), **fast))
    for teacher, before in teachers:
        for x, y in zip(optree.tree_leaves(teacher, namespace=""), optree.tree_leaves(before, namespace="")):
            assert torch.equal(x, y)
    assert donated["rounds"][0]["final_train_loss"] == pure["rounds"][0]["final_train_loss"]
    assert donated["ppl_recovered"] == pure["ppl_recovered"] != donated["rounds"][0]["ppl_pruned"]


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * __import__("os").sysconf("SC_PAGE_SIZE") / 2**20


_PREMISE = """
import torch
import os
from ecospa import _memory
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
big = torch.ones(30 * 2**18)  # 30 MB freed: glibc's mmap threshold rises, 2 MB tensors use the heap
del big
freed, kept = [], []
for i in range(100):
    freed.append(torch.ones(2**19))   # 2 MB each, touched
    kept.append(torch.ones(2**10))    # 4 KB survivors between them
del freed
resident = rss_mb()  # freed, but most of it still resident: the heap only shrinks from its top
print(_memory.trim(), resident - rss_mb())
"""


def test_trim_returns_a_fragmented_heap_to_the_os(monkeypatch):
    """The premise of ``ecospa._memory``: freed tensors kept in glibc's heap by a few survivors
    among them stay resident until ``trim()``; a no-op ``trim`` leaves them (this test fails).
    In a fresh process: a test worker may have fixed the mmap threshold already (the compress
    CLI's ``return_freed_memory``), after which 2 MB tensors never use the heap."""
    import subprocess
    import sys
    from ecospa import _memory
    if not _memory.enabled():
        pytest.skip("not glibc (or ECOSPA_MALLOC_TRIM=0): malloc_trim is unavailable")
    out = subprocess.run([sys.executable, "-c", _PREMISE], capture_output=True, text=True, check=True,
                         env={k: v for k, v in __import__("os").environ.items() if k != "ECOSPA_MALLOC_TRIM"})
    ran, returned = out.stdout.split()
    assert ran == "True"
    assert float(returned) > 5  # 20-200 MB of the 200 MB went back (measured); a no-op trim returns none
    monkeypatch.setenv("ECOSPA_MALLOC_TRIM", "0")
    assert not _memory.enabled() and _memory.trim() is False


@pytest.mark.parametrize("reads", [None, "layers"])
def test_layerwise_step_trims_three_times_and_changes_no_value(monkeypatch, reads):
    """layer_grad_and_value trims after the teacher's and the student's forward and before the
    embedding's gradient; the gradients and the loss are those of the untrimmed step, bit for bit."""
    from ecospa import _memory
    from ecospa.func import layerwise
    from ecospa.func.families import family_of
    params = _params()
    fam = family_of(CFG)
    loss = layerwise.distill_loss(fam, CFG, llama.init(CFG, 1, dtype=torch.float64), 0.5)
    paths = None if reads is None else [("layers", 1, "wo")]
    fn = layerwise.layer_grad_and_value(fam, CFG, loss, paths)
    batch = torch.randint(0, CFG.vocab_size, (3, 9), generator=torch.Generator().manual_seed(0))
    calls = []
    real = _memory.trim
    monkeypatch.setattr(_memory, "trim", lambda: calls.append(1) or real())
    got = fn(params, batch)
    assert len(calls) == (3 if reads is None else 2)  # no embedding gradient for reads
    monkeypatch.setenv("ECOSPA_MALLOC_TRIM", "0")
    ref = fn(params, batch)
    for a, b in zip(_leaves(got), _leaves(ref)):
        assert a is None and b is None or torch.equal(a, b)


def test_recovery_drops_each_steps_gradients_before_the_next(monkeypatch):
    """recover() keeps no step's gradients while the next step computes its own (they would sit
    beside the new ones at the step's peak): weak references to step i's gradients are dead when
    step i + 1 starts."""
    import weakref
    import ecospa.jobs.compress as job_mod
    params = _params()
    grad_value = torch.func.grad_and_value(lm_loss(llama.forward, CFG))
    refs, alive = [], []

    def spy(p, batch):
        alive.append(sum(r() is not None for r in refs))
        grads, value = grad_value(p, batch)
        refs.extend(weakref.ref(x) for x in _leaves(grads))
        return grads, value

    ids = torch.randint(0, CFG.vocab_size, (400,), generator=torch.Generator().manual_seed(0))
    job = job_mod.Job("x", budget=0.5, batch_size=2, seq_len=8, lr=1e-3)
    job_mod.recover(lm_loss(llama.forward, CFG), params, ids, job, 3, 0, grad_and_value=spy)
    assert len(alive) == 3 and alive == [0, 0, 0]


@pytest.mark.parametrize("env, fixed", [(None, True), ("1", True), ("0", False)])
def test_the_compress_cli_fixes_the_mmap_threshold_unless_told_not_to(monkeypatch, env, fixed):
    """``ecospa compress`` fixes glibc's mmap threshold (resident memory follows the live tensors:
    the 2.5x target of --steps 0) unless ECOSPA_FIXED_MMAP_THRESHOLD=0 (faster, higher peak)."""
    import ecospa.cli.compress as cli_compress
    from ecospa.cli import build_parser
    calls = []
    monkeypatch.setattr(cli_compress, "return_freed_memory", lambda: calls.append(1) or True)
    monkeypatch.setattr(cli_compress, "compress", lambda job: {"job": job})
    monkeypatch.setattr(cli_compress, "table", lambda summary: "")
    if env is None:
        monkeypatch.delenv("ECOSPA_FIXED_MMAP_THRESHOLD", raising=False)
    else:
        monkeypatch.setenv("ECOSPA_FIXED_MMAP_THRESHOLD", env)
    args = build_parser()[0].parse_args(["compress", "--model", "x", "--budget", "0.5"])
    cli_compress.run(args)
    assert calls == ([1] if fixed else [])
