"""Numeric options at NON-neutral values (issue 24, "Options only tested at their neutral value"):
each checked against a hand computation at a value where a plausible wrong formula differs.

- sampling temperature at 0.5 and 2.0 (``logits / T`` vs ``logits * T`` agree only at 1), with
  top-k: the probabilities handed to the sampler, in ``sample``, ``generate`` and the CLI;
- the obs/refit ridge at 0.37 (not the default 0.1): the obs score of every MLP neuron equals a
  brute-force refit without it, with lam = ridge x mean(diag HᵀH); ``--ridge`` reaches both;
- the recovery LR schedule (``--lr-schedule cosine --warmup 2``) and the training LR options
  (``lr``, ``lr_warmup``, ``min_lr_ratio``, betas, weight decay, clipping) as the optimizer gets them;
- ``--rounds 3``: the linear ramp of the target over the rounds; ``--allocation depth`` reaching
  the job; lm-eval's sampling temperature.
(The distillation weight at 0.3 is in ``test_provenance.py``.)
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

import ecospa.jobs.compress as job_mod
from ecospa import cli, optim
from ecospa.func import llama
from ecospa.func.reconstruct import obs_scores
from ecospa.io import checkpoint
from ecospa.io.data import ByteTokenizer
from ecospa.io.load import encode
from ecospa.jobs.compress import Job, compress
from ecospa.jobs.generate import generate, sample
from ecospa.schedule import PruneSchedule
from ecospa.train import TrainConfig, train
from ecospa.train import loop as train_mod
from tolerances import close

CFG = llama.Config(vocab_size=256, dim=16, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=8, max_seq_len=64,
                   init_std=0.5)


def _hand_probs(logits: torch.Tensor, temperature: float, top_k=None) -> torch.Tensor:
    """softmax(logits / T) over the top_k largest logits (float64)."""
    z = logits.double() / temperature
    if top_k is not None:
        cut = z.sort(-1, descending=True).values[..., top_k - 1:top_k]
        z = z.masked_fill(z < cut, float("-inf"))
    return z.softmax(-1)


@pytest.fixture
def sampler_probs(monkeypatch):
    """Every probability matrix ``torch.multinomial`` is asked to sample from."""
    seen = []
    real = torch.multinomial

    def spy(probs, *a, **k):
        seen.append(probs.detach().clone())
        return real(probs, *a, **k)

    monkeypatch.setattr(torch, "multinomial", spy)
    return seen


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("top_k", [None, 3])
def test_sample_draws_from_softmax_of_logits_over_temperature(sampler_probs, temperature, top_k):
    """Kills ``logits * temperature`` (agrees with ``/`` only at 1) and a top-k cut after the
    softmax or off by one (k - 1 or k + 1 tokens)."""
    logits = torch.tensor([[0.3, 2.0, -1.0, 1.2, 0.9, 1.9], [1.0, -0.5, 0.0, 0.7, 2.5, -2.0]])
    sample(logits, temperature, top_k, torch.Generator().manual_seed(0))
    (probs,) = sampler_probs
    close(probs, _hand_probs(logits, temperature, top_k).float())
    assert ((probs > 0).sum(-1) == (top_k or logits.shape[1])).all()


@pytest.mark.parametrize("temperature, top_k", [(0.5, None), (2.0, 4)])
def test_generate_samples_each_token_at_the_temperature(sampler_probs, temperature, top_k):
    """Every step of ``generate`` samples from softmax(full-forward logits / T) of the sequence so
    far. Kills ``generate`` passing another temperature/top-k to the sampler, or sampling from
    the logits of the wrong position."""
    params = llama.init(CFG, seed=0)
    prompt = torch.tensor([[5, 80, 17, 3]])
    out = generate(params, CFG, prompt, 4, temperature=temperature, top_k=top_k, seed=1)
    assert len(sampler_probs) == 4
    for i, probs in enumerate(sampler_probs):
        logits = llama.forward(params, out[:, :4 + i], CFG)[:, -1]
        close(probs, _hand_probs(logits, temperature, top_k).float())


def test_cli_temperature_and_top_k_reach_the_sampler(sampler_probs, tmp_path, capsys):
    """``ecospa generate --temperature 0.5 --top-k 3``: the first draw is from the hand-computed
    distribution of the prompt's last logits. Kills the CLI dropping or swapping the flags."""
    params = llama.init(CFG, seed=0)
    model = checkpoint.save(tmp_path / "ck", params, CFG)
    rc = cli.main(["generate", "--model", str(model), "--prompt", "def f", "--max-new-tokens", "1",
                   "--temperature", "0.5", "--top-k", "3", "--seed", "4"])
    assert rc == 0, capsys.readouterr().err
    ids = encode(ByteTokenizer(), "def f")[None]
    (probs,) = sampler_probs
    close(probs, _hand_probs(llama.forward(params, ids, CFG)[:, -1], 0.5, 3).float())


