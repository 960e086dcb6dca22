"""Compression of a pretrained model (``ecospa compress`` is ``ecospa.cli.compress``).

    load -> calibrate (coupled Fisher on TRAIN batches) -> prune to the target -> recover with a
    short AdamW fine-tune (optionally distilling the dense model) -> held-out perplexity on the
    VAL split (never used for calibration or recovery) -> save a native checkpoint (+ HF export)

``--rounds N`` repeats calibrate/prune/recover N times on a linear ramp to the final target.

Every flag and both output paths are checked before the model is loaded (``UsageError``, exit
code 2; ``ecospa.jobs.compress_job.Job``): ``--out`` must be new, empty or an earlier ecospa checkpoint; ``--export-hf`` new, empty
or an intact earlier export of ours (anything else, ``.``, a parent of the model or a link, is
refused, never deleted). A NaN/inf loss or parameter during recovery stops the job
(``RecoveryDiverged``, exit code 1) and nothing is saved.

    ecospa compress --model smollm2-135m --budget 0.5 --steps 80 --out runs/smol50
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ecospa import optim
from ecospa._text import aligned
from ecospa._tree import count_params, get_path, leaf_paths
from ecospa.errors import UsageError
from ecospa.func.families import family_of
from ecospa.importance import ESTIMATORS, fisher
from ecospa.io import checkpoint, load
from ecospa.io.data import batch_at, corpus
from ecospa.io.hf import hf_family_of
from ecospa.io.load import checkpoint_tokenizer_spec, encode, load_tokenizer, run_checkpoint
from ecospa.jobs.evaluate import perplexity
from ecospa.jobs.compress_job import Job, check_out_dir
from ecospa.jobs.export import export, source_tokenizer_info
from ecospa.prune import slice_units
from ecospa.select import check_target, select
from ecospa.train.step import lm_loss, make_step

class RecoveryDiverged(ValueError):
    """The recovery fine-tune produced a NaN/inf loss or parameters; nothing was saved."""


def group_params(params, groups) -> int:
    """Parameters that belong to the coupled groups (the part pruning can remove)."""
    return sum(get_path(params, m.path).numel() for g in groups for m in g.members if m.masked)


def _round_target(job: Job, r: int, params, dense_params, groups) -> dict:
    """select() kwargs reaching round r's cumulative target (linear ramp, relative to dense)."""
    frac = r / job.rounds
    if job.budget is not None:
        keep = group_params(dense_params, groups) * (1.0 - job.budget * frac)
        return {"budget": max(0.0, 1.0 - keep / group_params(params, groups))}
    sizes = {g.name: (g.kind, g.sizes(params)[1], g.sizes(dense_params)[1]) for g in groups}
    rel = {}
    for name, (kind, now, dense) in sizes.items():
        s = job.sparsity.get(kind, 0.0) if isinstance(job.sparsity, Mapping) else job.sparsity
        rel[name] = max(0.0, 1.0 - (1.0 - s * frac) * dense / now)
    return {"sparsity": rel}


def _select(params, groups, scores, target):
    if "budget" in target:
        return select(params, groups, scores, budget=target["budget"])
    # per-group fractions: select() keys by kind, so run it once per group
    keep = {}
    for g in groups:
        keep.update(select(params, (g,), {g.name: scores[g.name]},
                           sparsity=target["sparsity"][g.name]))
    return keep


