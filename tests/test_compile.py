"""torch.compile(forward, fullgraph=True) on pruned trees equals eager (a graph break fails)."""
from __future__ import annotations

import pytest
import torch

import ecospa
from ecospa.func import gpt2, llama
from strategies import random_scores, tokens
from tolerances import close

CASES = [
    (llama, llama.Config(vocab_size=31, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                         attention_bias=True)),
    (gpt2, gpt2.Config(vocab_size=31, dim=16, n_layers=2, n_heads=2, ffn_dim=24, max_seq_len=16)),
]


@pytest.mark.slow
@pytest.mark.parametrize("model,cfg", CASES, ids=["llama", "gpt2"])
def test_compiled_forward_equals_eager_on_pruned_trees(model, cfg):
    torch._dynamo.reset()
    params = model.init(cfg, seed=0)
    groups = model.coupled_groups(cfg)
    compiled = torch.compile(model.forward, fullgraph=True)
    x = tokens(cfg, 0, batch=2, length=9)
    for seed, target in [(1, dict(sparsity=0.5)), (2, dict(budget=0.4))]:
        small = ecospa.pruner(groups, **target)(params, random_scores(params, groups, seed))
        close(compiled(small, x, cfg), model.forward(small, x, cfg))
