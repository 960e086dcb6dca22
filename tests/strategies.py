"""Hypothesis strategies: draw model STRUCTURE and seeds, never tensor values. Sizes are bounded."""
from __future__ import annotations

import torch
from hypothesis import strategies as st

from ecospa.func import gpt2, llama


@st.composite
def llama_configs(draw):
    n_kv = draw(st.integers(1, 3))
    group = draw(st.integers(1, 3))  # query heads per KV head: 1 = MHA, n_kv = 1 = MQA
    pairs = draw(st.integers(1, 3))  # rotary pairs per head
    return llama.Config(vocab_size=11, dim=draw(st.integers(2, 10)), n_layers=draw(st.integers(1, 2)),
                        n_heads=n_kv * group, n_kv_heads=n_kv, head_dim=2 * pairs,
                        ffn_dim=draw(st.integers(1, 7)), tie_embeddings=draw(st.booleans()),
                        attention_bias=draw(st.booleans()), rope_theta=draw(st.sampled_from([10.0, 1e4])),
                        init_std=0.3)


@st.composite
def gpt2_configs(draw):
    heads = draw(st.integers(1, 3))
    return gpt2.Config(vocab_size=11, dim=heads * draw(st.integers(1, 3)), n_layers=draw(st.integers(1, 2)),
                       n_heads=heads, ffn_dim=draw(st.integers(1, 7)), max_seq_len=8, init_std=0.3)


@st.composite
def models(draw):
    """(module, cfg) for either family."""
    if draw(st.booleans()):
        return llama, draw(llama_configs())
    return gpt2, draw(gpt2_configs())


seeds = st.integers(0, 2**16)

# A target: a fraction per group (including 0 and values that keep a single unit) or a budget.
fractions = st.one_of(st.just(0.0), st.just(0.99), st.floats(0.0, 0.95))
targets = st.one_of(
    st.builds(lambda s: {"sparsity": s}, fractions),
    st.builds(lambda q, v, m: {"sparsity": {"qk": q, "vo": v, "mlp": m}}, fractions, fractions, fractions),
    st.builds(lambda b: {"budget": b}, st.floats(0.0, 0.6)),
)


def random_scores(params, groups, seed: int) -> dict:
    """Scores from a seed (ties are likely with few units, which tests tie handling too)."""
    gen = torch.Generator().manual_seed(seed)
    return {g.name: torch.randint(0, 5, g.sizes(params), generator=gen).double() for g in groups}


def tokens(cfg, seed: int, batch: int = 2, length: int = 5) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.vocab_size, (batch, length), generator=gen)
