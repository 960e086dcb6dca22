"""The rotary-table cache of eager forwards: reused only for the same unmodified tensor, length
and dtype; never under torch.func transforms; results equal to rebuilding the tables."""
from __future__ import annotations

import torch

from ecospa.func import _layers, llama
from tolerances import close

CFG = llama.Config(vocab_size=31, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24)


def test_cache_hits_only_the_same_unmodified_tensor():
    inv = llama.inv_freq(CFG).expand(2, 2).clone()
    a = _layers.rope_tables(inv, 7, torch.float32)
    assert _layers.rope_tables(inv, 7, torch.float32) is a  # hit
    assert _layers.rope_tables(inv, 8, torch.float32)[0].shape[1] == 8  # other length
    assert _layers.rope_tables(inv, 7, torch.float64)[0].dtype == torch.float64  # other dtype
    other = inv.clone()
    assert _layers.rope_tables(other, 7, torch.float32) is not a  # equal values, other tensor
    inv.mul_(2.0)  # in place: the version counter moves on
    b = _layers.rope_tables(inv, 7, torch.float32)
    assert b is not a
    for got, want in zip(b, _layers._rope_tables(inv, 7, torch.float32)):
        close(got, want)


def test_forward_with_cache_equals_forward_without_and_grad_is_unaffected(monkeypatch):
    params = llama.init(CFG, seed=0)
    x = torch.randint(0, CFG.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cached = [llama.forward(params, x, CFG) for _ in range(2)]
    monkeypatch.setattr(_layers, "_cacheable", lambda t: False)
    with torch.no_grad():
        plain = llama.forward(params, x, CFG)
    close(cached[0], plain), close(cached[1], plain)
    monkeypatch.undo()
    n = len(_layers._ROPE_CACHE)

    def loss(p):
        return llama.forward(p, x, CFG).square().mean()
    torch.func.grad(loss)(params)  # inv_freq is a functorch wrapper here: no caching
    assert len(_layers._ROPE_CACHE) == n
