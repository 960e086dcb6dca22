"""``ecospa train`` and ``ecospa eval`` score the same params on the same windows with the same
loss: the validation perplexity a run reports equals ``ecospa eval`` on its checkpoint."""
from __future__ import annotations

import dataclasses
import math
import re

from ecospa import cli
from ecospa.func import llama
from ecospa.io import data
from ecospa.io.load import load_model
from ecospa.jobs.evaluate import nll
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train

CFG = TrainConfig(
    model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48),
    batch_size=4, seq_len=16, steps=8, lr=1e-2, lr_warmup=2, eval_every=8, eval_batches=3,
    log_every=4, prune=PruneSchedule(warmup_steps=2, window=2, rounds=1, every=2, sparsity=0.5))


def test_train_and_eval_report_the_same_perplexity(tmp_path, capsys):
    cfg = dataclasses.replace(CFG, out=str(tmp_path / "run"))
    result = train(cfg, progress=False)
    windows = cfg.eval_batches * cfg.batch_size
    # the library: the same windows, loss and mean as the run's validation
    model_cfg, params, tok = load_model(cfg.out)
    ids = tok.encode(data.corpus(cfg.data, "val"))
    got = nll(llama.forward, params, model_cfg, ids, cfg.seq_len, cfg.batch_size, windows)
    assert math.exp(got["nll"]) == result["val_ppl"]
    # the command line
    capsys.readouterr()
    assert cli.main(["eval", "--model", cfg.out, "--seq-len", str(cfg.seq_len), "--batch-size",
                     str(cfg.batch_size), "--max-windows", str(windows)]) == 0
    printed = float(re.search(r"perplexity ([0-9.]+)", capsys.readouterr().out).group(1))
    assert printed == round(result["val_ppl"], 3)
