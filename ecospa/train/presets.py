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

PRESETS = {
    "tiny": TINY,
    "gpt2-tiny": dataclasses.replace(TINY, model=gpt2.Config(vocab_size=256, dim=128, n_layers=4,
                                                              n_heads=4, ffn_dim=512, max_seq_len=128)),
    "llama-60m": _galore(512, 8, 8, 1376, 10_000, 1e-3),
    "llama-130m": _galore(768, 12, 12, 2048, 20_000, 1e-3),
    "llama-350m": _galore(1024, 24, 16, 2736, 60_000, 1e-3),
    "llama-1b": _galore(2048, 24, 32, 5461, 100_000, 5e-4),
    "gpt2-small": _gpt2(768, 12, 12, 100_000, 6e-4),
    "gpt2-medium": _gpt2(1024, 24, 16, 100_000, 3e-4),
}


def get(name: str) -> TrainConfig:
    """The preset called ``name``; ValueError listing the choices otherwise."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


__all__ = ["PRESETS", "TINY", "get"]
