"""Boundaries (issue 24): the lm-eval adapter with more context than its window; ``compact`` of a
padded/masked tree whose heads keep DIFFERENT numbers of dims; the ``labels=`` loss of the
exported remote-code model; a resume whose checkpoint falls exactly on a pruning round's step."""
from __future__ import annotations

import dataclasses

import optree
import pytest
import torch

import ecospa
from ecospa.func import gpt2, llama
from ecospa.func.padding import compact
from ecospa.io.data import ByteTokenizer
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train
from ecospa.train import loop as train_mod
from strategies import random_scores
from tolerances import EXACT, HF, close


class _Req:
    def __init__(self, *args):
        self.args = args


# --- the lm-eval adapter past its window ---------------------------------------------------------

LM_CFG = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=32, init_std=0.3)


def _lm(max_length=16, cfg=LM_CFG, module=llama):
    pytest.importorskip("lm_eval")
    from ecospa.jobs.harness import EcospaLM
    return EcospaLM(loaded=(cfg, module.init(cfg, seed=0), ByteTokenizer()), max_length=max_length, batch_size=3)


def test_loglikelihood_past_the_window_keeps_the_continuation_and_the_last_context(monkeypatch):
    """A 40-token context with max_length 16: the continuation is scored on the LAST 13 context
    tokens (16 inputs predict 16 tokens, the last 3 the continuation), in the same batch as a short
    request (right padding must not leak). The model never sees more than 16 tokens. Kills a
    truncation from the right (dropping the continuation) or one that keeps max_length + 1 inputs."""
    lm = _lm(16)
    seen = []
    real = lm.forward
    lm.forward = lambda p, x, c: seen.append(x.shape[1]) or real(p, x, c)
    ctx, cont = "".join(chr(97 + i % 26) for i in range(40)), "xyz"
    (got, _), (short, _) = lm.loglikelihood([_Req(ctx, cont), _Req("ab", "c")])
    assert max(seen) <= 16
    ids = ByteTokenizer().encode(ctx + cont)[-17:]
    logp = torch.log_softmax(llama.forward(lm.params, ids[None, :-1], LM_CFG)[0].float(), -1)
    want = logp[-3:].gather(-1, ids[-3:, None]).sum()
    close(torch.tensor(got), want)
    full = ByteTokenizer().encode(ctx + cont)  # the whole context (past the window) gives another number
    logp_full = torch.log_softmax(llama.forward(lm.params, full[None, :-1], LM_CFG)[0].float(), -1)
    assert abs(float(logp_full[-3:].gather(-1, full[-3:, None]).sum()) - got) > 1e-4
    ids = ByteTokenizer().encode("abc")
    logp = torch.log_softmax(llama.forward(lm.params, ids[None, :-1], LM_CFG)[0].float(), -1)
    close(torch.tensor(short), logp[-1, ids[-1]])


@pytest.mark.parametrize("max_gen_toks", [8, 15, 16, 20])
def test_generate_until_keeps_prompt_and_generation_inside_the_window(monkeypatch, max_gen_toks):
    """A 40-token context, max_length 16: the prompt is the context's last max(1, 16 - N) tokens
    and prompt + generation fit in 16. Before: N >= max_length sliced ``ids[-0:]`` (the whole
    context) or ``ids[4:]``, and the request failed with 'max_new_tokens ... got -8'."""
    import ecospa.jobs.harness as harness
    lm = _lm(16)
    seen = []
    real = harness.generate
    monkeypatch.setattr(harness, "generate", lambda p, c, prompt, n, t: seen.append((prompt, n))
                        or real(p, c, prompt, n, t))
    ctx = "".join(chr(97 + i % 26) for i in range(40))
    (text,) = lm.generate_until([_Req(ctx, {"max_gen_toks": max_gen_toks})])
    (prompt, n), = seen
    keep = max(1, 16 - max_gen_toks)
    assert prompt[0].tolist() == ByteTokenizer().encode(ctx)[-keep:].tolist()
    assert prompt.shape[1] + n <= 16 and n == min(max_gen_toks, 16 - keep)
    assert isinstance(text, str)