def _losses(forward, cfg, teacher, job: Job):
    """(calibration loss, recovery loss): ``lm_loss``, and with ``--distill`` a mix of it and the
    KL divergence to the dense ``teacher``'s logits."""
    ce = lm_loss(forward, cfg)

    def distill(params, batch):
        logits = forward(params, batch[:, :-1], cfg)
        with torch.no_grad():
            ref = forward(teacher, batch[:, :-1], cfg)
        kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1), F.log_softmax(ref, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")
        hard = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        return (1 - job.distill_weight) * hard + job.distill_weight * kl

    return ce, (distill if job.distill else ce)


def recover(train_loss, params, ids, job: Job, steps: int, seed: int):
    """``steps`` AdamW steps on random TRAIN windows; returns (params, last losses).

    Raises ``RecoveryDiverged`` as soon as a loss is NaN/inf, and at the end if the params are
    not finite (the last update comes after the last loss that was seen).
    """
    opt = optim.adamw(job.lr, weight_decay=0.0)
    state = opt.init(params)
    step_fn = make_step(train_loss, opt)
    losses = []
    bar = tqdm(range(steps), desc="recover", unit="step", disable=not job.progress, leave=False)
    for step in bar:
        new_params, new_state, loss, _ = step_fn(params, state, batch_at(ids, step, job.batch_size,
                                                                          job.seq_len, seed))
        if not math.isfinite(float(loss)):
            bar.close()
            raise RecoveryDiverged(
                f"recovery diverged: the loss became {float(loss)} at step {step + 1} of {steps} "
                f"(--lr {job.lr}); nothing was saved. Use a smaller --lr (default 2e-4)")
        params, state = new_params, new_state
        losses.append(float(loss))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    check_finite(params, f"after {steps} recovery steps with --lr {job.lr}")
    return params, losses


def check_finite(params, when: str) -> None:
    """RecoveryDiverged naming the first non-finite leaf: no NaN/inf tree is ever saved."""
    for path in leaf_paths(params):
        x = get_path(params, path)
        if torch.is_tensor(x) and x.is_floating_point() and not torch.isfinite(x).all():
            name = ".".join(map(str, path))
            raise RecoveryDiverged(f"recovery diverged: parameter {name} is not finite {when}; "
                                   "nothing was saved. Use a smaller --lr (default 2e-4)")


def latency(forward, params, cfg, seq_len: int, repeats: int = 3) -> float:
    """Median seconds of one no-grad forward on [1, seq_len] tokens (after one warm-up)."""
    tokens = torch.zeros(1, seq_len, dtype=torch.long)
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            forward(params, tokens, cfg)
            if i:
                times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def compress(job: Job, loaded=None) -> dict:
    """Run the compression job; returns the summary dict (also saved with the checkpoint).

    ``loaded`` may pass an already loaded ``(cfg, params, tokenizer)`` to skip loading.
    Example: ``summary = compress(Job("smollm2-135m", out="runs/x", budget=0.5))``
    """
    torch.manual_seed(job.seed)
    texts = corpus(job.data, "train"), corpus(job.data, "val")  # a bad --data fails before loading
    cfg, dense, tok = loaded if loaded is not None else load.load_model(job.model)
    fam = family_of(cfg)
    forward, groups = fam.forward, fam.coupled_groups(cfg)
    try:
        check_target(groups, sparsity=job.sparsity, budget=job.budget)
    except ValueError as err:
        raise UsageError(str(err)) from err
    train_ids, val_ids = encode(tok, texts[0]), encode(tok, texts[1])
    ev = dict(seq_len=job.eval_seq_len, batch_size=job.eval_batch_size,
              max_windows=job.eval_windows, progress=job.progress)
    ppl_dense = job.ppl_dense or perplexity(forward, dense, cfg, val_ids, **ev)
    out = {"model": job.model, "ppl_dense": ppl_dense, "rounds": []}
    ce, train_loss = _losses(forward, cfg, dense, job)
    params, per_round = dense, max(1, job.steps // job.rounds) if job.steps else 0
    for r in range(1, job.rounds + 1):
        est = ESTIMATORS[job.estimator](groups)
        calib = [batch_at(train_ids, 10_000 * r + i, job.batch_size, job.seq_len, job.seed + 1)
                 for i in range(job.calib_batches)]
        scores = fisher(ce, params, groups, calib, estimator=est)
        params = slice_units(params, groups, _select(params, groups, scores,
                                                     _round_target(job, r, params, dense, groups)))
        pruned = perplexity(forward, params, cfg, val_ids, **ev)
        if job.progress:
            tqdm.write(f"round {r}: {1 - group_params(params, groups) / group_params(dense, groups):.1%}"
                       f" of group params removed, held-out ppl {ppl_dense:.2f} -> {pruned:.2f}")
        t0 = time.perf_counter()
        params, losses = recover(train_loss, params, train_ids, job, per_round, job.seed + r)
        seconds = time.perf_counter() - t0
        out["rounds"].append({"ppl_pruned": pruned, "ppl_recovered":
                              perplexity(forward, params, cfg, val_ids, **ev) if per_round else pruned,
                              "steps": per_round, "recover_seconds": seconds,
                              "final_train_loss": losses[-1] if losses else None})
    out.update(_sizes(dense, params, groups), ppl_pruned=out["rounds"][0]["ppl_pruned"],
               ppl_recovered=out["rounds"][-1]["ppl_recovered"],
               latency_ratio=latency(forward, dense, cfg, job.eval_seq_len)
               / latency(forward, params, cfg, job.eval_seq_len),
               job=dataclasses.asdict(job))
    _save(job, params, cfg, out)
    return out


def _sizes(dense, params, groups) -> dict:
    def blocks(p):
        return count_params(p["layers"])

    return {"dense_params": count_params(dense), "kept_params": count_params(params),
            "group_fraction_removed": 1 - group_params(params, groups) / group_params(dense, groups),
            "block_fraction_removed": 1 - blocks(params) / blocks(dense)}


def _tokenizer_spec(model: str) -> Optional[str]:
    """What ``models.load_tokenizer`` needs later: the source spec, or a checkpoint's own
    (a compress checkpoint's ``extra["tokenizer"]``, a train checkpoint's train config)."""
    model = run_checkpoint(model)
    if os.path.isfile(os.path.join(model, "manifest.json")):
        return checkpoint_tokenizer_spec(model)
    return model if not os.path.exists(model) else os.path.abspath(model)


def _save(job: Job, params, cfg, summary: dict) -> None:
    check_finite(params, "before saving")
    if job.out:
        check_out_dir(job.out)  # again: the directory may have changed while we computed
    if job.export_hf:
        try:
            hf_family_of(cfg).save_hf(params, cfg, job.export_hf)
            summary["export_hf"] = os.path.abspath(job.export_hf)
        except ValueError as err:
            summary["export_hf"] = f"not exported: {err}"
    if job.export:
        res = export(params, cfg, job.export, job.export_format,
                     tokenizer=load_tokenizer(_tokenizer_spec(job.model)),
                     tokenizer_info=source_tokenizer_info(job.model) if job.export_format == "gguf" else None)
        summary["export"] = f"{res['format']}: {res['path']}"
    if job.out:
        if os.path.isdir(job.out) and not os.listdir(job.out):
            os.rmdir(job.out)  # an empty directory given as --out: the checkpoint takes its place
        checkpoint.save(job.out, params, cfg,
                        extra={"tokenizer": _tokenizer_spec(job.model), "summary": summary})


def table(summary: dict) -> str:
    """The final summary as an aligned text table."""
    rows = [("dense params", f"{summary['dense_params'] / 1e6:.2f}M"),
            ("kept params", f"{summary['kept_params'] / 1e6:.2f}M"),
            ("coupled-group params removed", f"{summary['group_fraction_removed']:.1%}"),
            ("block params removed", f"{summary['block_fraction_removed']:.1%}"),
            ("ppl dense", f"{summary['ppl_dense']:.2f}")]
    for i, r in enumerate(summary["rounds"], 1):
        rows += [(f"ppl after prune (round {i})", f"{r['ppl_pruned']:.2f}"),
                 (f"ppl after recovery (round {i}, {r['steps']} steps)", f"{r['ppl_recovered']:.2f}")]
    rows.append(("forward latency dense / pruned", f"{summary['latency_ratio']:.2f}x"))
    if "export_hf" in summary:
        rows.append(("HF export", summary["export_hf"]))
    if "export" in summary:
        rows.append(("export", summary["export"]))
    return aligned(rows)


__all__ = ["Job", "RecoveryDiverged", "compress", "recover", "check_finite", "check_out_dir",
           "latency", "group_params", "table"]
