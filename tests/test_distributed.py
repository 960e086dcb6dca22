"""Data-parallel training under torchrun (2 gloo processes on 127.0.0.1) against one process."""
from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import subprocess
import sys
import textwrap
import time

import optree
import pytest
import torch

import ecospa.cli
from ecospa.io import checkpoint, data
from ecospa.train import runtime as distributed
from ecospa.func import llama
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train
from tolerances import close

MICRO = TrainConfig(
    model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
    batch_size=4, seq_len=16, steps=13, lr=1e-2, lr_warmup=2, eval_every=6, eval_batches=2,
    log_every=3, prune=PruneSchedule(warmup_steps=3, window=3, rounds=2, every=4, sparsity=0.5))

# Runs on every rank under torchrun: argv = (config pickle, output dir, mode).
WORKER = textwrap.dedent("""
    import dataclasses, os, pickle, sys, time
    import torch
    from ecospa.train import loop as train_mod, runtime as distributed
    from ecospa.train import train

    cfg, out, mode = pickle.load(open(sys.argv[1], "rb")), sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    par = distributed.init_from_env("cpu", timeout_s=float(sys.argv[4]))
    if mode in ("fail", "hang"):  # rank 1's 3rd loss call raises or hangs; rank 0 waits for it
        real, calls = train_mod.lm_loss, {"n": 0}
        def poisoned(forward, model_cfg):
            fn = real(forward, model_cfg)
            def loss(params, batch):
                calls["n"] += 1
                if rank == 1 and calls["n"] == 3:
                    if mode == "hang":
                        time.sleep(3600)
                    raise RuntimeError("injected failure on rank 1")
                return fn(params, batch)
            return loss
        train_mod.lm_loss = poisoned
        train(dataclasses.replace(cfg, out=out + "/fail"), parallel=par)
        sys.exit(0)
    seen, reduce, rows, shard = [], par.reduce_scores, [], par.shard
    par.reduce_scores = lambda scores: seen.append(scores) or reduce(scores)
    par.shard = lambda batch: rows.append(shard(batch)) or rows[-1]
    full = train(dataclasses.replace(cfg, out=out + "/full"), parallel=par)
    part = train(dataclasses.replace(cfg, out=out + "/part"), until=9, parallel=par)
    resumed = train(dataclasses.replace(cfg, out=out + "/from1"), resume=True, parallel=par)
    keys = ("losses", "params", "rounds", "val_ppl")
    torch.save({"full": {k: full[k] for k in keys}, "part": part["losses"],
                "from1": resumed["losses"], "scores": seen, "first_rows": rows[0]},
               f"{out}/rank{rank}.pt")
    par.close()
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(tmp_path, mode: str, timeout: float = 240, pg_timeout: float = 30) -> subprocess.CompletedProcess:
    """Two processes on this host, static rendezvous on 127.0.0.1 and a free port."""
    (tmp_path / "worker.py").write_text(WORKER)
    (tmp_path / "cfg.pkl").write_bytes(pickle.dumps(MICRO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(tmp_path / "worker.py"), str(tmp_path / "cfg.pkl"), str(tmp_path), mode,
           str(pg_timeout)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def leaves(tree):
    return optree.tree_leaves(tree, namespace="")


def shapes(tree):
    return [tuple(x.shape) for x in leaves(tree)]


@pytest.mark.slow
def test_two_processes_match_one_through_pruning_and_resume(tmp_path):
    single = train(dataclasses.replace(MICRO, out=str(tmp_path / "single")))
    train(dataclasses.replace(MICRO, out=str(tmp_path / "from1")), until=5)  # resumed by 2 ranks
    proc = torchrun(tmp_path, "run")
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # The same losses as one process with the same global batch, through both pruning rounds.
    assert r0["full"]["rounds"] == single["rounds"] and len(single["rounds"]) == 2
    expect = torch.tensor(single["losses"])
    close(torch.tensor(r0["full"]["losses"]), expect)
    assert r0["full"]["losses"] == r1["full"]["losses"]  # the reported loss is the global mean
    # Each rank trained on its own half of the global batch (no overlap, nothing left out).
    global_batch = data.batch_at(data.ByteTokenizer().encode(data.corpus(MICRO.data, "train")), 0,
                                 MICRO.batch_size, MICRO.seq_len, MICRO.seed)
    assert r0["first_rows"].shape[0] == MICRO.batch_size // 2
    assert torch.equal(torch.cat([r0["first_rows"], r1["first_rows"]]), global_batch)
    close(torch.tensor(r0["full"]["val_ppl"]), torch.tensor(single["val_ppl"]))
    # The ranks scored the units identically before the all-reduce, and end with one tree.
    # 2 rounds (full) + 1 (part, stopped at 9) + 2 (from1, resumed at 5)
    assert len(r0["scores"]) == 5 and r0["scores"][0].keys() == r1["scores"][0].keys()
    for a, b in zip(r0["scores"], r1["scores"]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert shapes(r0["full"]["params"]) == shapes(r1["full"]["params"]) == shapes(single["params"])
    assert all(torch.equal(a, b) for a, b in zip(leaves(r0["full"]["params"]), leaves(r1["full"]["params"])))
    for a, b in zip(leaves(r0["full"]["params"]), leaves(single["params"])):
        close(a, b)

    # Resume with another number of processes: 2 -> 1 and 1 -> 2.
    rest = train(dataclasses.replace(MICRO, out=str(tmp_path / "part")), resume=True)
    close(torch.tensor(r0["part"] + rest["losses"]), expect)
    close(torch.tensor(single["losses"][:5] + r0["from1"]), expect)


@pytest.mark.slow
def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    t0 = time.monotonic()
    proc = torchrun(tmp_path, "fail", timeout=180)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank 1 of 2 failed in the training step: RuntimeError: injected failure on rank 1" in proc.stderr
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after a rank failed"


@pytest.mark.slow
def test_a_hanging_rank_ends_the_job_after_the_timeout(tmp_path):
    t0 = time.monotonic()
    proc = torchrun(tmp_path, "hang", timeout=180, pg_timeout=5)
    elapsed = time.monotonic() - t0
    assert proc.returncode != 0
    assert "rank 0 of 2 failed in the training step" in proc.stderr
    assert "timed out" in proc.stderr.lower() or "timeout" in proc.stderr.lower()
    assert elapsed < 120, f"the job took {elapsed:.0f} s to end after a rank hung"


@pytest.mark.slow
def test_cli_under_torchrun_then_resume_in_one_process(tmp_path, capsys):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
            "127.0.0.1", "--master_port", str(free_port()), "-m", "ecospa", "train", "--steps", "8",
            "--batch-size", "4", "--eval-every", "4", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(base + ["--until", "5"], capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("data-parallel over 2 processes (global batch 4)") == 1  # rank 0 only
    assert checkpoint.load_full(out / "checkpoint").step == 5
    assert ecospa.cli.main(base[base.index("train"):] + ["--resume"]) == 0  # one process goes on
    assert checkpoint.load_full(out / "checkpoint").step == 8
    assert "validation perplexity" in capsys.readouterr().out

    bad = list(base)
    bad[bad.index("--batch-size") + 1] = "3"  # on 2 processes
    proc = subprocess.run(bad, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode != 0
    assert "global batch size 3 is not divisible by the 2 processes" in proc.stderr


def test_shards_are_disjoint_rows_of_the_global_batch():
    batch = torch.arange(24).reshape(6, 4)
    parts = [distributed.shard_rows(batch, r, 3) for r in range(3)]
    assert all(p.shape == (2, 4) for p in parts)
    assert torch.equal(torch.cat(parts), batch)
    with pytest.raises(ValueError, match="not divisible by the 4 processes.*multiple of 4"):
        distributed.shard_rows(batch, 0, 4)
    with pytest.raises(ValueError, match="rank"):
        distributed.shard_rows(batch, 3, 3)


def test_tree_module_round_trips_the_tree():
    params = llama.init(MICRO.model, seed=0)
    before = optree.tree_map(torch.clone, params, namespace="")
    m = distributed.TreeModule(params, lambda p, b: p["embed"].sum())
    assert all(torch.equal(a, b) for a, b in zip(leaves(m.tree()), leaves(params)))
    assert "layers/0/inv_freq" in dict(m.named_buffers())  # rotary frequencies are not trained
    assert "layers/0/inv_freq" not in m.weights and "layers/0/wq" in m.weights
    shifted = optree.tree_map(lambda x: x + 1, params, namespace="")
    m.load(shifted)
    assert all(torch.equal(a, b) for a, b in zip(leaves(m.tree()), leaves(shifted)))
    assert all(torch.equal(a, b) for a, b in zip(leaves(params), leaves(before)))  # input kept


def test_one_process_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.init_from_env("cpu") is distributed.LOCAL
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="torchrun"):
        distributed.init_from_env("cpu")
