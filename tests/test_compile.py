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


@pytest.mark.parametrize("model,cfg", CASES, ids=["llama", "gpt2"])
def test_regionally_compiled_forward_equals_eager_with_one_graph_for_all_layers(model, cfg):
    """``compiled_forward`` compiles the layer function once (dynamic shapes): pruned layers of
    different widths share its graph; the logits equal the eager forward's."""
    import dataclasses

    from torch._dynamo.utils import counters

    from ecospa.func.decode import compiled_forward
    torch._dynamo.reset()
    counters.clear()
    cfg = dataclasses.replace(cfg, n_layers=3, dim=32, **({"head_dim": 8} if model is llama else {}))
    params = model.init(cfg, seed=0)
    groups = model.coupled_groups(cfg)
    small = ecospa.pruner(groups, budget=0.3)(params, random_scores(params, groups, 1))
    widths = {k: {p[k].shape for p in small["layers"]} for k in small["layers"][0]}
    assert sum(len(w) > 1 for w in widths.values()) >= 2  # the layers' pruned widths differ
    # dynamo specializes widths 0 and 1: none here, so one graph can serve every layer
    assert all(n > 1 for w in widths.values() for s in w for n in s), widths
    fwd = compiled_forward(cfg, backend="eager")
    x = tokens(cfg, 0, batch=2, length=9)
    close(fwd(small, x, cfg), model.forward(small, x, cfg))
    close(fwd(params, x, cfg), model.forward(params, x, cfg))
    assert counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])
