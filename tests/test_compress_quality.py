"""The compression job's quality levers: refit, obs ranking, KD-only, cosine LR, 2nd-domain eval."""
import math
import re

import pytest
import torch

from ecospa._tree import count_params
from ecospa.errors import UsageError
from ecospa.func.families import family_of
from ecospa.io import checkpoint
from ecospa.io.data import corpus
from ecospa.jobs.compress import Job, _losses, compress, table

pytest.importorskip("gguf")
from test_compress import FAST, tiny_gguf  # noqa: E402,F401  (the fixture)


def test_all_levers_end_to_end(tiny_gguf, tmp_path):  # noqa: F811
    out = tmp_path / "c"
    s = compress(Job(str(tiny_gguf), out=str(out), budget=0.4, reconstruct=True, rank_by="obs",
                     recon_batches=2, distill=True, distill_weight=1.0, lr_schedule="cosine",
                     warmup=1, eval_extra=("stdlib",), **FAST))
    r = s["rounds"][0]
    for k in ("ppl_pruned", "ppl_reconstructed", "ppl_recovered"):
        assert math.isfinite(r[k]) and r[k] > 1
    assert set(s["ppl_dense_extra"]) == {"stdlib"} == set(s["ppl_extra"])
    assert s["calibration_tokens"] == (2 + 2) * 2 * (32 + 1)  # calib + refit batches of TRAIN windows
    assert "after the refit" in table(s) and "held-out stdlib" in table(s)
    params, cfg, _ = checkpoint.load(str(out))
    assert s["kept_params"] == count_params(params)


def test_the_refit_lowers_the_error_to_the_dense_model_on_the_job(tiny_gguf):  # noqa: F811
    """Same selection, with and without the refit: the refit model's logits are closer to the
    dense model's on held-out tokens."""
    from ecospa.io.load import encode, load_model
    loaded = load_model(str(tiny_gguf))
    cfg, dense, _ = loaded
    fwd = family_of(cfg).forward
    toks = encode(loaded[2], corpus("pydoc", "val", max_chars=20_000))[:4 * 64].reshape(4, 64)
    errs = []
    for rec in (False, True):
        job = Job(str(tiny_gguf), budget=0.4, reconstruct=rec, recon_batches=4, eval_extra=(),
                  **dict(FAST, steps=0))
        params = _job_params(job, loaded)
        errs.append(float((fwd(params, toks, cfg) - fwd(dense, toks, cfg)).pow(2).mean()))
    assert errs[1] < errs[0]


def _job_params(job, loaded):
    import ecospa.jobs.compress as c
    seen = {}
    real = c._save

    def keep(job_, params, cfg, summary):
        seen["params"] = params
        return real(job_, params, cfg, summary)

    c._save = keep
    try:
        compress(job, loaded=loaded)
    finally:
        c._save = real
    return seen["params"]


def test_kd_only_ignores_the_hard_labels(tiny_gguf):  # noqa: F811
    from ecospa.io.load import load_model
    cfg, dense, _ = load_model(str(tiny_gguf))
    student = {**dense, "norm": dense["norm"] * 1.1}
    batch = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    other = batch.clone()
    other[:, -1] = (other[:, -1] + 1) % cfg.vocab_size  # only the last label differs
    job = Job(str(tiny_gguf), budget=0.3, distill=True, distill_weight=1.0, eval_extra=())
    fam = family_of(cfg)
    _, kd, kd_layers = _losses(fam, cfg, dense, job)
    assert float(kd(student, batch)) == float(kd(student, other)) > 0
    assert float(kd_layers(student, batch)[1]) == float(kd_layers(student, other)[1]) > 0
    _, mixed, mixed_layers = _losses(fam, cfg, dense, Job(str(tiny_gguf), budget=0.3, distill=True, eval_extra=()))
    assert float(mixed(student, batch)) != float(mixed(student, other))
    assert float(mixed_layers(student, batch)[1]) != float(mixed_layers(student, other)[1])
    assert float(kd(dense, batch)) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("field, value, message", [
    ("rank_by", "taylor", "--rank-by"), ("recon_target", "global", "--recon-target"),
    ("lr_schedule", "linear", "--lr-schedule"), ("ridge", 0.0, "--ridge"), ("ridge", float("inf"), "--ridge"),
    ("recon_batches", 0, "--recon-batches"), ("warmup", -1, "--warmup"), ("warmup", 81, "--warmup"),
    ("eval_extra", ("pydoc",), "--eval-extra"), ("eval_extra", ("",), "--eval-extra"),
    ("allocation", "flap", "--allocation"),
])
def test_bad_lever_values_are_usage_errors(field, value, message):
    with pytest.raises(UsageError, match=message):
        Job("smollm2-135m", budget=0.5, **{field: value})


