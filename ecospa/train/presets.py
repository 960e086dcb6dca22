"""Named training configurations: a CPU demo ("tiny", "gpt2-tiny") and the published protocols.

The published ones are configs only (they need a GPU and the C4 / WikiText-103 data):
- LLaMA 60M/130M/350M/1B on C4 with the GaLore recipe: T5 tokenizer (vocab 32000), sequence 256,
  batch 512 sequences (131K tokens), AdamW, 10% linear warm-up then cosine to 10%, no dropout.
  Reference dense C4 validation perplexities: 34.06 / 25.08 / 18.80 / 15.56 (PAPER §2).
- GPT-2 small/medium on WikiText-103 (GPT-2 BPE, vocab 50257, context 1024).
The batch sizes below are per optimizer step; use gradient accumulation where memory is short.
"""
from __future__ import annotations

import dataclasses

from ecospa.func import gpt2, llama
from ecospa.schedule import PruneSchedule
from ecospa.train.config import TrainConfig


def _galore(dim, layers, heads, ffn, steps, lr) -> TrainConfig:
    model = llama.Config(vocab_size=32000, dim=dim, n_layers=layers, n_heads=heads, ffn_dim=ffn,
                         max_seq_len=256, tie_embeddings=False)
    warm = steps // 10
    return TrainConfig(model=model, data="c4", tokenizer="t5-base", batch_size=512, seq_len=256,
                       steps=steps, lr=lr, lr_warmup=warm, eval_every=1000, eval_batches=40,
                       ckpt_every=1000, dtype="bfloat16", device="cuda",
                       prune=PruneSchedule(warmup_steps=warm, window=200, rounds=3,
                                           every=max(200, steps // 20), sparsity=0.5))


def _gpt2(dim, layers, heads, steps, lr) -> TrainConfig:
    model = gpt2.Config(vocab_size=50257, dim=dim, n_layers=layers, n_heads=heads, max_seq_len=1024)
    return TrainConfig(model=model, data="wikitext103", tokenizer="gpt2", batch_size=512, seq_len=1024,
                       steps=steps, lr=lr, lr_warmup=steps // 20, eval_every=1000, eval_batches=40,
                       ckpt_every=1000, dtype="bfloat16", device="cuda",
                       prune=PruneSchedule(warmup_steps=steps // 20, window=200, rounds=3,
                                           every=steps // 20, sparsity=0.5))


# "tiny": byte-level LLaMA on the embedded pydoc text; measured on 2 shared CPU cores (see README).
TINY = TrainConfig(
    model=llama.Config(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                       max_seq_len=128),
    data="pydoc", tokenizer="byte", batch_size=16, seq_len=128, steps=600, lr=3e-3, lr_warmup=30,
    eval_every=100, eval_batches=8, log_every=10,
    prune=PruneSchedule(warmup_steps=100, window=20, rounds=3, every=80, ramp="cubic", sparsity=0.5))

# "small": the CPU regime of issue 14 on the embedded stdlib source (~28 MB of train bytes, 3.7M
# tokens per run: no epoch repeats). Measured (benchmarks/results/pretrain_search.json): at lr 3e-3
# it is NOT capacity-bound within 900 steps (a dense model with half the block parameters is 2-10%
# better at every evaluated step); at lr 1e-3 the full model is better than the half-size one by
# 2.5% at 900 steps and by 3.7% at 1800 steps (this preset: capacity-bound, one dense run ~13 min
# on one core). The pruning rounds run at 1/3, 1/2 and 2/3 of the steps (measured better than
# early rounds at 900 steps: benchmarks/results/pretrain.json, lever "late").
SMALL = TrainConfig(
    model=llama.Config(vocab_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=384,
                       max_seq_len=128),
    data="stdlib", tokenizer="byte", batch_size=16, seq_len=128, steps=1800, lr=1e-3, lr_warmup=30,
    eval_every=100, eval_batches=16, log_every=20,
    prune=PruneSchedule(warmup_steps=560, window=40, rounds=3, every=300, ramp="cubic", budget=0.5))

PRESETS = {
    "tiny": TINY,
    "small": SMALL,
    "gpt2-tiny": dataclasses.replace(TINY, model=gpt2.Config(vocab_size=256, dim=128, n_layers=4,
                                                              n_heads=4, ffn_dim=512, max_seq_len=128)),
    "llama-60m": _galore(512, 8, 8, 1376, 10_000, 1e-3),
    "llama-130m": _galore(768, 12, 12, 2048, 20_000, 1e-3),
    "llama-350m": _galore(1024, 24, 16, 2736, 60_000, 1e-3),
    "llama-1b": _galore(2048, 24, 32, 5461, 100_000, 5e-4),
    "gpt2-small": _gpt2(768, 12, 12, 100_000, 6e-4),
    "gpt2-medium": _gpt2(1024, 24, 16, 100_000, 3e-4),
}


PUBLISHED = ("llama-60m", "llama-130m", "llama-350m", "llama-1b", "gpt2-small", "gpt2-medium")


def shrink(cfg: TrainConfig, steps: int = 12, dim: int = 32, n_layers: int = 2, batch_size: int = 2,
           seq_len: int = 16, data: str = "pydoc") -> TrainConfig:
    """The same pipeline at toy size, for CPU smoke tests of the published presets.

    Changes only sizes and the data: the model's width/depth (heads: the most that divide ``dim`` with head_dim >= 8,
    ffn scaled with the width, vocab 256 for the byte tokenizer), batch, sequence, steps (every
    step count of the LR and pruning schedules scaled by the same factor, >= 1), ``data`` with the
    byte tokenizer in place of C4/WikiText, CPU float32, evaluation once at the end. The optimizer,
    LR shape, estimator, number of rounds, ramp and target are the preset's.
    """
    f = steps / cfg.steps
    scale = lambda n, least=1: max(least, round(n * f))  # noqa: E731
    m = cfg.model
    heads = max(h for h in range(1, min(m.n_heads, dim // 8) + 1) if dim % h == 0 and (dim // h) % 2 == 0)
    changes = dict(dim=dim, n_layers=n_layers, n_heads=heads, head_dim=dim // heads,
                   ffn_dim=max(2, round(m.ffn_dim * dim / m.dim)), vocab_size=256, max_seq_len=seq_len)
    if getattr(m, "n_kv_heads", None) is not None:
        changes["n_kv_heads"] = max(k for k in range(1, heads + 1) if heads % k == 0 and k <= m.n_kv_heads)
    p = cfg.prune
    window = scale(p.window)
    prune = dataclasses.replace(p, warmup_steps=scale(p.warmup_steps, 0), window=window,
                                every=None if p.every is None else max(window, scale(p.every)))
    return dataclasses.replace(cfg, model=dataclasses.replace(m, **changes), data=data, tokenizer="byte",
                               batch_size=batch_size, seq_len=seq_len, steps=steps,
                               lr_warmup=min(steps, scale(cfg.lr_warmup, 0)), eval_every=steps,
                               eval_batches=1, log_every=1, ckpt_every=0, dtype="float32", device="cpu",
                               prune=prune)


def get(name: str) -> TrainConfig:
    """The preset called ``name``; ValueError listing the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["PRESETS", "PUBLISHED", "SMALL", "TINY", "get", "shrink"]
