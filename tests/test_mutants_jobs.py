"""Tests that kill mutants of the jobs (issue 24, profile ``jobs`` of tools/mutation.sh):
``ecospa.jobs.compress`` on a tiny in-memory model (a byte tokenizer, no file to load, well
under a second a job), ``compress_job``, ``export``, ``generate`` and ``harness``.

Numbers are compared with what is computed here from the model itself (perplexities, parameter
counts, the batches each stage may read), at non-default option values."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  (torch.func imports it on first use, ~3 s: at collection instead, so
import torch.nn.functional as F  # mutmut's forked test runs, one a mutant, start with it imported)

import ecospa.jobs.compress as job_mod
from _helpers import spy_stages
from ecospa.errors import UsageError
from ecospa.func import llama
from ecospa.io import checkpoint
from ecospa.io.data import ByteTokenizer, batch_at, corpus
from ecospa.jobs.compress import EXTRA_CHARS, Job, RecoveryDiverged, compress

CFG = llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, init_std=0.3)
SMALL = dict(batch_size=2, seq_len=16, calib_batches=2, recon_batches=2, eval_seq_len=16, eval_windows=2,
             progress=False)


def _loaded(seed=3):
    return CFG, llama.init(CFG, seed=seed), ByteTokenizer()


def _ppl(params, ids, T, n):
    """exp(mean next-token cross-entropy) over the first n non-overlapping windows of T + 1 tokens."""
    w = torch.stack([ids[i * T:i * T + T + 1] for i in range(n)])
    with torch.no_grad():
        logits = llama.forward(params, w[:, :-1], CFG)
    return math.exp(float(F.cross_entropy(logits.flatten(0, 1).double(), w[:, 1:].flatten())))


def _n_params(tree) -> int:
    return sum(x.numel() for x in torch.utils._pytree.tree_leaves(tree) if torch.is_tensor(x))


def _bytes(ids):
    return np.ascontiguousarray(ids.numpy().astype(np.int32)).tobytes()


def _in(row, stream: bytes) -> bool:
    needle, start = _bytes(row), 0
    while (at := stream.find(needle, start)) >= 0:
        if at % 4 == 0:
            return True
        start = at + 1
    return False


# ---- compress: which data feeds which stage ---------------------------------------------------

def _spied_job():
    """One two-round job with every stage on (obs ranking, refit, distilled recovery, a curve, an
    extra held-out source), what each stage consumed, and its summary."""
    mp = pytest.MonkeyPatch()
    seen = spy_stages(mp.setattr, job_mod)
    cfg, dense, tok = _loaded()
    before = torch.utils._pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, dense)
    job = Job("tiny", budget=0.4, rounds=2, rank_by="obs", reconstruct=True, distill=True, distill_weight=0.3,
              steps=4, eval_at=(1, 4), seed=5, **SMALL)
    try:
        summary = compress(job, loaded=(cfg, dense, tok))
    finally:
        mp.undo()
    return job, seen, summary, dense, before


def test_every_stage_reads_its_own_train_windows_and_every_number_val():
    """One test (mutmut maps a mutant to the tests that run it; a module fixture would run in the
    first test only): what each stage read, then the summary's numbers."""
    job, seen, summary, dense, before = _spied_job()
    tok = ByteTokenizer()
    train_ids = tok.encode(corpus("pydoc", "train"))
    train, val = _bytes(train_ids), tok.encode(corpus("pydoc", "val"))
    stdlib = tok.encode(corpus("stdlib", "val", max_chars=EXTRA_CHARS))
    # two rounds of 2 calibration and 2 refit batches, read by the obs scores and the refit alike;
    # 4 recovery steps in two rounds of 2
    assert [len(seen[k]) for k in ("fisher", "obs", "refit")] == [2, 2, 2]
    assert all(len(b) == 2 for k in ("fisher", "obs", "refit") for b in seen[k])
    assert len(seen["recover"]) == 4
    for stage in ("fisher", "obs", "refit"):
        for batches in seen[stage]:
            for b in batches:
                assert b.shape == (2, 17) and all(_in(row, train) for row in b), stage
    for b in seen["recover"]:
        assert b.shape == (2, 17) and all(_in(row, train) for row in b)
    # the refit's batches are the obs scores' ones, other windows than the calibration's, new each round
    for r in range(2):
        assert all(torch.equal(a, b) for a, b in zip(seen["obs"][r], seen["refit"][r]))
        assert not any(torch.equal(a, b) for a in seen["fisher"][r] for b in seen["refit"][r])
    assert not any(torch.equal(a, b) for a in seen["fisher"][0] for b in seen["fisher"][1])
    assert not any(torch.equal(a, b) for a in seen["refit"][0] for b in seen["refit"][1])
    # each round's recovery draws its own windows (another seed per round)
    assert not any(torch.equal(a, b) for a in seen["recover"][:2] for b in seen["recover"][2:])
    assert summary["calibration_tokens"] == 2 * (2 + 2) * 2 * 17
    # every perplexity: the val split, or the leading tokens of the extra source's val split
    ev = dict(seq_len=16, batch_size=1, max_windows=2, progress=False)
    for ids, kw in seen["ppl"]:
        assert {k: kw[k] for k in ev} == ev and kw["loss_fn"] is not None  # layer-wise: chunked
        assert torch.equal(ids, val) or (33 <= ids.numel() < stdlib.numel() and torch.equal(ids, stdlib[:ids.numel()]))
    # val: dense, pruned and refit in each round, the curve's 2 points, round 1's recovered model
    # (its last step, 2, is not a curve point; round 2's is: reused); stdlib: dense and the curve
    assert sum(torch.equal(ids, val) for ids, _ in seen["ppl"]) == 1 + 2 * 2 + 2 + 1
    assert len(seen["ppl"]) == 8 + 1 + 2
    _check_the_summary(summary, dense, before)


def _check_the_summary(s, dense, before):
    """The summary's numbers are the models' own (computed here), and the teacher is untouched."""
    tok = ByteTokenizer()
    val, stdlib = tok.encode(corpus("pydoc", "val")), tok.encode(corpus("stdlib", "val", max_chars=EXTRA_CHARS))
    assert s["ppl_dense"] == pytest.approx(_ppl(dense, val, 16, 2), rel=1e-4)
    assert s["ppl_dense_extra"]["stdlib"] == pytest.approx(_ppl(dense, stdlib, 16, 2), rel=1e-4)
    # recovery never writes the teacher (the dense model the caller gave)
    flat = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b) for a, b in zip(flat(before), flat(dense)))
    assert [c["step"] for c in s["curve"]] == [1, 4] and [r["steps"] for r in s["rounds"]] == [2, 2]
    assert s["ppl_recovered"] == s["rounds"][1]["ppl_recovered"] == s["curve"][-1]["ppl"]
    assert s["ppl_extra"] == s["curve"][-1]["ppl_extra"] and set(s["ppl_extra"]) == {"stdlib"}
    assert s["ppl_pruned"] == s["rounds"][0]["ppl_pruned"]
    assert s["ppl_reconstructed"] == s["rounds"][0]["ppl_reconstructed"]
    assert s["ppl_reconstructed"] != s["ppl_pruned"] and s["rounds"][1]["ppl_pruned"] != s["ppl_pruned"]
    for r in s["rounds"]:
        assert math.isfinite(r["final_train_loss"]) and r["reconstruct_seconds"] > 0 and r["recover_seconds"] > 0
    assert s["job"]["budget"] == 0.4 and s["job"]["eval_at"] == (1, 4) and s["job"]["seed"] == 5
    assert s["latency_ratio"] > 0 and s["dense_bytes"] == 4 * _n_params(dense)
    assert s["model"] == "tiny"


def test_a_saved_job_reports_what_it_saved(tmp_path):
    """--out: the checkpoint holds the summary; its params are the ones the numbers describe."""
    cfg, dense, tok = _loaded(seed=4)
    before = torch.utils._pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, dense)
    out = tmp_path / "c"
    s = compress(Job("tiny", out=str(out), sparsity={"mlp": 0.5, "vo": 0.25}, rank_by="estimator",
                     reconstruct=False, steps=2, eval_extra=(), seed=2, **SMALL), loaded=(cfg, dense, tok))
    flat = torch.utils._pytree.tree_leaves  # one round, distilled: its recovery never writes the teacher
    assert all(torch.equal(a, b) for a, b in zip(flat(before), flat(dense)))
    params, _, extra = checkpoint.load(str(out))
    assert extra["summary"]["ppl_recovered"] == s["ppl_recovered"] and extra["tokenizer"] == "tiny"
    val = tok.encode(corpus("pydoc", "val"))
    assert s["ppl_recovered"] == pytest.approx(_ppl(params, val, 16, 2), rel=1e-4)
    assert s["ppl_extra"] == {} and s["curve"] == [] and s["ppl_reconstructed"] is None
    assert s["calibration_tokens"] == 2 * 2 * 17  # no refit and no obs scores: no refit batches
    layer, dlayer = params["layers"][0], dense["layers"][0]
    assert layer["w_up"].shape[1] == 12 and layer["wv"].shape[-1] == 3 and layer["wk"].shape == dlayer["wk"].shape
    # the counts, by hand, per layer: MLP 24 -> 12 neurons of 3 x 16 weights; V/O 4 -> 3 dims in
    # each of 2 KV heads, 16 (wv) + 2 x 16 (wo, 2 query heads) weights a dim; Q/K 2 KV heads x 2
    # rotary pairs of 16 x 2 x 2 (wq) + 16 x 2 (wk) weights
    removed_per_layer = 12 * 3 * 16 + 2 * 1 * (16 + 2 * 16)
    assert s["dense_params"] == _n_params(dense) and s["kept_params"] == _n_params(params)
    assert s["dense_params"] - s["kept_params"] == 2 * removed_per_layer
    group_dense = 2 * (24 * 3 * 16 + 2 * 4 * (16 + 2 * 16) + 2 * 2 * (16 * 2 * 2 + 16 * 2))
    assert s["group_params"] == group_dense
    assert s["group_fraction_removed"] == pytest.approx(2 * removed_per_layer / group_dense)
    assert s["block_params"] == _n_params(dense["layers"])
    assert s["block_fraction_removed"] == pytest.approx(2 * removed_per_layer / _n_params(dense["layers"]))
    assert [r["steps"] for r in s["rounds"]] == [2] and s["rounds"][0]["final_train_loss"] > 0