def test_max_length_past_the_models_window_is_refused():
    """--max-length 100 on a model of 32 positions: a clear error when the adapter is built, not
    GPT-2's position lookup failing on the first long request, nor LLaMA silently running past
    the positions it was trained on."""
    for module, cfg in ((llama, LM_CFG), (gpt2, gpt2.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2,
                                                             ffn_dim=16, max_seq_len=32))):
        with pytest.raises(ValueError, match="max_length 100.*32"):
            _lm(100, cfg, module)
    assert _lm(32).max_length == 32


# --- compact with heads that keep different numbers of dims --------------------------------------

def _zero(x: torch.Tensor, index: tuple) -> torch.Tensor:
    x = x.clone()
    x[index] = 0
    return x


def test_compact_llama_heads_with_different_widths_computes_the_same_logits():
    """KV head 0 keeps V dim {6} and rotary pairs {1, 2} (pair 3 dead in wq/bq only); head 1 keeps
    V dims {0, 3, 5} and pairs {0, 1} (pair 3 dead in wq only, pair 2 on both sides); 5 of 12 MLP
    neurons are dead: zero in w_gate and w_up, in w_down, or in w_gate only (silu(0) * up = 0: one
    factor of the product is enough). compact keeps per head the widest head's count (3 V dims, 2 pairs), the logits
    equal the padded tree's. Kills a width taken from head 0 only (1 V dim for head 1's 3), or a
    pair kept unless dead on BOTH sides (``a | b``: 3 pairs)."""
    cfg = llama.Config(vocab_size=32, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=12,
                       attention_bias=True, init_std=0.4)
    params = llama.init(cfg, seed=3, dtype=torch.float64)
    p = dict(params["layers"][0])
    for h, dead_v, dead_q, dead_k in ((0, [0, 1, 2, 3, 4, 5, 7], [0, 3], [0]), (1, [1, 2, 4, 6, 7], [2, 3], [2])):
        p["wv"] = _zero(p["wv"], (slice(None), h, dead_v))
        p["bv"] = _zero(p["bv"], (h, dead_v))
        p["wo"] = _zero(p["wo"], (h, slice(None), dead_v))
        p["wq"] = _zero(p["wq"], (slice(None), h, slice(None), slice(None), dead_q))
        p["bq"] = _zero(p["bq"], (h, slice(None), slice(None), dead_q))
        p["wk"] = _zero(p["wk"], (slice(None), h, slice(None), dead_k))
        p["bk"] = _zero(p["bk"], (h, slice(None), dead_k))
    for keys, j in ((("w_gate", "w_up"), 0), (("w_down",), 5), (("w_gate", "w_up"), 9), (("w_down",), 11),
                    (("w_gate",), 4)):  # 4: zero in w_gate only, w_up alive: still dead
        for key in keys:
            p[key] = _zero(p[key], (j,) if key == "w_down" else (slice(None), j))
    padded = {**params, "layers": (p,)}
    small = compact(padded, cfg)
    q = small["layers"][0]
    assert q["wv"].shape[2] == q["wo"].shape[2] == 3 and q["wk"].shape[3] == 2 and q["inv_freq"].shape == (2, 2)
    assert q["w_down"].shape[0] == 7
    x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    close(llama.forward(small, x, cfg), llama.forward(padded, x, cfg), EXACT)


def test_compact_gpt2_heads_with_different_widths_computes_the_same_logits():
    """GPT-2: head 0 keeps 3 of 4 V dims, head 1 one; head 0 keeps 1 Q/K dim, head 1 three."""
    cfg = gpt2.Config(vocab_size=32, dim=8, n_layers=1, n_heads=2, ffn_dim=10, max_seq_len=16, init_std=0.4)
    params = gpt2.init(cfg, seed=1, dtype=torch.float64)
    p = dict(params["layers"][0])
    for h, dead_v, dead_qk in ((0, [2], [0, 1, 3]), (1, [0, 1, 3], [2])):
        for k in ("wv", "wq", "wk"):
            dead = dead_v if k == "wv" else dead_qk
            p[k] = _zero(p[k], (slice(None), h, dead))
            p["b" + k[1]] = _zero(p["b" + k[1]], (h, dead))
        p["wo"] = _zero(p["wo"], (h, dead_v))
    padded = {**params, "layers": (p,)}
    small = compact(padded, cfg)
    q = small["layers"][0]
    assert q["wv"].shape[2] == q["wo"].shape[1] == 3 and q["wq"].shape[2] == q["wk"].shape[2] == 3
    x = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    close(gpt2.forward(small, x, cfg), gpt2.forward(padded, x, cfg), EXACT)