# --- the obs / refit ridge -----------------------------------------------------------------------

def test_obs_scores_at_a_non_default_ridge_equal_a_brute_force_refit():
    """The obs score of MLP neuron u: the calibration error left when u is removed and the other
    neurons' output rows are refit, ||H_R W' - H W||^2 + lam ||W' - W_R||^2 + lam ||w_u||^2 at its
    minimum, lam = 0.37 x mean(diag HᵀH). Solved here per neuron by least squares (no inverse of
    the full Gram). Kills lam = ridge (not relative), the default ridge, or a Gram without lam."""
    cfg = dataclasses.replace(CFG, vocab_size=64)
    params = llama.init(cfg, seed=2, dtype=torch.float64)
    groups = llama.coupled_groups(cfg)
    batches = [torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    p = params["layers"][0]
    # the MLP's input, from public functions only: with w_down = 0 and a final norm of ones, the
    # final hidden state is rms_norm(residual after attention) (same eps), the MLP's input / mlp_norm
    probe = {**params, "norm": torch.ones_like(params["norm"]), "layers": ({**p, "w_down": torch.zeros_like(p["w_down"])},)}
    xs = [llama.hidden(probe, b, cfg) * p["mlp_norm"] for b in batches]
    h = torch.cat([(F.silu(x @ p["w_gate"]) * (x @ p["w_up"])).reshape(-1, cfg.ffn_dim) for x in xs])
    w = p["w_down"]
    gram = h.T @ h
    ridge = 0.37
    lam = ridge * float(gram.diagonal().mean())
    want = []
    for u in range(cfg.ffn_dim):
        rest = [j for j in range(cfg.ffn_dim) if j != u]
        hr, wr = h[:, rest], w[rest]
        a = hr.T @ hr + lam * torch.eye(len(rest), dtype=torch.float64)
        w_new = torch.linalg.solve(a, hr.T @ (h @ w) + lam * wr)
        want.append(float((hr @ w_new - h @ w).pow(2).sum() + lam * (w_new - wr).pow(2).sum()
                          + lam * w[u].pow(2).sum()))
    got = obs_scores(params, cfg, groups, batches, ridge=ridge)["layers.0.mlp"]
    close(got, torch.tensor([want], dtype=torch.float64))
    default = obs_scores(params, cfg, groups, batches)["layers.0.mlp"]
    assert not torch.allclose(default, got, rtol=1e-3)  # the ridge matters at this size


def test_ridge_flag_reaches_the_obs_scores_and_the_refit(monkeypatch):
    """``Job(ridge=0.37, obs_ridge=None)``: both consumers get 0.37; by default the obs scores get
    their own 0.01. Read where the ridges are USED (the obs scores' and the refit's solves), on the
    one-pass path (obs ranking with the refit, the default) and on each stage alone. Kills a call
    that drops ``ridge=job.ridge`` (each then runs at its own default, 1e-2), that ignores
    ``obs_ridge``, or that swaps the two."""
    import ecospa.func.reconstruct as rec
    seen = {"obs": set(), "refit": set()}
    real_obs, real_solve = rec._obs_of, rec.ridge_solve
    monkeypatch.setattr(rec, "_obs_of", lambda *a: (seen["obs"].add(a[5]), real_obs(*a))[1])
    monkeypatch.setattr(rec, "ridge_solve", lambda *a: (seen["refit"].add(a[3]), real_solve(*a))[1])
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    cfg = dataclasses.replace(CFG, ffn_dim=24, n_layers=2)
    small = dict(steps=0, batch_size=2, seq_len=16, calib_batches=1, recon_batches=1, eval_seq_len=16,
                 eval_windows=1, eval_extra=(), ppl_dense=1.0, progress=False)

    def ridges(**kw):
        seen["obs"].clear(), seen["refit"].clear()
        compress(Job("tiny", budget=0.3, ridge=0.37, **small, **kw), loaded=(cfg, llama.init(cfg, seed=0), ByteTokenizer()))
        return {k: sorted(v) for k, v in seen.items()}

    assert ridges(obs_ridge=None, rank_by="obs", reconstruct=True) == {"obs": [0.37], "refit": [0.37]}
    assert ridges(rank_by="obs", reconstruct=True) == {"obs": [0.01], "refit": [0.37]}  # the default
    assert ridges(obs_ridge=0.05, rank_by="obs", reconstruct=False) == {"obs": [0.05], "refit": []}
    assert ridges(obs_ridge=None, rank_by="obs", reconstruct=False) == {"obs": [0.37], "refit": []}
    assert ridges(rank_by="estimator", reconstruct=True) == {"obs": [], "refit": [0.37]}
    # --obs-ridge: the obs scores alone get it, the refit keeps --ridge
    assert ridges(obs_ridge=0.011, rank_by="obs", reconstruct=True) == {"obs": [0.011], "refit": [0.37]}


@pytest.mark.parametrize("bad", [0, -0.1, float("inf"), float("nan"), "0.1"])
def test_obs_ridge_must_be_a_positive_number(bad):
    from ecospa.errors import UsageError
    with pytest.raises(UsageError, match="--obs-ridge must be a finite number > 0"):
        Job("tiny", budget=0.3, obs_ridge=bad)


# --- learning-rate options -----------------------------------------------------------------------

def _cosine(peak, warmup, total, floor, step):
    """Linear warm-up to ``peak`` over ``warmup`` steps, then cosine to ``floor`` x peak at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@pytest.fixture
def adamw_args(monkeypatch):
    """The arguments of every ``optim.adamw`` call."""
    calls = []
    real = optim.adamw

    def spy(lr, **kw):
        calls.append(dict(kw, lr=lr))
        return real(lr, **kw)

    monkeypatch.setattr(optim, "adamw", spy)
    return calls


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_recovery_lr_schedule_and_warmup(adamw_args, schedule):
    """``--lr 3e-3 --lr-schedule cosine --warmup 2`` over 6 steps: lr(s) = 3e-3 (s+1)/2 for s < 2,
    then cosine to 10% at step 6; constant: 3e-3 at every step. Kills a warm-up that starts at 0
    (s / w), a cosine over the whole run instead of after the warm-up, or ``--warmup`` ignored."""
    cfg = dataclasses.replace(CFG, n_layers=2)
    params = llama.init(cfg, seed=0)
    job = Job("tiny", budget=0.3, lr=3e-3, lr_schedule=schedule, warmup=2, steps=6, batch_size=2, seq_len=8,
              progress=False)
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    loss = job_mod.lm_loss(llama.forward, cfg)
    job_mod.recover(loss, params, ids, job, 6, seed=0)
    (call,) = adamw_args
    assert call["weight_decay"] == 0.0
    lr = call["lr"]
    want = [_cosine(3e-3, 2, 6, 0.1, s) if schedule == "cosine" else 3e-3 for s in range(8)]
    got = [lr(s) if callable(lr) else lr for s in range(8)]
    assert got == pytest.approx(want, rel=1e-12)
    if schedule == "cosine":
        assert got[0] == pytest.approx(1.5e-3) and got[6] == pytest.approx(3e-4)


def test_training_lr_options_reach_the_optimizer(adamw_args, tmp_path):
    """``TrainConfig(lr=0.02, lr_warmup=3, min_lr_ratio=0.3, b1=0.8, b2=0.97, weight_decay=0.05,
    clip_norm=0.7)``: the optimizer gets those betas, decay and clipping, and the lr schedule of
    the hand formula at every step (warm-up, then cosine to 30% at step 10). Kills the default
    floor (0.1) in place of ``min_lr_ratio``, b1/b2 swapped, or the warm-up length ignored."""
    cfg = TrainConfig(model=dataclasses.replace(CFG, n_layers=2), batch_size=2, seq_len=8, steps=10, lr=0.02,
                      lr_warmup=3, min_lr_ratio=0.3, b1=0.8, b2=0.97, weight_decay=0.05, clip_norm=0.7,
                      eval_every=10, eval_batches=1, log_every=5, out=str(tmp_path),
                      prune=PruneSchedule(warmup_steps=1, window=1, rounds=0, sparsity=0.5))
    train(cfg, until=1, progress=False)
    (call,) = adamw_args
    assert (call["b1"], call["b2"], call["weight_decay"], call["clip_norm"]) == (0.8, 0.97, 0.05, 0.7)
    assert [call["lr"](s) for s in range(12)] == pytest.approx([_cosine(0.02, 3, 10, 0.3, s) for s in range(12)],
                                                               rel=1e-12)
    assert train_mod.opt_lr(cfg, 5) == pytest.approx(_cosine(0.02, 3, 10, 0.3, 5), rel=1e-12)  # as logged


def test_rounds_ramp_the_target_linearly_to_the_final_one(monkeypatch):
    """``--rounds 3 --sparsity 0.6``: round r keeps round((1 - 0.6 r/3) x dense units) per group
    (4 rotary pairs: 3, 2, 2; 8 V dims: 6, 5, 3; 24 MLP neurons: 19, 14, 10). Kills every round
    at the final target (no ramp) and a ramp one round late ((r - 1) / rounds)."""
    widths = []
    real = job_mod.slice_units

    def spy(tree, groups, keep):
        widths.append({kind: {k.shape[1] for name, k in keep.items() if name.endswith("." + kind)}
                       for kind in ("qk", "vo", "mlp")})
        return real(tree, groups, keep)

    monkeypatch.setattr(job_mod, "slice_units", spy)
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    cfg = dataclasses.replace(CFG, ffn_dim=24, n_layers=2, head_dim=8)
    compress(Job("tiny", sparsity=0.6, rounds=3, rank_by="estimator", reconstruct=False, steps=0, batch_size=2,
                 seq_len=16, calib_batches=1, eval_seq_len=16, eval_windows=1, eval_extra=(), ppl_dense=1.0,
                 progress=False), loaded=(cfg, llama.init(cfg, seed=0), ByteTokenizer()))
    assert widths == [{"qk": {3}, "vo": {6}, "mlp": {19}}, {"qk": {2}, "vo": {5}, "mlp": {14}},
                      {"qk": {2}, "vo": {3}, "mlp": {10}}]


def test_harness_generation_samples_at_the_requested_temperature(sampler_probs):
    """lm-eval's ``do_sample=True, temperature=0.5`` reaches the sampler (softmax(logits / 0.5));
    without ``do_sample`` decoding is greedy (nothing sampled). Kills the temperature dropped or
    sampling without do_sample."""
    pytest.importorskip("lm_eval")
    from ecospa.jobs.harness import EcospaLM

    class Req:
        def __init__(self, *args):
            self.args = args

    params = llama.init(CFG, seed=0)
    lm = EcospaLM(loaded=(CFG, params, ByteTokenizer()), max_length=32)
    lm.generate_until([Req("def f", {"max_gen_toks": 1, "temperature": 0.5})])
    assert sampler_probs == []
    lm.generate_until([Req("def f", {"max_gen_toks": 1, "do_sample": True, "temperature": 0.5})])
    (probs,) = sampler_probs
    ids = encode(ByteTokenizer(), "def f")[None]
    close(probs, _hand_probs(llama.forward(params, ids, CFG)[:, -1], 0.5).float())


def test_allocation_flag_reaches_the_job(monkeypatch):
    """``--allocation depth --budget 0.4`` on 2 equal layers: removed 0.2 then 0.6 of every group
    (0.5x, 1.5x), whatever the scores: layer 0 keeps 3 of 4 pairs, 6 of 8 V dims, 19 of 24 neurons;
    layer 1 keeps 2, 3, 10. Kills the job spreading the budget with the default (global) instead."""
    kept = {}
    real = job_mod.slice_units

    def spy(tree, groups, keep):
        kept.update({name: k.shape[1] for name, k in keep.items()})
        return real(tree, groups, keep)

    monkeypatch.setattr(job_mod, "slice_units", spy)
    monkeypatch.setattr(job_mod, "perplexity", lambda *a, **k: 1.0)
    cfg = dataclasses.replace(CFG, ffn_dim=24, n_layers=2, head_dim=8)
    compress(Job("tiny", budget=0.4, allocation="depth", rank_by="estimator", reconstruct=False, steps=0,
                 batch_size=2, seq_len=16, calib_batches=1, eval_seq_len=16, eval_windows=1, eval_extra=(),
                 ppl_dense=1.0, progress=False), loaded=(cfg, llama.init(cfg, seed=0), ByteTokenizer()))
    assert kept == {"layers.0.qk": 3, "layers.0.vo": 6, "layers.0.mlp": 19,
                    "layers.1.qk": 2, "layers.1.vo": 3, "layers.1.mlp": 10}


@pytest.mark.parametrize("layerwise", [True, False])
def test_recovery_dtype_bfloat16_runs_the_gradient_under_autocast(layerwise):
    """``--recovery-dtype bfloat16``: every gradient and loss of recovery is computed under
    ``torch.autocast(bfloat16)`` (spied where it is consumed), the params stay float32, and the
    step's gradient is the float32 one up to bfloat16 rounding (tolerances.AUTOCAST), while a
    float32 run is bit for bit the plain one."""
    from ecospa.func.families import family_of
    from ecospa.func.layerwise import distill_loss, layer_grad_and_value
    from tolerances import AUTOCAST
    cfg = dataclasses.replace(CFG, n_layers=2, dim=32, ffn_dim=48)
    fam = family_of(cfg)
    params, teacher = llama.init(cfg, seed=0), llama.init(cfg, seed=1)
    ids = torch.randint(0, 256, (400,), generator=torch.Generator().manual_seed(0))
    if layerwise:
        inner = layer_grad_and_value(fam, cfg, distill_loss(fam, cfg, teacher, 0.5))
    else:
        inner = torch.func.grad_and_value(job_mod._losses(fam, cfg, teacher, Job("x", budget=0.3))[1])
    seen, grads = [], []

    def spy(p, batch):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        g, v = inner(p, batch)
        grads.append(g)
        return g, v

    out = {}
    for dtype in ("float32", "bfloat16"):
        seen.clear(), grads.clear()
        job = Job("x", budget=0.3, lr=1e-3, steps=2, batch_size=2, seq_len=16, recovery_dtype=dtype,
                  progress=False)
        p, _ = job_mod.recover(None, optim_copy(params), ids, job, 2, seed=0, grad_and_value=spy)
        out[dtype] = (p, [g for g in grads])
        assert [s[0] for s in seen] == [dtype == "bfloat16"] * 2
        if dtype == "bfloat16":
            assert all(s[1] == torch.bfloat16 for s in seen)
        assert all(x.dtype == torch.float32 for x in torch.utils._pytree.tree_leaves(p))
    g32, g16 = (torch.utils._pytree.tree_leaves(out[d][1][0]) for d in ("float32", "bfloat16"))
    rel = [float((a - b).norm() / b.norm()) for a, b in zip(g16, g32) if b.norm() > 0]
    cos = [float(F.cosine_similarity(a.flatten(), b.flatten(), 0)) for a, b in zip(g16, g32) if b.norm() > 0]
    assert min(cos) > AUTOCAST[torch.bfloat16]["min_cosine"]  # the same gradient up to bfloat16 rounding
    assert max(rel) > 1e-6                                    # and not computed in float32
    plain, _ = job_mod.recover(None, optim_copy(params), ids, Job("x", budget=0.3, lr=1e-3, steps=2,
                               batch_size=2, seq_len=16, progress=False), 2, seed=0, grad_and_value=inner)
    for a, b in zip(torch.utils._pytree.tree_leaves(plain), torch.utils._pytree.tree_leaves(out["float32"][0])):
        assert torch.equal(a, b)


def optim_copy(params):
    return torch.utils._pytree.tree_map(lambda x: x.clone(), params)


def test_recovery_dtype_option_reaches_the_job_and_bad_values_are_refused(capsys):
    from ecospa.cli import build_parser
    from ecospa.errors import UsageError
    parser = build_parser()[0]
    base = ["compress", "--model", "x", "--budget", "0.5"]
    assert parser.parse_args(base).recovery_dtype == "float32"
    assert parser.parse_args(base + ["--recovery-dtype", "bfloat16"]).recovery_dtype == "bfloat16"
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--recovery-dtype", "float16"])
    assert "invalid choice: 'float16'" in capsys.readouterr().err
    with pytest.raises(UsageError, match="--recovery-dtype must be one of float32, bfloat16, got 'float16'"):
        Job("x", budget=0.5, recovery_dtype="float16")


def test_distillation_losses_are_float32_from_bfloat16_logits():
    """Under autocast the logits are bfloat16 (and CPU autocast keeps log_softmax in bfloat16):
    both distillation losses (layer-wise per token, and whole-forward) compute the KL and the
    cross-entropy from the logits cast to float32, exactly as if float32 logits of the same
    values had been given."""
    from types import SimpleNamespace
    from ecospa.func.layerwise import distill_loss
    g = torch.Generator().manual_seed(0)
    student = (torch.randn(2, 5, 256, generator=g) * 4).to(torch.bfloat16)
    teacher = (torch.randn(2, 5, 256, generator=g) * 4).to(torch.bfloat16)
    batch = torch.randint(0, 256, (2, 6), generator=g)
    for ref_dtype in (torch.bfloat16, torch.float32):
        fam = SimpleNamespace(head=lambda p, x, cfg, t=teacher.to(ref_dtype): t[:, :x.shape[1]],
                              forward=lambda p, tokens, cfg: p)
        chunk = distill_loss(fam, CFG, None, 0.5).chunk
        hidden = torch.zeros(2, 5, 1)
        got = chunk(student, batch, 0, hidden)
        want = chunk(student.float(), batch, 0, hidden)
        assert got.dtype == torch.float32 and torch.equal(got, want)
    fam = SimpleNamespace(forward=lambda p, tokens, cfg: p if p is not None else teacher)
    _, kd, _ = job_mod._losses(fam, CFG, None, Job("x", budget=0.5, layerwise=False))
    want_fam = SimpleNamespace(forward=lambda p, tokens, cfg: (p if p is not None else teacher).float())
    _, kd32, _ = job_mod._losses(want_fam, CFG, None, Job("x", budget=0.5, layerwise=False))
    assert torch.equal(kd(student, batch), kd32(student, batch))