# ---- generate: end of sequence, seeds, option edges --------------------------------------------

GCFG = llama.Config(vocab_size=256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, init_std=0.3,
                    max_seq_len=12)


def _greedy(params, prompt, n):
    from ecospa.jobs.generate import greedy_reference
    return greedy_reference(llama.forward, params, GCFG, prompt, n)


def test_generation_stops_each_row_at_eos_and_the_job_when_all_rows_did():
    """Row 0 reaches ``eos_id`` at its 2nd new token and holds it; row 1 never produces it and runs
    to max_new_tokens (its tokens are the reference's); with one row, generation ends at eos."""
    from ecospa.jobs.generate import generate
    params = llama.init(GCFG, seed=0)
    for seed in range(50):
        prompt = torch.randint(0, 256, (2, 3), generator=torch.Generator().manual_seed(seed))
        ref = _greedy(params, prompt, 5)
        eos = int(ref[0, 4])
        if eos not in ref[0, 3:4].tolist() and eos not in ref[1, 3:].tolist():
            break
    else:
        pytest.fail("no prompt with a usable eos token")
    out = generate(params, GCFG, prompt, 5, eos_id=eos)
    want = ref.clone()
    want[0, 5:] = eos
    assert torch.equal(out, want)
    one = generate(params, GCFG, prompt[:1], 5, eos_id=eos)
    assert torch.equal(one, ref[:1, :5])  # stopped at the eos: no token after it
    assert torch.equal(generate(params, GCFG, prompt, 5), ref)  # no eos_id: never stops early


def test_sampled_generation_depends_on_its_seed_only():
    from ecospa.jobs import generate as gen
    params = llama.init(GCFG, seed=0)
    prompt = torch.tensor([[5, 80, 17]])
    a = gen.generate(params, GCFG, prompt, 8, temperature=1.5, top_k=50, seed=7)
    torch.manual_seed(123)  # the global generator plays no part
    torch.rand(5)
    assert torch.equal(gen.generate(params, GCFG, prompt, 8, temperature=1.5, top_k=50, seed=7), a)
    assert not torch.equal(gen.generate(params, GCFG, prompt, 8, temperature=1.5, top_k=50, seed=8), a)
    assert torch.equal(gen.generate(params, GCFG, prompt, 8, temperature=1.5, top_k=50),
                       gen.generate(params, GCFG, prompt, 8, temperature=1.5, top_k=50, seed=0))
    # top_k=1 samples the greedy token at any temperature
    assert torch.equal(gen.generate(params, GCFG, prompt, 6, temperature=3.0, top_k=1, seed=1),
                       _greedy(params, prompt, 6))


def test_sample_defaults_to_greedy_and_keeps_top_k_of_one_row():
    from ecospa.jobs.generate import sample
    logits = torch.tensor([[0.0, 3.0, 2.9, 1.0, 2.8, -1.0]])
    close = torch.tensor([[0.0, 0.1]]).repeat(64, 1)  # sampled, about half the rows would draw 0
    assert sample(close).tolist() == [1] * 64
    g = torch.Generator().manual_seed(0)
    drawn = {int(sample(logits, 50.0, 3, g)) for _ in range(200)}  # nearly uniform over the top 3
    assert drawn == {1, 2, 4}


def test_generation_option_edges_and_messages():
    from ecospa.jobs.generate import generate
    params = llama.init(GCFG, seed=0)
    prompt = torch.tensor([[5, 80, 17]])
    assert generate(params, GCFG, prompt, 0) is prompt
    assert torch.equal(generate(params, GCFG, prompt[:, :1], 2), _greedy(params, prompt[:, :1], 2))
    assert generate(params, GCFG, prompt, 9).shape == (1, 12)  # exactly max_seq_len
    with pytest.raises(UsageError) as e:
        generate(params, GCFG, prompt, 10)
    assert str(e.value) == ("prompt (3 tokens) + max_new_tokens (10) = 13 exceeds the model's max_seq_len 12: "
                            "shorten the prompt or ask for fewer tokens")
    with pytest.raises(UsageError) as e:
        generate(params, GCFG, prompt[0], 2)
    assert str(e.value) == "prompt must be [batch, tokens] with at least one token, got (3,)"
    with pytest.raises(UsageError, match=r"seed must be a whole number in \[0, 2\*\*63 - 1\], got -1"):
        generate(params, GCFG, prompt, 2, temperature=1.0, seed=-1)
    from ecospa.jobs.generate import check_options
    check_options(0, 0.0, 1)  # no token, top-1: allowed
    with pytest.raises(UsageError, match="top_k must be >= 1, got 0"):
        check_options(1, 1.0, 0)


def test_on_ready_runs_once_after_the_prefill_and_the_first_step(monkeypatch):
    from ecospa.jobs import generate as gen
    params = llama.init(GCFG, seed=0)
    events = []
    gen.generate(params, GCFG, torch.tensor([[5, 80]]), 4, on_token=lambda t: events.append("token"),
                 on_ready=lambda: events.append("ready"))
    assert events == ["token", "ready", "token", "token", "token"]
    events.clear()
    gen.generate(params, GCFG, torch.tensor([[5, 80]]), 1, on_token=lambda t: events.append("token"),
                 on_ready=lambda: events.append("ready"))
    assert events == ["token"]  # a single token needs no step after the prefill
    # compile=True decodes with the compiled layer function of this config
    seen = []
    monkeypatch.setattr(gen, "compiled_decoder", lambda cfg: seen.append(cfg) or gen.decode)
    out = gen.generate(params, GCFG, torch.tensor([[5, 80]]), 3, compile=True)
    assert seen == [GCFG] and torch.equal(out, _greedy(params, torch.tensor([[5, 80]]), 3))


# ---- harness: the lm-eval adapter's edges ------------------------------------------------------

HCFG = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=128, init_std=0.3)


class _Req:
    def __init__(self, *args):
        self.args = args


def _hlm(max_length=16, cfg=HCFG):
    pytest.importorskip("lm_eval")
    from ecospa.jobs.harness import EcospaLM
    return EcospaLM(loaded=(cfg, llama.init(cfg, seed=0), ByteTokenizer()), max_length=max_length, batch_size=3)


def _logp(params, ids):
    """log p(ids[i] | ids[:i]) for i >= 1, computed on the whole sequence at once."""
    with torch.no_grad():
        lp = torch.log_softmax(llama.forward(params, ids[None, :-1], HCFG)[0].double(), -1)
    return lp.gather(-1, ids[1:, None])[:, 0]


def test_adapter_construction_messages_and_the_default_window(tmp_path):
    pytest.importorskip("lm_eval")
    from ecospa.jobs.harness import EcospaLM
    with pytest.raises(ValueError) as e:
        EcospaLM()
    assert str(e.value) == "give model=SPEC (registry name, .gguf, HF directory or ecospa checkpoint)"
    with pytest.raises(ValueError) as e:
        EcospaLM(loaded=(HCFG, llama.init(HCFG, seed=0), None))
    assert str(e.value) == "this model has no tokenizer; lm-eval needs text in and out"
    params = llama.init(HCFG, seed=1)
    checkpoint.save(tmp_path / "ck", params, HCFG)  # a model spec: loaded from it
    lm = EcospaLM(model=str(tmp_path / "ck"), max_length=16)
    assert torch.equal(lm.params["embed"], params["embed"]) and lm.max_length == 16
    assert _hlm(None).max_length == 128 and _hlm(128).max_length == 128  # the model's window
    long = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=2, ffn_dim=16, max_seq_len=4096)
    assert _hlm(None, long).max_length == 2048  # capped
    with pytest.raises(UsageError) as e:
        _hlm(129)
    assert str(e.value) == ("max_length 129 exceeds the model's window of 128 positions (max_seq_len); "
                            "use --max-length 128 or less")