# --- labels= loss of the hf-compact export -------------------------------------------------------

@pytest.mark.slow  # about 10 s: importing transformers and loading the remote code
def test_remote_code_labels_loss_is_the_shifted_cross_entropy_without_ignored_positions(tmp_path):
    """``model(x, labels=y).loss`` = mean over t with y[t+1] != -100 of -log p(y[t+1] | x[:t+1]),
    from ecospa's own logits of the pruned tree. Kills an unshifted loss, a shift the wrong way,
    a sum instead of the mean, or the ignored positions counted."""
    transformers = pytest.importorskip("transformers")
    from ecospa.jobs.export import export
    cfg = llama.Config(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, init_std=0.2)
    params, groups = llama.init(cfg, seed=5, dtype=torch.float64), llama.coupled_groups(cfg)
    small = ecospa.pruner(groups, budget=0.4)(params, random_scores(params, groups, 5))
    path = export(small, cfg, tmp_path / "compact", "hf-compact")["path"]
    model = transformers.AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True,
                                                              torch_dtype=torch.float64).eval()
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    y = x.clone()
    y[0, :4] = -100  # a masked prompt
    y[1, 7] = -100
    with torch.no_grad():
        loss = model(input_ids=x, labels=y).loss
    logp = torch.log_softmax(llama.forward(small, x, cfg), -1)[:, :-1]  # position t predicts t + 1
    target = y[:, 1:]
    valid = target != -100
    want = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0][valid].sum() / valid.sum()
    close(loss, want.to(loss.dtype), HF)


# --- resume exactly on a pruning round's step ----------------------------------------------------

ROUND = TrainConfig(model=llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24),
                    batch_size=2, seq_len=8, steps=9, lr=1e-2, lr_warmup=2, eval_every=9, eval_batches=1,
                    log_every=3, prune=PruneSchedule(warmup_steps=1, window=2, rounds=2, every=3, budget=0.4))


def _leaves(tree):
    return optree.tree_leaves(tree, namespace="")


@pytest.mark.slow  # two short training runs and a resume: 5-9 s
@pytest.mark.parametrize("stop", ["until", "ckpt_every"])
def test_resume_from_a_checkpoint_on_a_pruning_rounds_step_is_exact(tmp_path, monkeypatch, stop):
    """Rounds run before steps 3 and 6. A run stopped with its checkpoint at step 6 exactly (by
    --until 6, or killed after the periodic checkpoint at 6) and resumed must prune at 6 with the
    saved importance and end with the uninterrupted run's params, moments and kept units, bit for
    bit. Kills a resume that skips the round at its first step (``s > start``), re-initializes
    the importance, or saves the importance after the round was applied."""
    assert [s for s, _ in ROUND.prune.rounds_at()] == [3, 6]
    full = train(dataclasses.replace(ROUND, out=str(tmp_path / "full")), progress=False)
    cfg = dataclasses.replace(ROUND, out=str(tmp_path / "part"))
    if stop == "until":
        first = train(cfg, until=6, progress=False)
    else:  # the periodic checkpoint at 6, then the process dies (before the round at 6 runs)
        cfg = dataclasses.replace(cfg, ckpt_every=3)
        real = train_mod._prune_round

        def die_at_6(params, opt_state, groups, scores, target, *a):
            if len(train_mod_rounds) == 1:
                raise KeyboardInterrupt
            train_mod_rounds.append(target)
            return real(params, opt_state, groups, scores, target, *a)

        train_mod_rounds = []
        monkeypatch.setattr(train_mod, "_prune_round", die_at_6)
        with pytest.raises(KeyboardInterrupt):
            train(cfg, progress=False)
        monkeypatch.undo()
        first = None
    from ecospa.io import checkpoint
    assert checkpoint.load_full(tmp_path / "part" / "checkpoint").step == 6
    second = train(cfg, resume=True, progress=False)
    if first is not None:
        assert len(first["rounds"]) == 1 and first["losses"] + second["losses"] == full["losses"]
    assert [r[0] for r in second["rounds"]] == [3, 6] and second["rounds"] == full["rounds"]
    for a, b in zip(_leaves((second["params"], second["opt_state"])), _leaves((full["params"], full["opt_state"]))):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b
    assert second["val_ppl"] == full["val_ppl"]
