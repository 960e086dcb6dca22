"""The FLOP counter (ecospa.train.flops) against hand counts, dense and after a pruning round,
and the cumulative count ``train`` records."""
from __future__ import annotations

import dataclasses
import json

from ecospa.func import gpt2, llama
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train
from ecospa.train.flops import forward_flops, train_step_flops

# V=256 (the byte tokenizer), D=8, 2 layers, 2 query heads sharing 1 KV head, head_dim 4 (2 rotary pairs), ffn 6, tied.
LLAMA = llama.Config(vocab_size=256, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=6, max_seq_len=8)
B, T = 2, 5
DENSE, PRUNED = 172_800, 147_840  # one training step, dense / after the 50% round below


def hand_llama(pairs: int, v_dim: int, ffn: int) -> int:
    """Training-step FLOPs of LLAMA with every layer keeping ``pairs`` rotary pairs per head,
    ``v_dim`` value dims per KV head and ``ffn`` hidden units, counted by hand."""
    D, V, heads, L = 8, 256, 2, 2
    qk = 2 * pairs                                  # q/k dim per head
    wq = D * heads * qk                             # [D, Hkv=1, G=2, 2, pairs]
    wk = D * 1 * qk                                 # [D, Hkv=1, 2, pairs]
    wv = D * 1 * v_dim                              # [D, Hkv=1, Dv]
    wo = heads * v_dim * D                          # [Hkv=1, G=2, Dv, D]
    mlp = 3 * D * ffn                               # gate, up, down
    per_token = 2 * (L * (wq + wk + wv + wo + mlp) + V * D)  # layers + tied head
    attention = L * B * (2 * T * T * heads * qk + 2 * T * T * heads * v_dim)  # scores + probs @ v
    return 3 * (B * T * per_token + attention)


def test_hand_count_dense_llama():
    params = llama.init(LLAMA, 0)
    assert hand_llama(2, 4, 6) == DENSE  # written out: 3 * (2*5*2*(2*336 + 256*8) + 2*2*800)
    assert train_step_flops(params, "llama", B, T) == DENSE
    assert forward_flops(params, "llama", B, T) == DENSE // 3


def test_hand_count_gpt2_untied_shapes():
    cfg = gpt2.Config(vocab_size=16, dim=8, n_layers=2, n_heads=2, ffn_dim=12, max_seq_len=8)
    # per layer: wq wk wv wo 4 * 8*8 + w_in w_out 2 * 8*12 = 448; head (tied wte) 16*8;
    # attention 2*25*(2*4) * 2 per sequence and layer
    expect = 3 * (B * T * 2 * (2 * 448 + 128) + 2 * B * 2 * 25 * 16)
    assert train_step_flops(gpt2.init(cfg, 0), "gpt2", B, T) == expect == 71_040


def test_train_counts_dense_steps_then_pruned_steps(tmp_path):
    # one round of 50% per group before step 3: pairs 2 -> 1, value dims 4 -> 2, ffn 6 -> 3
    cfg = TrainConfig(model=LLAMA, batch_size=B, seq_len=T, steps=6, lr_warmup=1, eval_every=6,
                      eval_batches=1, log_every=1, ckpt_every=0, out=str(tmp_path / "run"),
                      prune=PruneSchedule(warmup_steps=1, window=2, rounds=1, sparsity=0.5))
    assert cfg.prune.rounds_at() == [(3, 0.5)]
    r = train(cfg, progress=False)
    layer = r["params"]["layers"][0]
    assert layer["wq"].shape[-1] == 1 and layer["wv"].shape[-1] == 2 and layer["w_up"].shape[-1] == 3
    pruned = hand_llama(1, 2, 3)
    assert pruned == PRUNED and train_step_flops(r["params"], "llama", B, T) == pruned
    assert r["train_flops"] == 3 * DENSE + 3 * pruned
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    cumulative = [m["train_flops"] for m in lines if "step" in m and "loss" in m]
    assert cumulative == [DENSE * min(s, 3) + pruned * max(0, s - 3) for s in range(1, 7)]


def test_resume_continues_the_count(tmp_path):
    cfg = TrainConfig(model=LLAMA, batch_size=B, seq_len=T, steps=6, lr_warmup=1, eval_every=2,
                      eval_batches=1, log_every=1, out=str(tmp_path / "run"),
                      prune=PruneSchedule(warmup_steps=1, window=2, rounds=1, sparsity=0.5))
    train(cfg, until=4, progress=False)
    r = train(dataclasses.replace(cfg), resume=True, progress=False)
    assert r["train_flops"] == 3 * DENSE + 3 * hand_llama(1, 2, 3)