def test_loglikelihood_without_context_and_past_the_window_equals_a_hand_sum():
    lm = _hlm(8)
    tok = ByteTokenizer()
    # no context: the first continuation token conditions the rest; one token: scored on itself
    (a, _), (b, _), (c, _) = lm.loglikelihood([_Req("", "abc"), _Req("", "a"), _Req("xyzw" * 4, "pqrstuvwxyzab")])
    assert a == pytest.approx(float(_logp(lm.params, tok.encode("abc")).sum()), abs=1e-4)
    assert b == pytest.approx(float(_logp(lm.params, tok.encode("aa")).sum()), abs=1e-4)
    # a continuation longer than the window: all 8 predictions of the last 9 tokens are scored
    ids = tok.encode("xyzw" * 4 + "pqrstuvwxyzab")[-9:]
    assert c == pytest.approx(float(_logp(lm.params, ids).sum()), abs=1e-4)
    with pytest.raises(ValueError) as e:
        lm.loglikelihood([_Req("0123456789" * 5, "")])
    assert str(e.value) == f"empty continuation for context {('0123456789' * 5)[-40:]!r}"


def test_requests_of_different_lengths_in_one_batch_score_as_alone():
    """Right padding: a short request batched with longer ones gets its own sum and greedy flag."""
    lm = _hlm(32)
    tok = ByteTokenizer()
    for ctx in ("def f", "abc", "xyz", "12", "hello", "q", "import os", "the"):
        with torch.no_grad():
            nxt = int(llama.forward(lm.params, tok.encode(ctx)[None], HCFG)[0, -1].argmax())
        if nxt < 128:  # one byte: its own token
            break
    best = chr(nxt)
    alone = lm.loglikelihood([_Req(ctx, best)])
    batched = lm.loglikelihood([_Req(ctx, best), _Req("a much longer context here", " and its continuation")])
    assert alone[0][1] is True and batched[0][1] is True
    assert batched[0][0] == pytest.approx(alone[0][0], abs=1e-5)
    # rolling: windows of 8 predictions, the last one shorter; 8 + 2 tokens -> windows of 9 and 2
    lm8 = _hlm(8)
    for text in ("abcdefghij", "abcdefghijklmnopq", "a"):
        ids = tok.encode(text)
        want = sum(float(_logp(lm8.params, ids[s:s + 9]).sum()) for s in range(0, len(ids) - 1, 8))
        (got,) = lm8.loglikelihood_rolling([_Req(text)])
        assert got == pytest.approx(want, abs=1e-4), text
    assert lm8.loglikelihood_rolling([_Req("a")]) == [0.0]


