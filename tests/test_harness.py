"""lm-eval adapter: rolling log-likelihood equals ecospa's own perplexity on the same text; a
local multiple-choice task (written here, offline) runs end to end through lm-eval."""
from __future__ import annotations

import math

import pytest
from _helpers import write_mc_task
import torch

pytest.importorskip("lm_eval")

from ecospa.io.data import ByteTokenizer  # noqa: E402
from ecospa.jobs.evaluate import nll  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.jobs.harness import EcospaLM  # noqa: E402

CFG = llama.Config(vocab_size=256, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40,
                   init_std=0.2, max_seq_len=64)


class _Req:
    def __init__(self, *args):
        self.args = args


def _lm(max_length=16):
    return EcospaLM(loaded=(CFG, llama.init(CFG, seed=0), ByteTokenizer()), max_length=max_length,
                    batch_size=3)


def test_rolling_loglikelihood_equals_ecospa_perplexity():
    lm = _lm(16)
    text = "The quick brown fox jumps over the lazy dog; " * 3  # 135 bytes
    text = text[:16 * 8 + 1]  # exactly 8 windows of 16 predictions
    ids = ByteTokenizer().encode(text)
    want = nll(llama.forward, lm.params, CFG, ids, seq_len=16, batch_size=2)
    got = lm.loglikelihood_rolling([_Req(text)])[0]
    assert want["tokens"] == 128
    assert math.isclose(-got / 128, want["nll"], rel_tol=1e-5)
    longer = lm.loglikelihood_rolling([_Req(text + "tail")])[0]  # the tail is scored too
    assert longer < got


def test_loglikelihood_matches_a_direct_computation_and_greedy_flag():
    lm = _lm(32)
    ctx, cont = "def main(", "):"
    ids = ByteTokenizer().encode(ctx + cont)
    with torch.no_grad():
        logp = torch.log_softmax(llama.forward(lm.params, ids[None, :-1], CFG)[0], -1)
    want = float(logp[-2:].gather(-1, ids[-2:, None]).sum())
    (got, greedy), = lm.loglikelihood([_Req(ctx, cont)])
    assert math.isclose(got, want, rel_tol=1e-5)
    best = chr(int(logp[len(ctx) - 1].argmax()))
    (_, is_greedy), = lm.loglikelihood([_Req(ctx, best)])
    assert is_greedy and greedy == (cont[0] == best and chr(int(logp[-1].argmax())) == cont[1])


def test_generate_until_stops_at_the_stop_string():
    lm = _lm(32)
    free = lm.generate_until([_Req("abc", {"max_gen_toks": 12})])[0]
    assert len(free) <= 12  # at most one character per byte token
    if len(free) > 3:
        stop = free[2]
        cut = lm.generate_until([_Req("abc", {"max_gen_toks": 12, "until": [stop]})])[0]
        assert cut == free[:free.index(stop)]


@pytest.mark.slow
def test_local_multiple_choice_task_end_to_end(tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager
    rows = [{"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1), "x"], "label": 0}
            for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
    write_mc_task(tmp_path, "ecospa_toy_mc", rows)
    lm = _lm(32)
    res = lm_eval.simple_evaluate(model=lm, tasks=["ecospa_toy_mc"],
                                  task_manager=TaskManager(include_path=str(tmp_path)))
    acc = res["results"]["ecospa_toy_mc"]["acc,none"]
    # the same accuracy computed here: the choice with the highest log-likelihood (lm-eval
    # joins question and choice with a space)
    hits = 0
    for r in rows:
        scores = [ll for ll, _ in lm.loglikelihood([_Req(r["question"], " " + c) for c in r["choices"]])]
        hits += int(max(range(3), key=lambda i: scores[i]) == r["label"])
    assert acc == pytest.approx(hits / len(rows))