def test_cli_flags_reach_the_job(tiny_gguf, tmp_path, capsys):  # noqa: F811
    from ecospa import cli
    rc = cli.main(["compress", "--model", str(tiny_gguf), "--budget", "0.3", "--steps", "1",
                   "--batch-size", "2", "--seq-len", "16", "--calib-batches", "1", "--eval-seq-len", "32",
                   "--eval-windows", "2", "--reconstruct", "--recon-batches", "1", "--rank-by", "obs",
                   "--ridge", "0.1", "--lr-schedule", "cosine", "--eval-extra", "stdlib",
                   "--out", str(tmp_path / "c")])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "after the refit" in printed and "held-out stdlib" in printed


def test_eval_scores_a_second_domain_by_default(tiny_gguf, capsys):  # noqa: F811
    from ecospa import cli
    assert cli.main(["eval", "--model", str(tiny_gguf), "--seq-len", "32", "--max-windows", "2"]) == 0
    out = capsys.readouterr().out
    ppl = dict(re.findall(r"data (\w+)/val: .*perplexity ([0-9.]+)", out))
    assert set(ppl) == {"pydoc", "stdlib"} and all(float(v) > 1 for v in ppl.values())
    assert ppl["pydoc"] != ppl["stdlib"]  # two different texts, each scored on its own


def test_sparsity_with_an_allocation_variant_is_refused():
    with pytest.raises(UsageError, match="--allocation depth spreads a --budget"):
        Job("smollm2-135m", sparsity=0.5, allocation="depth")


@pytest.mark.parametrize("how", ["zscore", "depth"])
def test_the_job_prunes_to_the_allocation_variants_counts(tiny_gguf, how):  # noqa: F811
    """The widths of the job's model are exactly ``allocation.counts`` of the job's own Fisher
    scores (recomputed here from the same batches), not the global allocation's."""
    from ecospa import allocation
    from ecospa.importance import ESTIMATORS, fisher
    from ecospa.io.data import batch_at
    from ecospa.io.load import encode, load_model
    from ecospa.jobs.compress import group_params
    from ecospa.train.step import lm_loss
    loaded = load_model(str(tiny_gguf))
    cfg, dense, tok = loaded
    fam = family_of(cfg)
    groups = fam.coupled_groups(cfg)
    job = Job(str(tiny_gguf), budget=0.4, allocation=how, eval_extra=(), **dict(FAST, steps=0))
    params = _job_params(job, loaded)
    ids = encode(tok, corpus("pydoc", "train"))
    calib = [batch_at(ids, 10_000 + i, job.batch_size, job.seq_len, job.seed + 1) for i in range(job.calib_batches)]
    scores = fisher(lm_loss(fam.forward, cfg), dense, groups, calib, estimator=ESTIMATORS[job.estimator](groups))
    want = allocation.counts(how, dense, groups, scores, group_params(dense, groups) * 0.6)
    got = {g.name: g.sizes(params)[1] for g in groups}
    assert got == want
    assert got != allocation.counts("global", dense, groups, scores, group_params(dense, groups) * 0.6)