def test_generate_until_takes_its_prompt_and_length_from_the_request():
    lm = _hlm(128)
    tok = ByteTokenizer()

    def direct(prompt_ids, n):
        from ecospa.jobs.generate import generate
        out = generate(lm.params, HCFG, torch.tensor([prompt_ids]), n)
        return tok.decode(out[0, len(prompt_ids):].tolist())

    ctx = "0123456789"
    ids = tok.encode(ctx).tolist()
    free = direct(ids, 64)  # lm-eval's default of 64 new tokens
    assert lm.generate_until([_Req(ctx, {})]) == [free]
    assert lm.generate_until([_Req(ctx, {"until": "§§"})]) == [free]  # a stop string absent from the text
    absent = free[3] + "§§"  # its first character is in the text, the string is not: no cut
    assert absent not in free and lm.generate_until([_Req(ctx, {"until": absent})]) == [free]
    stop = free[len(free) // 2]
    cut = free[:free.index(stop)]
    assert lm.generate_until([_Req(ctx, {"until": stop})]) == [cut]  # one string, not its characters
    assert lm.generate_until([_Req(ctx, {"until": [stop]})]) == [cut]
    # sampling only with do_sample; its temperature defaults to 0 (greedy)
    assert lm.generate_until([_Req(ctx, {"temperature": 1.0})]) == [free]
    assert lm.generate_until([_Req(ctx, {"do_sample": True})]) == [free]
    # an empty context starts from token 0; a long one keeps its last max_length - N tokens
    assert lm.generate_until([_Req("", {"max_gen_toks": 5})]) == [direct([0], 5)]
    lm16 = _hlm(16)
    long_ctx = "abcdefghijklmnopqrstuvwxyz0123"  # 30 tokens, window 16: 6 new tokens, the last 10 of the context
    with torch.no_grad():
        want = tok.decode(generate_ids(lm16, tok.encode(long_ctx).tolist()[-10:], 6))
    assert lm16.generate_until([_Req(long_ctx, {"max_gen_toks": 6})]) == [want]
    # asking for more than the window holds: one context token and window - 1 new ones
    assert lm16.generate_until([_Req(long_ctx, {"max_gen_toks": 40})]) == \
        [tok.decode(generate_ids(lm16, tok.encode(long_ctx).tolist()[-1:], 15))]


def generate_ids(lm, prompt_ids, n):
    from ecospa.jobs.generate import generate
    return generate(lm.params, lm.cfg, torch.tensor([prompt_ids]), n)[0, len(prompt_ids):].tolist()


# ---- compress_job: every value and path is checked before anything is loaded -------------------

BAD_JOBS = [
    ({}, "give exactly one target: --budget F (fraction of the coupled groups' parameters removed) or --sparsity (e.g. 'qk=0.25,vo=0.25,mlp=0.5')"),
    ({'budget': 0.5, 'sparsity': 0.5}, "give exactly one target: --budget F (fraction of the coupled groups' parameters removed) or --sparsity (e.g. 'qk=0.25,vo=0.25,mlp=0.5')"),
    ({'budget': 0.0}, '--budget must be a number in (0, 1), got 0.0'),
    ({'budget': 1.0}, '--budget must be a number in (0, 1), got 1.0'),
    ({'sparsity': {'a=b': 0.1}}, "--sparsity names unknown group kinds ['a=b']"),
    ({'sparsity': {1: 0.1}}, '--sparsity names unknown group kinds [1]'),
    ({'sparsity': {'a,b': 0.1}}, "--sparsity names unknown group kinds ['a,b']"),
    ({'sparsity': {'attn': 0.1}}, "--sparsity names unknown group kinds ['attn']; use qk, vo, mlp"),
    ({'sparsity': 1.5}, '--sparsity fraction must be a number in [0, 1), got 1.5'),
    ({'sparsity': {'mlp': -0.1}}, '--sparsity fraction must be a number in [0, 1), got -0.1'),
    ({'sparsity': 'mlp=2'}, '--sparsity mlp must be a number in [0, 1), got 2.0'),
    ({'budget': 0.5, 'estimator': 'nope'}, "--estimator 'nope' is unknown; use one of ['fisher', 'magnitude', 'norm_product', 'random', 'taylor', 'uncoupled']"),
    ({'budget': 0.5, 'rounds': 0}, '--rounds must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'batch_size': 1.5}, '--batch-size must be a whole number >= 1, got 1.5'),
    ({'budget': 0.5, 'seq_len': 0}, '--seq-len must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'calib_batches': 0}, '--calib-batches must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'eval_seq_len': 0}, '--eval-seq-len must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'eval_batch_size': 0}, '--eval-batch-size must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'micro_batch': 0}, '--micro-batch must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'micro_batch': 1.5}, '--micro-batch must be a whole number >= 1, got 1.5'),
    ({'budget': 0.5, 'eval_windows': 0}, '--eval-windows must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'eval_windows': 2.5}, '--eval-windows must be a whole number >= 1, got 2.5'),
    ({'budget': 0.5, 'steps': -1}, '--steps must be a whole number >= 0, got -1'),
    ({'budget': 0.5, 'steps': 2.5}, '--steps must be a whole number >= 0, got 2.5'),
    ({'budget': 0.5, 'steps': 5, 'rounds': 2}, '--steps 5 does not split into --rounds 2 equal recovery phases; give a multiple of 2 (e.g. --steps 4 or 6) or --steps 0'),
    ({'budget': 0.5, 'steps': 1, 'rounds': 2}, '--steps 1 does not split into --rounds 2 equal recovery phases; give a multiple of 2 (e.g. --steps 2 or 4) or --steps 0'),
    ({'budget': 0.5, 'steps': 7, 'rounds': 3}, '--steps 7 does not split into --rounds 3 equal recovery phases; give a multiple of 3 (e.g. --steps 6 or 9) or --steps 0'),
    ({'budget': 0.5, 'steps': 4, 'eval_at': (5,)}, '--eval-at takes recovery steps in [1, 4] (the steps --steps 4 runs in --rounds 1), got [5]'),
    ({'budget': 0.5, 'steps': 4, 'eval_at': (0,)}, '--eval-at takes recovery steps in [1, 4] (the steps --steps 4 runs in --rounds 1), got [0]'),
    ({'budget': 0.5, 'steps': 4, 'eval_at': (1.5,)}, '--eval-at takes recovery steps in [1, 4] (the steps --steps 4 runs in --rounds 1), got [1.5]'),
    ({'budget': 0.5, 'seed': -1}, '--seed must be a whole number >= 0, got -1'),
    ({'budget': 0.5, 'seed': 1.5}, '--seed must be a whole number >= 0, got 1.5'),
    ({'budget': 0.5, 'lr': 0}, '--lr must be a finite number > 0, e.g. 2e-4; got 0'),
    ({'budget': 0.5, 'lr': float("inf")}, '--lr must be a finite number > 0, e.g. 2e-4; got inf'),
    ({'budget': 0.5, 'lr': float("nan")}, '--lr must be a finite number > 0, e.g. 2e-4; got nan'),
    ({'budget': 0.5, 'lr': True}, '--lr must be a finite number > 0, e.g. 2e-4; got True'),
    ({'budget': 0.5, 'lr': '1'}, "--lr must be a finite number > 0, e.g. 2e-4; got '1'"),
    ({'budget': 0.5, 'distill_weight': -0.1}, '--distill-weight must lie in [0, 1], got -0.1'),
    ({'budget': 0.5, 'distill_weight': 1.1}, '--distill-weight must lie in [0, 1], got 1.1'),
    ({'budget': 0.5, 'distill_weight': float("nan")}, '--distill-weight must lie in [0, 1], got nan'),
    ({'budget': 0.5, 'distill_weight': True}, '--distill-weight must lie in [0, 1], got True'),
    ({'budget': 0.5, 'multiple_of': 0}, '--multiple-of: multiple_of must be a whole number >= 1 (units per block are kept in multiples of it), got 0'),
    ({'budget': 0.5, 'allocation': 'nope'}, "--allocation must be one of global, zscore, protect, depth, got 'nope'"),
    ({'sparsity': 0.5, 'allocation': 'depth'}, '--allocation depth spreads a --budget; with --sparsity every group already has its fraction (drop --allocation or give --budget)'),
    ({'budget': 0.5, 'rank_by': 'x'}, "--rank-by must be one of estimator, obs, got 'x'"),
    ({'budget': 0.5, 'recon_target': 'x'}, "--recon-target must be one of residual, local, got 'x'"),
    ({'budget': 0.5, 'lr_schedule': 'x'}, "--lr-schedule must be one of constant, cosine, got 'x'"),
    ({'budget': 0.5, 'ridge': 0}, '--ridge must be a finite number > 0, e.g. 0.1; got 0'),
    ({'budget': 0.5, 'ridge': float("inf")}, '--ridge must be a finite number > 0, e.g. 0.1; got inf'),
    ({'budget': 0.5, 'ridge': float("nan")}, '--ridge must be a finite number > 0, e.g. 0.1; got nan'),
    ({'budget': 0.5, 'recon_batches': 0}, '--recon-batches must be a whole number >= 1, got 0'),
    ({'budget': 0.5, 'recon_batches': 1.5}, '--recon-batches must be a whole number >= 1, got 1.5'),
    ({'budget': 0.5, 'warmup': -1}, '--warmup must be a whole number in [0, --steps], got -1'),
    ({'budget': 0.5, 'steps': 4, 'warmup': 5}, '--warmup must be a whole number in [0, --steps], got 5'),
    ({'budget': 0.5, 'warmup': 1.5}, '--warmup must be a whole number in [0, --steps], got 1.5'),
    ({'budget': 0.5, 'eval_extra': ('',)}, "--eval-extra must name other text sources than --data 'pydoc', got ('',)"),
    ({'budget': 0.5, 'eval_extra': ('pydoc',)}, "--eval-extra must name other text sources than --data 'pydoc', got ('pydoc',)"),
    ({'budget': 0.5, 'eval_extra': 'pydoc'}, "--eval-extra must name other text sources than --data 'pydoc', got 'pydoc'"),
    ({'budget': 0.5, 'eval_extra': (1,)}, "--eval-extra must name other text sources than --data 'pydoc', got (1,)"),
    ({'budget': 0.5, 'ppl_dense': 0}, 'ppl_dense must be a number > 0, got 0'),
    ({'budget': 0.5, 'ppl_dense': True}, 'ppl_dense must be a number > 0, got True'),
    ({'budget': 0.5, 'ppl_dense': float("nan")}, 'ppl_dense must be a number > 0, got nan'),
    ({'budget': 0.5, 'export': 'x.bin', 'export_format': 'onnx'}, "--format must be one of hf-padded, hf-compact, gguf, gguf-compact, got 'onnx'"),
]


def test_every_bad_value_is_a_usage_error_with_its_whole_message():
    for kw, message in BAD_JOBS:
        with pytest.raises(UsageError) as e:
            Job("m", **kw)
        assert str(e.value) == message, kw


def test_the_edges_of_every_range_are_allowed_and_normalized():
    j = Job("m", budget=0.5, rounds=1, steps=0, micro_batch=None, eval_windows=None, seed=0, distill_weight=0.0,
            warmup=0, eval_extra=None)
    assert j.per_round == 0 and j.eval_at == () and j.eval_extra == ()
    j = Job("m", budget=0.5, distill_weight=1.0, steps=4, warmup=4, eval_at=(4, 1, 4), micro_batch=1, eval_windows=1,
            lr=1, ridge=1e-9, recon_batches=1, ppl_dense=1e-3)
    assert j.eval_at == (1, 4) and j.per_round == 4
    assert Job("m", budget=0.5, steps=6, rounds=3).per_round == 2 and Job("m", budget=0.5, steps=6).per_round == 6
    assert Job("m", budget=0.5, steps=0, warmup=3).warmup == 3  # no recovery: nothing to warm up
    assert Job("m", sparsity="mlp=0.5,qk=0").sparsity == {"mlp": 0.5, "qk": 0.0}
    assert Job("m", sparsity=0.0).sparsity == 0.0 and Job("m", sparsity={"vo": 0.25}).sparsity == {"vo": 0.25}
    assert Job("m", budget=0.5, eval_extra="stdlib").eval_extra == ("stdlib",)
    assert Job("m", budget=0.5, data="stdlib", eval_extra=("pydoc",)).eval_extra == ("pydoc",)
    assert Job("m", budget=0.5, allocation="depth").allocation == "depth"
    for name in ("rounds", "batch_size", "seq_len", "calib_batches", "eval_seq_len", "eval_batch_size"):
        Job("m", budget=0.5, **{name: 1})


def test_output_paths_are_checked_before_anything_is_touched(tmp_path):
    from ecospa.jobs.compress_job import check_out_dir
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights").write_text("w")
    with pytest.raises(UsageError) as e:
        Job("", budget=0.5)
    assert str(e.value) == "--model must name a model, got ''"
    for flag, kw, holder in (("--out", "out", model), ("--export-hf", "export_hf", tmp_path),
                             ("--export", "export", tmp_path)):
        with pytest.raises(UsageError) as e:
            Job(str(model), budget=0.5, **{kw: str(holder)})
        assert str(e.value) == (f"{flag} {str(holder)!r} is or holds the input model {str(model)!r}; "
                                "choose another directory")
    a, b = str(tmp_path / "a"), str(tmp_path / "a" / "hf")
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, out=a, export_hf=b)
    assert str(e.value) == f"--out {a!r} and --export-hf {b!r} overlap; give separate paths"
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, out=b, export_hf=a)
    assert str(e.value) == f"--out {b!r} and --export-hf {a!r} overlap; give separate paths"
    c = str(tmp_path / "c")
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, export_hf=c, export=c + ".gguf", export_format="gguf", out=c)
    assert "overlap" in str(e.value)
    Job("m", budget=0.5, out=str(tmp_path / "ab"), export_hf=a)  # a shared prefix is not an overlap
    Job(str(model), budget=0.5, out=str(tmp_path / "model2"))
    # a training run's directory and its checkpoint are never replaced
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(UsageError) as e:
        check_out_dir(str(run / "checkpoint"))
    assert str(e.value) == (f"--out {str(run / 'checkpoint')!r} is the checkpoint of the training run "
                            f"{str(run)!r}; compress never replaces it: choose another --out")
    with pytest.raises(UsageError) as e:
        check_out_dir(str(run), flag="--x")
    assert str(e.value) == f"--x {str(run)!r} is a training run's directory; choose another --out"
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError) as e:
        check_out_dir(str(tmp_path / "file"))
    assert str(e.value) == f"--out {str(tmp_path / 'file')!r} is a file; give a directory path for the checkpoint"
    busy = tmp_path / "busy"
    busy.mkdir()
    for name in ("d", "c", "b", "a"):
        (busy / name).write_text("")
    with pytest.raises(UsageError) as e:
        check_out_dir(str(busy))
    assert str(e.value) == (f"--out {str(busy)!r} is a non-empty directory that is not an ecospa checkpoint "
                            "(it holds ['a', 'b', 'c']); choose a new or empty one")
    ck = tmp_path / "ck"
    checkpoint.save(ck, llama.init(CFG, seed=0), CFG)
    with pytest.raises(UsageError) as e:
        check_out_dir(str(ck))
    assert str(e.value) == (f"--out {str(ck)!r} holds an earlier checkpoint; pass --overwrite to replace it, "
                            "or choose another --out")
    assert check_out_dir(str(ck), overwrite=True) == str(ck)
    (tmp_path / "empty").mkdir()
    assert check_out_dir(str(tmp_path / "empty")) == str(tmp_path / "empty")
    assert check_out_dir(str(tmp_path / "new")) == str(tmp_path / "new")
    (tmp_path / "other").mkdir()
    other = tmp_path / "other" / "checkpoint"  # named checkpoint, but no run files beside it
    assert check_out_dir(str(other)) == str(other)
    with pytest.raises(UsageError) as e:
        check_out_dir(str(tmp_path / "file" / "x"), flag="--y")
    assert str(e.value) == f"--y {str(tmp_path / 'file' / 'x')!r} is under {str(tmp_path / 'file')!r}, which is a file, not a directory"
    with pytest.raises(UsageError) as e:
        Job(str(model), budget=0.5, out="/")  # the root holds every model
    assert str(e.value) == f"--out '/' is or holds the input model {str(model)!r}; choose another directory"


# ---- compress: recovery, its divergence checks, the ramp, the teacher ---------------------------

def _recover_job(**kw):
    return Job("m", budget=0.5, micro_batch=None, batch_size=2, seq_len=4, progress=False, **kw)


def test_recover_steps_on_train_windows_and_stops_at_the_first_non_finite_loss():
    from ecospa.jobs.compress import recover
    ids = torch.arange(100)
    seen, nan_at = [], [2]

    def loss(params, batch):
        seen.append(batch)
        bad = float("nan") if len(seen) in nan_at else 0.0
        return ((params["w"] - batch.float().mean()) ** 2).sum() + bad

    steps_seen = []
    with pytest.raises(RecoveryDiverged) as e:
        recover(loss, {"w": torch.zeros(3)}, ids, _recover_job(lr=0.5), 3, 7, on_step=lambda i, p: steps_seen.append(i))
    assert str(e.value) == ("recovery diverged: the loss became nan at step 2 of 3 (--lr 0.5); nothing was saved. "
                            "Use a smaller --lr (default 2e-4)")
    assert steps_seen == [1]  # the diverged step reports nothing
    assert [b.tolist() for b in seen] == [batch_at(ids, s, 2, 4, 7).tolist() for s in range(2)]
    # finite losses: one per step, each the loss before that step's update; on_step after each
    seen.clear()
    nan_at.clear()
    steps_seen.clear()
    out, losses = recover(loss, {"w": torch.zeros(3)}, ids, _recover_job(lr=0.5), 2, 7,
                          on_step=lambda i, p: steps_seen.append((i, p["w"].clone())))
    b0 = batch_at(ids, 0, 2, 4, 7).float().mean()
    assert losses[0] == pytest.approx(3 * float(b0) ** 2, rel=1e-5) and len(losses) == 2
    assert [s[0] for s in steps_seen] == [1, 2] and torch.equal(steps_seen[-1][1], out["w"])
    assert not torch.equal(out["w"], torch.zeros(3))


def test_recover_checks_the_params_after_the_last_update_and_with_no_step():
    from ecospa.jobs.compress import check_finite, recover
    ids = torch.arange(100)

    def loss(params, batch):  # 0 at w = 0, with an infinite gradient: the update makes w NaN
        return params["w"].sqrt().sum()

    with pytest.raises(RecoveryDiverged) as e:
        recover(loss, {"w": torch.zeros(2)}, ids, _recover_job(), 1, 0)
    assert str(e.value) == ("recovery diverged: parameter w is not finite after 1 recovery steps with --lr 0.0002; "
                            "nothing was saved. Use a smaller --lr (default 2e-4)")
    p = {"a": {"b": [torch.ones(2), torch.tensor([1.0, float("inf")])]}, "n": torch.tensor([7])}
    with pytest.raises(RecoveryDiverged) as e:
        recover(loss, p, ids, _recover_job(), 0, 0)
    assert str(e.value) == ("recovery diverged: parameter a.b.1 is not finite after 0 recovery steps; "
                            "nothing was saved. Use a smaller --lr (default 2e-4)")
    same, losses = recover(loss, {"w": torch.ones(2)}, ids, _recover_job(), 0, 0)
    assert losses == [] and torch.equal(same["w"], torch.ones(2))
    check_finite({"i": torch.tensor([2**62]), "w": torch.ones(1)}, "x")  # integers are never "not finite"
    with pytest.raises(RecoveryDiverged, match="parameter w is not finite x;"):
        check_finite({"i": torch.ones(1), "w": torch.tensor([float("nan")])}, "x")


def test_a_per_group_sparsity_ramps_over_rounds_and_widths_stay_multiples(monkeypatch):
    """--sparsity mlp=0.5 in 2 rounds keeps 18 then 12 of 24 neurons (0.25 then 0.5 removed);
    --multiple-of 4 --budget 0.4 keeps multiples of 4 neurons in every layer."""
    widths = []
    real = job_mod.slice_units

    def spy(tree, groups, keep):
        widths.append({n: k.shape[1] for n, k in keep.items()})
        return real(tree, groups, keep)

    monkeypatch.setattr(job_mod, "slice_units", spy)
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    tiny = dict(steps=0, batch_size=2, seq_len=16, calib_batches=1, eval_seq_len=16, eval_windows=1,
                eval_extra=(), ppl_dense=1.0, progress=False, rank_by="estimator", reconstruct=False)
    compress(Job("tiny", sparsity={"mlp": 0.5}, rounds=2, **tiny), loaded=_loaded())
    assert [w["layers.0.mlp"] for w in widths] == [18, 12] and [w["layers.1.vo"] for w in widths] == [4, 4]
    widths.clear()
    compress(Job("tiny", budget=0.4, multiple_of=4, **tiny), loaded=_loaded())
    (w,) = widths
    assert all(w[f"layers.{i}.mlp"] % 4 == 0 for i in range(2)) and min(w.values()) < 24


def test_table_lists_every_number_of_the_summary():
    from ecospa.jobs.compress import table
    s = {"dense_params": 1_995_001, "kept_params": 1_005_001, "group_fraction_removed": 0.4567,
         "block_fraction_removed": 0.3012, "ppl_dense": 10.456,
         "rounds": [{"ppl_pruned": 20.5, "ppl_reconstructed": 15.25, "steps": 4, "ppl_recovered": 12.125},
                    {"ppl_pruned": 30.0, "ppl_reconstructed": None, "steps": 4, "ppl_recovered": 14.0}],
         "curve": [{"step": 2, "ppl": 13.0, "ppl_extra": {"stdlib": 20.0, "wiki": 30.0}}],
         "ppl_dense_extra": {"stdlib": 16.0}, "ppl_extra": {"stdlib": 24.0}, "latency_ratio": 1.555,
         "export_hf": "hf-padded: /x", "export": "gguf: /y.gguf"}
    rows = [line.split("  ")[0].strip() + " | " + line.rsplit("  ", 1)[-1].strip() for line in table(s).splitlines()]
    assert rows == ["dense params | 2.00M", "kept params | 1.01M", "coupled-group params removed | 45.7%",
                    "block params removed | 30.1%", "ppl dense | 10.46", "ppl after prune (round 1) | 20.50",
                    "ppl after the refit (round 1) | 15.25", "ppl after recovery (round 1, 4 steps) | 12.12",
                    "ppl after prune (round 2) | 30.00", "ppl after recovery (round 2, 4 steps) | 14.00",
                    "ppl at recovery step 2 | 13.00, stdlib 20.00, wiki 30.00",
                    "held-out stdlib: ppl dense -> final | 16.00 -> 24.00 (1.50x)",
                    "forward latency dense / pruned | 1.55x" if f"{1.555:.2f}" == "1.55" else
                    "forward latency dense / pruned | 1.56x",
                    "HF export | hf-padded: /x", "export | gguf: /y.gguf"]
    bare = {k: v for k, v in s.items() if k not in ("curve", "ppl_dense_extra", "export_hf", "export")}
    assert len(table(bare).splitlines()) == 5 + 3 + 2 + 1


def test_a_failed_export_is_recorded_and_the_checkpoint_kept(tmp_path, monkeypatch):
    """An export that fails (here: a full disk) is recorded in the summary in one line, in full;
    the checkpoint at --out is saved; without --out the summary says nothing was saved."""
    def full(params, cfg, path, fmt, **kw):
        raise OSError("No space\n left on device")

    monkeypatch.setattr(job_mod, "export", full)
    cfg, dense, tok = _loaded()
    out, hf = tmp_path / "c", tmp_path / "hf"
    s = compress(Job("tiny", out=str(out), export_hf=str(hf), budget=0.3, rank_by="estimator", reconstruct=False,
                     steps=0, eval_extra=(), **SMALL), loaded=(cfg, dense, tok))
    assert s["export_hf"] == "FAILED: No space left on device"
    assert s["ppl_recovered"] == s["ppl_pruned"] and s["rounds"][0]["steps"] == 0  # no recovery, no refit
    assert s["export_failed"] == (f"--export-hf {hf}: No space left on device (the compressed model IS saved at "
                                  f"{out}; export it again with `ecospa export --model {out} --format FORMAT "
                                  "--out PATH`)")
    assert checkpoint.load_extra(str(out))["summary"]["ppl_pruned"] == s["ppl_pruned"]
    gguf = tmp_path / "m.gguf"
    s = compress(Job("tiny", export=str(gguf), export_format="gguf", budget=0.3, rank_by="estimator",
                     reconstruct=False, steps=0, eval_extra=(), **SMALL), loaded=(cfg, dense, tok))
    assert s["export"] == "FAILED: No space left on device" and "export_hf" not in s
    assert s["export_failed"] == f"--export {gguf}: No space left on device (nothing was saved (no --out))"
    s = compress(Job("tiny", export_hf=str(hf), export=str(gguf), export_format="gguf", budget=0.3,
                     rank_by="estimator", reconstruct=False, steps=0, eval_extra=(), **SMALL), loaded=(cfg, dense, tok))
    assert s["export_failed"] == (f"--export-hf {hf}: No space left on device; --export {gguf}: No space left on "
                                  "device (nothing was saved (no --out))")


def test_tokenizer_spec_and_message_of():
    from ecospa.jobs.compress import _tokenizer_spec, message_of
    assert _tokenizer_spec("smollm2-135m") == "smollm2-135m"  # not a path: the spec itself
    assert _tokenizer_spec(".") == os.path.abspath(".")
    assert message_of(OSError("a\n  b\tc ")) == "a b c" and message_of(KeyboardInterrupt()) == "KeyboardInterrupt"


def test_layerwise_and_whole_graph_jobs_keep_the_same_units_from_the_same_numbers(monkeypatch):
    """--layerwise (the default) and --no-layerwise on the in-memory model: the calibration's
    gradient, recovery's step and the evaluation's loss are computed two ways; the kept units, the
    dense and pruned perplexities and the first recovery loss are the same; by layer whole batches
    are differentiated, else --micro-batch rows (here 2)."""
    kept, grad_fns, step_fns, losses, micro, evals = [], [], [], [], [], []
    real_slice, real_fisher, real_step, real_chunked = (job_mod.slice_units, job_mod.fisher, job_mod.make_step,
                                                        job_mod.chunked_loss)

    def fisher_spy(*a, grad_fn=None, **kw):
        grad_fns.append(grad_fn)
        micro.append(kw.get("micro_batch"))
        return real_fisher(*a, grad_fn=grad_fn, **kw)

    def step_spy(loss, opt, grad_and_value=None, **kw):
        step_fns.append(grad_and_value)
        micro.append(kw.get("micro_batch"))
        step = real_step(loss, opt, grad_and_value=grad_and_value, **kw)
        return lambda *a: (lambda out: (losses.append(float(out.loss)), out)[1])(step(*a))

    monkeypatch.setattr(job_mod, "slice_units", lambda p, g, keep: (kept.append(keep), real_slice(p, g, keep))[1])
    monkeypatch.setattr(job_mod, "fisher", fisher_spy)
    monkeypatch.setattr(job_mod, "make_step", step_spy)
    monkeypatch.setattr(job_mod, "chunked_loss", lambda *a, **k: (evals.append(a), real_chunked(*a, **k))[1])
    out = [compress(Job("tiny", budget=0.4, layerwise=layerwise, reconstruct=False, rank_by="estimator", distill=True,
                        distill_weight=0.3, steps=1, micro_batch=2, eval_extra=(), **dict(SMALL, batch_size=4)),
                    loaded=_loaded())
           for layerwise in (True, False)]
    assert len(evals) == 1
    for key in ("ppl_dense", "ppl_pruned"):
        assert out[0][key] == pytest.approx(out[1][key], rel=1e-5), key
    assert grad_fns[0] is not None and grad_fns[0].__qualname__.startswith("lm_layer_grads")
    assert step_fns[0] is not None and step_fns[0].__qualname__.startswith("layer_grad_and_value")
    assert grad_fns[1] is None and step_fns[1] is None
    assert micro == [None, None, 2, 2]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    a, b = kept
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(v.shape[1] < 8 for v in a.values())  # something was pruned


def test_owned_copies_only_the_leaves_another_tree_also_holds():
    """What recovery may update in place: a copy of every leaf whose storage the teacher also uses
    (a view of it too), the other leaves as they are (no second copy of the model)."""
    from ecospa.jobs.compress import _owned
    shared, own, base = torch.ones(3), torch.zeros(2), torch.arange(6.0)
    params = {"a": shared, "b": [own, base[2:4]], "n": 5}
    out = _owned(params, {"t": [shared, base]}, None)
    assert out["a"] is not shared and torch.equal(out["a"], shared)
    assert out["b"][0] is own and out["n"] == 5
    assert out["b"][1].untyped_storage().data_ptr() != base.untyped_storage().data_ptr()
    assert torch.equal(out["b"][1], torch.tensor([2.0, 3.0]))
    alone = _owned(params, None)
    assert alone["a"] is shared and alone["b"][1] is params["b"][1]


def test_the_calibration_differentiates_by_layer_only_what_it_can():
    """By layer only with --layerwise, a decoder and an estimator that reads gradients of layer
    leaves; an estimator that reads no gradient (magnitude) gets none at all."""
    import types

    from ecospa.func.families import family_of
    from ecospa.importance import ESTIMATORS
    from ecospa.jobs.compress import _calib_grads
    fam, groups = family_of(CFG), llama.coupled_groups(CFG)
    job = Job("m", budget=0.5)
    assert _calib_grads(job, fam, CFG, ESTIMATORS["fisher"](groups)) is not None
    assert _calib_grads(Job("m", budget=0.5, layerwise=False), fam, CFG, ESTIMATORS["fisher"](groups)) is None
    assert _calib_grads(job, fam, CFG, ESTIMATORS["magnitude"](groups)) is None
    encoder = types.SimpleNamespace(decoder=False)
    assert _calib_grads(job, encoder, CFG, ESTIMATORS["fisher"](groups)) is None
    outside = ESTIMATORS["fisher"](groups)._replace(reads=(("embed",),))  # a leaf outside the layers
    assert _calib_grads(job, fam, CFG, outside) is None


def test_the_estimator_and_its_seed_reach_the_calibration(monkeypatch):
    """--estimator random: the kept units follow the job's seed (the same seed, the same units)."""
    kept = []
    real = job_mod.slice_units
    monkeypatch.setattr(job_mod, "slice_units", lambda p, g, keep: (kept.append(keep), real(p, g, keep))[1])
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    tiny = dict(steps=0, batch_size=2, seq_len=16, calib_batches=1, eval_seq_len=16, eval_windows=1,
                eval_extra=(), ppl_dense=1.0, progress=False, rank_by="estimator", reconstruct=False)
    for seed in (1, 1, 2):
        compress(Job("tiny", sparsity=0.5, estimator="random", seed=seed, **tiny), loaded=_loaded())
    same = all(torch.equal(kept[0][k], kept[1][k]) for k in kept[0])
    other = all(torch.equal(kept[0][k], kept[2][k]) for k in kept[0])
    assert same and not other


def test_a_job_with_progress_reports_every_phase(capsys):
    """progress=True (what the CLI passes on a terminal or in a log): one line per phase in a log,
    with its count of batches/layers/steps done, and a line per round on stdout."""
    import time
    t0 = time.perf_counter()
    s = compress(Job("tiny", budget=0.4, rank_by="obs", reconstruct=True, steps=2, eval_extra=(), progress=True,
                     **{k: v for k, v in SMALL.items() if k != "progress"}), loaded=_loaded())
    wall = time.perf_counter() - t0
    assert 0 < s["rounds"][0]["reconstruct_seconds"] < wall and 0 < s["rounds"][0]["recover_seconds"] < wall
    out, err = capsys.readouterr()
    lines = err.splitlines()
    for desc, unit, n in (("calibrate", "batch", 2), ("obs scores + refit", "layer", 2),
                          ("recover", "step", 2), ("eval", "batch", 2)):
        mine = [line for line in lines if line.startswith(f"{desc}: ")]
        assert mine and mine[-1].startswith(f"{desc}: {unit} {n}/{n}"), (desc, err)  # the last line: done
    import re
    last = [line for line in lines if line.startswith("recover: ")][-1]
    assert re.match(r"recover: step 2/2 loss \d+\.\d{3} ", last), last
    (summary,) = [line for line in out.splitlines() if line.startswith("round 1: ")]
    assert summary == (f"round 1: {s['group_fraction_removed']:.1%} of group params removed, held-out ppl "
                       f"{s['ppl_dense']:.2f} -> {s['ppl_pruned']:.2f} -> {s['ppl_reconstructed']:.2f} after the refit")
    s = compress(Job("tiny", budget=0.4, rank_by="estimator", reconstruct=False, steps=0, eval_extra=(), progress=True,
                     **{k: v for k, v in SMALL.items() if k != "progress"}), loaded=_loaded())
    (summary,) = [line for line in capsys.readouterr()[0].splitlines() if line.startswith("round 1: ")]
    assert summary == (f"round 1: {s['group_fraction_removed']:.1%} of group params removed, held-out ppl "
                       f"{s['ppl_dense']:.2f} -> {s['ppl_pruned']:.2f}")


def test_two_rounds_without_distillation_refit_each_round_and_recover_on_cross_entropy(monkeypatch):
    """rounds=2, the refit in both (the dense model is kept for it), recovery on plain cross-entropy
    (no teacher): the first recovery loss is the pruned, refit model's CE on its first window; the
    curve's points are each round's own numbers; the last one is the recovered model's."""
    pruned, refits, targets = [], [], []
    real_rec = job_mod.reconstruct

    def rec(params, dense, cfg, batches, **kw):
        targets.append(kw["target"])
        out = real_rec(params, dense, cfg, batches, **kw)
        refits.append(torch.utils._pytree.tree_map(lambda x: x.clone(), out))
        return out

    monkeypatch.setattr(job_mod, "reconstruct", rec)
    s = compress(Job("tiny", budget=0.4, rounds=2, distill=False, rank_by="estimator", reconstruct=True,
                     recon_target="local", steps=4, eval_at=(1, 2, 4), seed=3, eval_extra=(), **SMALL),
                 loaded=_loaded())
    assert targets == ["local", "local"] and len(refits) == 2
    train = ByteTokenizer().encode(corpus("pydoc", "train"))
    first = batch_at(train, 0, 2, 16, 3 + 1)  # round 1's first recovery window
    assert [c["step"] for c in s["curve"]] == [1, 2, 4]
    assert s["rounds"][0]["ppl_recovered"] == s["curve"][1]["ppl"]
    assert s["rounds"][1]["ppl_recovered"] == s["curve"][2]["ppl"] == s["ppl_recovered"]
    assert s["curve"][0]["ppl"] != s["curve"][1]["ppl"]
    # the recovery loss of the first step: CE, not a distillation loss (recorded by the step)
    losses = []
    real_step = job_mod.make_step

    def step_spy(loss, opt, **kw):
        step = real_step(loss, opt, **kw)
        return lambda *a: (lambda out: (losses.append(float(out.loss)), out)[1])(step(*a))

    monkeypatch.setattr(job_mod, "make_step", step_spy)
    for layerwise in (True, False):
        refits.clear()
        losses.clear()
        s = compress(Job("tiny", budget=0.4, rounds=2, distill=False, rank_by="estimator", reconstruct=True,
                         steps=2, eval_at=(1,), seed=3, layerwise=layerwise, **SMALL), loaded=_loaded())
        assert 1 < s["ppl_extra"]["stdlib"] < 1e6 and 1 < s["ppl_dense_extra"]["stdlib"] < 1e6
        assert 1 < s["curve"][0]["ppl"] < 1e6 and 1 < s["curve"][0]["ppl_extra"]["stdlib"] < 1e6
        with torch.no_grad():
            logits = llama.forward(refits[0], first[:, :-1], CFG)
        want = float(F.cross_entropy(logits.flatten(0, 1), first[:, 1:].flatten()))
        assert losses[0] == pytest.approx(want, rel=1e-4), layerwise


def test_without_recovery_the_last_refit_is_the_result_and_is_not_evaluated_again(monkeypatch):
    calls = []
    real = job_mod.perplexity
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    s = compress(Job("tiny", budget=0.4, rank_by="estimator", reconstruct=True, steps=0, eval_extra=(), **SMALL),
                 loaded=_loaded())
    assert s["ppl_recovered"] == s["ppl_reconstructed"] != s["ppl_pruned"]
    assert len(calls) == 3  # dense, pruned, refit


def test_the_summary_times_every_phase_in_order(tmp_path):
    s = compress(Job("tiny", out=str(tmp_path / "c"), budget=0.4, rank_by="obs", reconstruct=True, steps=2, rounds=2,
                     eval_extra=(), **SMALL), loaded=_loaded())
    one_round = ["calibrate", "obs scores + refit", "eval pruned", "eval refit", "recover", "eval recovered"]
    assert [p["phase"] for p in s["phases"]] == (["load", "encode", "eval dense", "latency"] + one_round * 2
                                                 + ["eval held-out", "latency", "save"])
    # the obs scores without the refit, and the refit without the obs scores, are phases of their own
    apart = [compress(Job("tiny", budget=0.4, rank_by=rank_by, reconstruct=refit, steps=0, eval_extra=(), **SMALL),
                      loaded=_loaded()) for rank_by, refit in (("obs", False), ("estimator", True))]
    assert [[p["phase"] for p in a["phases"]][4:-3] for a in apart] == [
        ["calibrate", "obs scores", "prune", "eval pruned", "recover", "eval recovered"],
        ["calibrate", "prune", "eval pruned", "refit", "eval refit", "recover", "eval recovered"]]
    assert s["phase_seconds"]["recover"] == pytest.approx(sum(p["seconds"] for p in s["phases"]
                                                              if p["phase"] == "recover"))
    assert set(s["phase_seconds"]) == {p["phase"] for p in s["phases"]}
    assert s["peak_rss_mb"] >= max(p["peak_rss_mb"] for p in s["phases"]) > 0 and "peak_rss_exact" in s
    saved = checkpoint.load_extra(str(tmp_path / "c"))["summary"]  # written during the save: up to it
    assert [p["phase"] for p in saved["phases"]] == [p["phase"] for p in s["phases"]][:-1]


def test_a_job_loads_its_model_from_a_checkpoint_and_evaluates_every_window(tmp_path):
    """No ``loaded``: the model (and its byte tokenizer) is read from the checkpoint --model names;
    --eval-windows None reads every window of the val split; the saved checkpoint records the
    tokenizer of its source."""
    params = llama.init(CFG, seed=6)
    src = tmp_path / "src"
    checkpoint.save(src, params, CFG, extra={"tokenizer": "byte"})
    out = tmp_path / "c"
    s = compress(Job(str(src), out=str(out), budget=0.3, rank_by="estimator", reconstruct=False, steps=0,
                     eval_extra=(), **dict(SMALL, eval_windows=None, eval_seq_len=512, eval_batch_size=8)))
    val = ByteTokenizer().encode(corpus("pydoc", "val"))
    assert s["model"] == str(src)
    assert s["ppl_dense"] == pytest.approx(_ppl(params, val, 512, (len(val) - 1) // 512), rel=1e-4)
    assert checkpoint.load_extra(str(out))["tokenizer"] == "byte"


def test_known_dense_numbers_are_not_measured_again(monkeypatch):
    calls = []
    real = job_mod.perplexity
    monkeypatch.setattr(job_mod, "perplexity", lambda f, p, c, ids, **k: (calls.append(len(ids)), real(f, p, c, ids, **k))[1])
    s = compress(Job("tiny", budget=0.4, rank_by="estimator", reconstruct=False, steps=0, ppl_dense=3.5,
                     ppl_dense_extra={"stdlib": 7.25}, **SMALL), loaded=_loaded())
    assert s["ppl_dense"] == 3.5 and s["ppl_dense_extra"] == {"stdlib": 7.25}
    assert len(calls) == 2 and s["ppl_extra"]["stdlib"] != 7.25  # the pruned model on val and on stdlib


def test_a_target_the_model_cannot_take_is_a_usage_error(monkeypatch):
    """--sparsity for a kind the model has no group of (here: a family with MLP groups only)."""
    import types
    real = job_mod.family_of

    def mlp_only(cfg):
        fam = real(cfg)
        return types.SimpleNamespace(forward=fam.forward, decoder=fam.decoder,
                                     coupled_groups=lambda c: [g for g in fam.coupled_groups(c) if g.kind == "mlp"])

    monkeypatch.setattr(job_mod, "family_of", mlp_only)
    with pytest.raises(UsageError) as e:
        compress(Job("tiny", sparsity={"qk": 0.5}, **SMALL), loaded=_loaded())
    assert str(e.value) == "sparsity names group kinds ['qk'] that none of the groups has; known kinds: ['mlp']"


# ---- compress: the save and the exports ------------------------------------------------------------

_NOTHING = dict(rank_by="estimator", reconstruct=False, steps=0, eval_extra=(), **SMALL)


def test_the_exports_hold_the_saved_model(tmp_path):
    from ecospa.io.load import load_model
    out, hf, gg = tmp_path / "c", tmp_path / "hf", tmp_path / "m.gguf"
    s = compress(Job("tiny", out=str(out), export_hf=str(hf), export=str(gg), export_format="gguf-compact",
                     budget=0.4, **_NOTHING), loaded=_loaded())
    assert s["export_hf"] == f"hf-padded: {hf}" and s["export"] == f"gguf-compact: {gg}" and "export_failed" not in s
    params, cfg, _ = checkpoint.load(str(out))
    tokens = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    want = llama.forward(params, tokens, cfg)
    for path in (hf, gg):
        c2, p2, _ = load_model(str(path))
        got = job_mod.family_of(c2).forward(p2, tokens, c2)
        assert torch.allclose(got, want, atol=1e-4), path
    again = compress(Job("tiny", export_hf=str(hf), export=str(gg), export_format="gguf-compact", budget=0.3,
                         overwrite=True, **_NOTHING), loaded=_loaded())  # --overwrite reaches the exports
    assert "export_failed" not in again and again["export_hf"] == f"hf-padded: {hf}"


def test_the_save_replaces_only_what_it_may_and_says_what_is_intact(tmp_path, monkeypatch):
    from ecospa.io.files import WriteFailed
    empty = tmp_path / "empty"
    empty.mkdir()
    compress(Job("tiny", out=str(empty), budget=0.4, **_NOTHING), loaded=_loaded())
    assert (empty / "manifest.json").is_file()  # an empty directory given as --out: the checkpoint there
    s = compress(Job("tiny", out=str(empty), budget=0.3, overwrite=True, **_NOTHING), loaded=_loaded())
    assert checkpoint.load_extra(str(empty))["summary"]["job"]["budget"] == 0.3 == s["job"]["budget"]

    class Full:
        @staticmethod
        def save(path, *a, **k):
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(job_mod, "checkpoint", Full)
    new = tmp_path / "new"
    with pytest.raises(WriteFailed) as e:
        compress(Job("tiny", out=str(new), budget=0.4, **_NOTHING), loaded=_loaded())
    assert str(e.value) == (f"could not write {new}: No space left on device (disk full: free space and run "
                            "again); no checkpoint was saved (an earlier one at --out is unchanged)")
    from ecospa.jobs.compress import _save
    p = {"layers": [{"w": torch.tensor([float("nan")])}]}
    with pytest.raises(RecoveryDiverged) as e:
        _save(Job("tiny", budget=0.4), p, CFG, {})
    assert str(e.value) == ("recovery diverged: parameter layers.0.w is not finite before saving; "
                            "nothing was saved. Use a smaller --lr (default 2e-4)")


def test_the_summary_records_latency_and_memory_as_measured(monkeypatch, tmp_path):
    times = iter([0.5, 0.125])  # the dense model's forward, then the pruned one's
    monkeypatch.setattr(job_mod, "latency", lambda *a, **k: next(times))
    s = compress(Job("tiny", out=str(tmp_path / "c"), budget=0.4, **_NOTHING), loaded=_loaded())
    assert s["latency_ratio"] == 4.0
    saved = checkpoint.load_extra(str(tmp_path / "c"))["summary"]
    assert set(saved["phase_seconds"]) == {p["phase"] for p in saved["phases"]}
    assert saved["peak_rss_mb"] >= max(p["peak_rss_mb"] for p in saved["phases"]) > 0
    assert isinstance(saved["peak_rss_exact"], bool) and saved["dense_bytes"] == s["dense_bytes"] > 0


def test_the_exports_carry_the_source_models_tokenizer_and_metadata(tmp_path):
    """--model a GGUF with a byte-level BPE tokenizer, special tokens, a chat template and
    ``general.*`` metadata (the model itself given in memory): the HF export holds its
    tokenizer.json and special tokens, the GGUF export its tokenizer metadata and general info."""
    pytest.importorskip("gguf")
    from ecospa.io.gguf import general_info, open_reader, tokenizer_info
    from ecospa.io.gguf_export import save_gguf
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    template = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    cfg = llama.Config(vocab_size=len(specials) + 256, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24,
                       init_std=0.3)
    info = {"model": "gpt2", "tokens": specials + [_byte_alphabet()[b] for b in range(256)], "merges": [],
            "token_type": [3] * 3 + [1] * 256, "bos_token_id": 1, "eos_token_id": 2, "unknown_token_id": 0,
            "chat_template": template}
    src = tmp_path / "src.gguf"
    params = llama.init(cfg, seed=0)
    save_gguf(params, cfg, str(src), tokenizer_info=info, name="Tiny Source")
    hf, gg = tmp_path / "hf", tmp_path / "m.gguf"
    s = compress(Job(str(src), export_hf=str(hf), export=str(gg), export_format="gguf", budget=0.4, **_NOTHING),
                 loaded=(cfg, params, ByteTokenizer()))
    assert "export_failed" not in s, s.get("export_failed")
    assert (hf / "tokenizer.json").is_file()
    with open(hf / "config.json") as f:
        config = json.load(f)
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    with open(hf / "tokenizer_config.json") as f:
        assert json.load(f)["chat_template"] == template
    got = tokenizer_info(open_reader(str(gg)))
    assert (got["bos_token_id"], got["eos_token_id"], got["chat_template"]) == (1, 2, template)
    assert "Tiny Source" in general_info(open_reader(str(gg)))["general.name"]["value"]


def test_the_export_paths_are_checked_when_the_job_is_built(tmp_path, monkeypatch):
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    gg = str(tmp_path / "m.gguf")
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, export=gg, export_format="gguf")
    assert str(e.value) == f"--export {gg!r} exists; choose another name or pass --overwrite"
    Job("m", budget=0.5, export=gg, export_format="gguf", overwrite=True)
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, export=str(tmp_path / "m.bin"), export_format="gguf-compact")
    assert str(e.value) == f"--export {str(tmp_path / 'm.bin')!r}: a GGUF file name must end in .gguf"
    hf = tmp_path / "hf"
    compress(Job("tiny", export_hf=str(hf), budget=0.4, **_NOTHING), loaded=_loaded())
    with pytest.raises(UsageError) as e:
        Job("m", budget=0.5, export_hf=str(hf))
    assert str(e.value) == (f"--export-hf {str(hf)!r} holds an earlier export; pass --overwrite to replace it, "
                            "or choose another directory")
    Job("m", budget=0.5, export_hf=str(hf), overwrite=True)
    ck = tmp_path / "ck"
    checkpoint.save(ck, llama.init(CFG, seed=0), CFG)
    Job("m", budget=0.5, out=str(ck), overwrite=True)
    # a model name that is not a path holds nothing: the working directory may be an output
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    Job("not-a-path", budget=0.5, out=str(tmp_path / "empty"))


# ---- compress: the leading tokens of an extra held-out source ----------------------------------

def test_clean_cut_at_the_text_edges():
    from ecospa.jobs.compress import _clean_cut
    assert _clean_cut("a\nb", 0) == 2  # the first newline, one character from each end
    assert _clean_cut("ab\n", 0) == -1 and _clean_cut("ab\n\n", 0) == -1  # nothing after it
    assert _clean_cut("a\n b\nc", 0) == 5  # text on both sides


class _Coarse:
    """A tokenizer of 16 characters a token (``tokenizers`` style), coarser than leading_ids' first guess."""

    def get_vocab_size(self):
        return 2

    def encode(self, text):
        import types
        return types.SimpleNamespace(ids=[hash(text[i:i + 16]) % 2 for i in range(0, len(text) - 15, 16)])


def test_leading_ids_read_enough_tokens_with_a_coarse_tokenizer():
    from ecospa.jobs.compress import leading_ids
    text = "".join(f"line {i:06d} of some text\n" for i in range(4000))  # 100 k characters, clean cuts
    ids = leading_ids(_Coarse(), text, 100)
    assert 356 <= ids.numel() < len(text) // 16  # need + margin, not the whole text
    whole = leading_ids(_Coarse(), text, None)
    assert whole.numel() == len(text) // 16 and torch.equal(ids, whole[:ids.numel()])


def test_an_empty_context_is_no_tokens_even_for_a_tokenizer_that_adds_a_bos():
    """A ``tokenizers`` tokenizer whose post-processor starts every encoding with <s> (id 1): the
    empty context is no tokens, so the continuation "<s> a b" scores a and b after <s>."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import Regex, models, pre_tokenizers, processors
    vocab = {"<unk>": 0, "<s>": 1, **{chr(c): c for c in range(32, 127)}}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    pytest.importorskip("lm_eval")
    from ecospa.jobs.harness import EcospaLM
    lm = EcospaLM(loaded=(HCFG, llama.init(HCFG, seed=0), tok), max_length=16)
    (got, _), = lm.loglikelihood([_Req("", "ab")])
    assert got == pytest.approx(float(_logp(lm.params, torch.tensor([1, 97, 98])).sum()), abs=1e-4)


def test_a_data_free_estimator_keeps_the_same_units_whatever_the_calibration_windows(monkeypatch):
    """--estimator magnitude reads no gradient: other seeds (other calibration windows) keep the
    same units; with the Fisher estimator they would differ."""
    kept = []
    real = job_mod.slice_units
    monkeypatch.setattr(job_mod, "slice_units", lambda p, g, keep: (kept.append(keep), real(p, g, keep))[1])
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    tiny = dict(steps=0, batch_size=2, seq_len=16, calib_batches=1, eval_seq_len=16, eval_windows=1,
                eval_extra=(), ppl_dense=1.0, progress=False, rank_by="estimator", reconstruct=False)
    for estimator, seed in (("magnitude", 1), ("magnitude", 2), ("fisher", 1), ("fisher", 2)):
        compress(Job("tiny", sparsity=0.5, estimator=estimator, seed=seed, **tiny), loaded=_loaded())
    same = [all(torch.equal(a[k], b[k]) for k in a) for a, b in (kept[0:2], kept[2:4])]
    assert same == [True, False]


@pytest.mark.parametrize("distill", [False, True])
def test_recovery_never_writes_the_model_the_caller_passed(distill):
    """A bug found by the jobs mutation profile: with --no-distill the dense model is dropped
    before recovery, so the leaves pruning left as they were (embeddings, norms) were updated in
    place in the caller's ``loaded`` tree. Recovery now owns a copy of every leaf it shares."""
    cfg, dense, tok = _loaded()
    before = torch.utils._pytree.tree_map(lambda x: x.clone() if torch.is_tensor(x) else x, dense)
    compress(Job("tiny", budget=0.4, distill=distill, **_NOTHING | dict(steps=2)), loaded=(cfg, dense, tok))
    flat = torch.utils._pytree.tree_leaves
    assert all(torch.equal(a, b) for a, b in zip(flat(before), flat(dense)))
