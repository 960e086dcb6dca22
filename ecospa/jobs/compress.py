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
import sys
import time
from typing import Callable, Mapping, Optional

import optree
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ecospa import _progress, optim
from ecospa._text import aligned
from ecospa._tree import count_params, get_path, leaf_paths
from ecospa.errors import UsageError
from ecospa.func.families import family_of
from ecospa.func.layerwise import (CE, at_least_f32, chunked_loss, distill_loss, layer_grad_and_value, layer_reads,
                                   lm_layer_grads)
from ecospa.importance import ESTIMATORS, fisher
from ecospa.io import checkpoint, load
from ecospa.io.data import batch_at, corpus
from ecospa.io.files import exclusive, write_errors
from ecospa.io.load import checkpoint_tokenizer_spec, encode, load_tokenizer, run_checkpoint
from ecospa.jobs import eval_cache
from ecospa.jobs.evaluate import perplexity
from ecospa.jobs.generate import generate
from ecospa.jobs.compress_job import Job, check_out_dir
from ecospa.jobs.phases import Phases
from ecospa.jobs.export import (GGUF_LAYOUTS, export, source_general_info, source_special_tokens,
                                source_tokenizer_info)
from ecospa.prune import slice_units
from ecospa.func.reconstruct import obs_refit, obs_scores, reconstruct
from ecospa.schedule import dense_sizes, round_target, warmup_cosine
from ecospa.select import check_target, keep_top, select
from ecospa.train.step import lm_loss, make_step

EXTRA_CHARS = 2_000_000  # of each extra held-out source's val split: far more than 40 windows need


def _clean_cut(text: str, start: int) -> int:
    """The first index >= ``start`` just after a newline that has non-whitespace on both sides, or
    -1: the byte-level BPE pre-tokenizers (GPT-2, Llama 3, Qwen2, SmolLM) split there, so the
    tokens before it do not depend on the text after it."""
    i = text.find("\n", max(start, 1))
    while i != -1 and i + 1 < len(text):
        if not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.find("\n", i + 1)
    return -1


def leading_ids(tok, text: str, need: Optional[int], margin: int = 256) -> torch.Tensor:
    """The token ids of ``text`` that the first ``need`` tokens are read from: the whole text's
    (None), or those of a prefix cut at a clean line boundary (``_clean_cut``) that yields at least
    ``need + margin`` tokens, so the first ``need`` ids are the whole text's own. The held-out
    evaluation reads ``eval_windows x eval_seq_len + 1`` tokens: encoding 2 M characters for
    them kept ~100 MB of the tokenizer's buffers resident for the rest of the job."""
    chars = 8 * (need + margin) if need is not None else len(text)
    while chars < len(text):
        cut = _clean_cut(text, chars)
        if cut == -1:
            break
        ids = encode(tok, text[:cut])
        if ids.numel() >= need + margin:
            return ids
        chars *= 2
    return encode(tok, text)


class RecoveryDiverged(ValueError):
    """The recovery fine-tune produced a NaN/inf loss or parameters; nothing was saved."""


def group_params(params, groups) -> int:
    """Parameters that belong to the coupled groups (the part pruning can remove)."""
    return sum(get_path(params, m.path).numel() for g in groups for m in g.members if m.masked)


def _keep(job: Job, r: int, params, dense_sizes_, groups, scores, obs) -> dict:
    """Round r's kept units: the cumulative target (a linear ramp, relative to the dense model)
    turned into per-group counts by ``schedule.round_target`` (spread by ``--allocation``); with ``rank_by="obs"`` the units
    of the vo/mlp groups are then chosen by their error after the refit, not by ``scores``."""
    frac = r / job.rounds
    if job.budget is not None:
        target = job.budget * frac
    elif isinstance(job.sparsity, Mapping):
        target = {k: v * frac for k, v in job.sparsity.items()}
    else:
        target = job.sparsity * frac
    counts = round_target(target, groups, dense_sizes_, params, by="budget" if job.budget is not None else "sparsity",
                          scores=scores, allocation=job.allocation, multiple_of=job.multiple_of)["counts"]
    keep = select(params, groups, scores, counts=counts)
    if obs is not None:
        keep.update({g: keep_top(obs[g], keep[g].shape[1]) for g in obs})
    return keep


def _calib_grads(job: Job, fam, cfg, est):
    """The calibration's gradient function: one layer at a time when ``--layerwise`` and the
    estimator reads only layer leaves of a decoder; None (``torch.func.grad``) otherwise."""
    reads = getattr(est, "reads", None)
    if not job.layerwise or not fam.decoder or not reads or layer_reads(reads) is None:
        return None
    return lm_layer_grads(fam, cfg, reads)


def _owned(params, *others, skip=()):
    """``params`` with a copy of every leaf whose storage a tree in ``others`` also uses (the
    leaves pruning left as they were are the dense model's own tensors): what an in-place update
    of ``params`` may write without changing ``others``. The top-level leaves named in ``skip``
    (held fixed by recovery, never written) stay shared."""
    theirs = {x.untyped_storage().data_ptr() for t in others if t is not None
              for x in optree.tree_leaves(t, namespace="") if torch.is_tensor(x)}
    own = optree.tree_map(lambda x: x.clone() if torch.is_tensor(x) and
                          x.untyped_storage().data_ptr() in theirs else x,
                          {k: v for k, v in params.items() if k not in skip}, namespace="")
    return {k: own[k] if k in own else v for k, v in params.items()}


def _losses(fam, cfg, teacher, job: Job):
    """(calibration loss, recovery loss, recovery's gradient function): ``lm_loss``, and with
    ``--distill`` a mix of it and the KL divergence to the dense ``teacher``'s logits
    (``--distill-weight 1``: KL only). The teacher runs once per step, under no_grad, outside
    what is differentiated. With ``--layerwise`` (a decoder), recovery's gradient and loss come
    from ``layer_grad_and_value`` on the same loss written per token; else None
    (``torch.func.grad_and_value`` of the recovery loss)."""
    forward = fam.forward
    ce = lm_loss(forward, cfg)

    def distill(params, batch):
        logits = forward(params, batch[:, :-1], cfg)
        with torch.no_grad():
            ref = forward(teacher, batch[:, :-1], cfg)
        kl = F.kl_div(F.log_softmax(at_least_f32(logits), -1).flatten(0, 1),  # float32 under autocast too
                      F.log_softmax(at_least_f32(ref), -1).flatten(0, 1), log_target=True, reduction="batchmean")
        if job.distill_weight == 1.0:
            return kl
        hard = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        return (1 - job.distill_weight) * hard + job.distill_weight * kl

    by_layer = None
    if job.layerwise and fam.decoder:
        per_token = distill_loss(fam, cfg, teacher, job.distill_weight) if job.distill else CE
        by_layer = layer_grad_and_value(fam, cfg, per_token, frozen=frozen_leaves(fam, job))
    return ce, (distill if job.distill else ce), by_layer


def frozen_leaves(fam, job: Job) -> tuple:
    """The top-level leaves recovery holds fixed: the token embedding with
    ``--no-train-embedding`` (with a tied head, the head too), else none."""
    return () if job.train_embedding else (fam.embed_leaf,)


GEN_BATCH = 16  # sequences sampled at a time for --teacher-rows


def teacher_text(teacher, cfg, ids: torch.Tensor, job: Job, on_token=None) -> torch.Tensor:
    """``--teacher-pool`` sequences [N, seq_len + 1] sampled from the dense model at temperature 1,
    each started from one token of the TRAIN text (``ids``; the rest is the model's own text):
    general text for the distillation that no external corpus provides. Deterministic in
    ``job.seed``."""
    return sampled_text(teacher, cfg, ids, job.teacher_pool, job.seq_len, job.seed, on_token)


def sampled_text(teacher, cfg, ids: torch.Tensor, n: int, seq_len: int, seed: int, on_token=None) -> torch.Tensor:
    """``n`` sequences [n, seq_len + 1] sampled from ``teacher`` at temperature 1, each started from
    one token of the TRAIN text ``ids`` (the tokens chosen with ``seed + 3``, the samples drawn with
    ``seed + i`` for the i-th sequence of each GEN_BATCH), GEN_BATCH at a time."""
    starts = batch_at(ids, 0, n, 1, seed + 3)[:, :1]  # [N, 1]: one TRAIN token each
    rows = []
    for i in range(0, n, GEN_BATCH):
        rows.append(generate(teacher, cfg, starts[i:i + GEN_BATCH], seq_len, temperature=1.0,
                             seed=seed + i, on_token=on_token))
    return torch.cat(rows)


def calib_rows(job: Job) -> int:
    """Rows of every gradient-free batch taken from the sampled text (``--calib-text``)."""
    return {"train": 0, "teacher": job.batch_size, "mix": job.batch_size // 2}[job.calib_text]


def calib_batch(ids: torch.Tensor, pool: Optional[torch.Tensor], job: Job, index: int, slot: int,
                seed: int) -> torch.Tensor:
    """A calibration / obs / refit batch [batch_size, seq_len + 1]: TRAIN windows (``batch_at(ids,
    index, ..., seed)``), of which the last ``calib_rows(job)`` are the sampled pool's rows of batch
    ``slot`` (every batch of a round its own rows: slot * k ... slot * k + k - 1)."""
    k = calib_rows(job)
    train = batch_at(ids, index, job.batch_size - k, job.seq_len, seed) if k < job.batch_size else None
    if not k:
        return train
    picked = pool[torch.arange(slot * k, (slot + 1) * k) % pool.shape[0]]
    return picked if train is None else torch.cat([train, picked])


def recovery_batch(ids: torch.Tensor, pool: Optional[torch.Tensor], job: Job, step: int,
                   seed: int) -> torch.Tensor:
    """Recovery step ``step``'s batch [batch_size, seq_len + 1]: TRAIN windows, of which the last
    ``--teacher-rows`` are the pool's sequences in turn (step * rows + j, cycled)."""
    k = job.teacher_rows if pool is not None else 0
    train = batch_at(ids, step, job.batch_size - k, job.seq_len, seed) if k < job.batch_size else None
    if not k:
        return train
    picked = pool[torch.arange(step * k, (step + 1) * k) % pool.shape[0]]
    return picked if train is None else torch.cat([train, picked])


def recover(train_loss, params, ids, job: Job, steps: int, seed: int, on_step=None,
            grad_and_value=None, frozen=(), pool: Optional[torch.Tensor] = None):
    """``steps`` AdamW steps on random TRAIN windows; returns (params, last losses).
    ``on_step(i, params)`` runs after step i (1-based), e.g. to evaluate a curve.
    ``frozen``: top-level leaves held fixed (no gradient, no AdamW moments; never written, so
    they may share storage with the teacher); ``grad_and_value`` then returns no gradient for
    them (``layer_grad_and_value(..., frozen=...)``). ``pool``: the dense model's text
    (``teacher_text``), ``--teacher-rows`` rows of every batch (``recovery_batch``).

    Raises ``RecoveryDiverged`` as soon as a loss is NaN/inf, and at the end if the params are
    not finite (the last update comes after the last loss that was seen).
    """
    if not steps:  # no optimizer state for no step (AdamW's moments are two more models)
        check_finite(params, "after 0 recovery steps")
        return params, []
    lr = job.lr if job.lr_schedule == "constant" or not steps else \
        warmup_cosine(job.lr, min(job.warmup, steps), steps)
    fixed = {k: params[k] for k in frozen}
    order = list(params)
    if fixed:  # train the rest: the loss and gradient see the fixed leaves, the optimizer does not
        params = {k: v for k, v in params.items() if k not in fixed}
        loss_of, grad_and_value = train_loss, grad_and_value and (
            lambda rest, batch, fn=grad_and_value: fn({**rest, **fixed}, batch))
        train_loss = lambda rest, batch: loss_of({**rest, **fixed}, batch)  # noqa: E731
    whole = (lambda p: {k: p[k] if k in p else fixed[k] for k in order}) if fixed else (lambda p: p)
    if job.recovery_dtype != "float32":  # the loss and the gradient under autocast; AdamW float32
        train_loss, grad_and_value = (None if f is None else autocast(f, job.recovery_dtype)
                                      for f in (train_loss, grad_and_value))
    opt = optim.adamw(lr, weight_decay=0.0)
    state = opt.init(params)
    # donate: AdamW updates the params and its moments in place (no second model and moments at
    # the update); the caller gives params that share no tensor with another tree (``_owned``)
    step_fn = make_step(train_loss, opt, micro_batch=None if grad_and_value else job.micro_batch,
                        grad_and_value=grad_and_value, donate=True)
    losses = []
    bar = _phase(job, steps, "recover", "step")
    for step in range(steps):
        # the step's gradients are not kept: held until the next step returned, they would sit
        # beside that step's own gradients at its peak
        new_params, new_state, loss = step_fn(params, state, recovery_batch(ids, pool, job, step, seed))[:3]
        if not math.isfinite(float(loss)):
            bar.close()
            raise RecoveryDiverged(
                f"recovery diverged: the loss became {float(loss)} at step {step + 1} of {steps} "
                f"(--lr {job.lr}); nothing was saved. Use a smaller --lr (default 2e-4)")
        params, state = new_params, new_state
        losses.append(float(loss))
        if on_step is not None:
            on_step(step + 1, whole(params))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.update(1)
    bar.close()
    params = whole(params)
    check_finite(params, f"after {steps} recovery steps with --lr {job.lr}")
    return params, losses


def autocast(fn: Callable, dtype: str) -> Callable:
    """``fn(params, batch)`` run under ``torch.autocast`` at ``dtype`` (``--recovery-dtype``) on the
    params' device: matmuls in that dtype, float32 params get float32 gradients."""
    low = getattr(torch, dtype)

    def run(params, batch):
        device = next(x for x in optree.tree_leaves(params, namespace="") if torch.is_tensor(x)).device
        with torch.autocast(device.type, dtype=low):
            return fn(params, batch)
    return run


def _phase(job: Job, total: int, desc: str, unit: str):
    """The progress of one phase (``ecospa._progress.bar``): a bar on a terminal, lines in a log."""
    return _progress.bar(total, desc, unit, enabled=None if job.progress else False)


def _ticks(bar) -> Callable[[int, Optional[int]], None]:
    """An ``on_batch`` / ``on_layer`` callback that advances ``bar`` by one."""
    return lambda i, n: bar.update(1)


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
    if job.out:  # one job per output directory, from the start (not only at the save)
        with exclusive(job.out):
            return _compress(job, loaded)
    return _compress(job, loaded)


def _compress(job: Job, loaded) -> dict:
    torch.manual_seed(job.seed)
    texts = corpus(job.data, "train"), corpus(job.data, "val")  # a bad --data fails before loading
    ph = Phases()  # wall time and peak resident memory of each phase -> summary["phases"]
    with ph("load"):
        cfg, dense, tok = loaded if loaded is not None else load.load_model(job.model)
    fam = family_of(cfg)
    forward, groups = fam.forward, fam.coupled_groups(cfg)
    try:
        check_target(groups, sparsity=job.sparsity, budget=job.budget)
    except ValueError as err:
        raise UsageError(str(err)) from err
    with ph("encode"):
        train_ids, val_ids = encode(tok, texts[0]), encode(tok, texts[1])
        need = job.eval_windows * job.eval_seq_len + 1 if job.eval_windows else None
        extra_ids = {src: leading_ids(tok, corpus(src, "val", max_chars=EXTRA_CHARS), need)
                     for src in job.eval_extra}
    ev = dict(seq_len=job.eval_seq_len, batch_size=job.eval_batch_size,
              max_windows=job.eval_windows, progress=job.progress,
              loss_fn=chunked_loss(fam, cfg) if job.layerwise and fam.decoder else None)

    def held_out(p) -> dict:
        """Perplexity on each extra held-out source (never calibrated or recovered on)."""
        return {src: perplexity(forward, p, cfg, ids, **ev) for src, ids in extra_ids.items()}

    with ph("eval dense"):  # or read from the cache of earlier jobs on the same weights and windows
        ppl_dense, extra_dense, from_cache = _dense_perplexities(job, forward, dense, cfg, val_ids, extra_ids, ev)
    if from_cache and job.progress:
        tqdm.write(f"dense held-out ppl of {', '.join(from_cache)} read from the evaluation cache "
                   f"({eval_cache.cache_dir()}; --no-eval-cache evaluates again)")
    out = {"model": job.model, "ppl_dense": ppl_dense, "ppl_dense_extra": extra_dense,
           "dense_eval_cached": from_cache, "calibration_tokens": 0, "rounds": [], "curve": []}
    # the dense model is needed for the refit of every round and, with --distill and recovery
    # steps, as the teacher; otherwise it is dropped after the last refit (its sizes, bytes and
    # latency are taken now), so the held-out evaluation holds one model, not two
    keep_dense = job.distill and job.per_round > 0
    frozen = frozen_leaves(fam, job)
    pool = None
    if job.teacher_rows and job.per_round:
        with ph("teacher text"):
            bar = _phase(job, job.teacher_pool * job.seq_len, "teacher text", "token")
            pool = teacher_text(dense, cfg, train_ids, job, on_token=lambda col: bar.update(col.numel()))
            bar.close()
    calib_pool = None
    if calib_rows(job):  # one batch's own sequences for each calibration and refit batch
        n = calib_rows(job) * (job.calib_batches + (job.recon_batches if job.reconstruct or job.rank_by == "obs" else 0))
        with ph("calibration text"):
            bar = _phase(job, n * job.seq_len, "calibration text", "token")
            calib_pool = sampled_text(dense, cfg, train_ids, n, job.seq_len, job.seed + 7,
                                      on_token=lambda col: bar.update(col.numel()))
            bar.close()
    ce, train_loss, train_grads = _losses(fam, cfg, dense if keep_dense else None, job)
    params, per_round = dense, job.per_round
    sizes = dense_sizes(dense, groups)
    dense_info = _sizes(dense, dense, groups) | {"dense_bytes": _nbytes(dense)}
    with ph("latency"):
        dense_latency = latency(forward, dense, cfg, job.eval_seq_len)
    for r in range(1, job.rounds + 1):
        est = ESTIMATORS[job.estimator](groups, seed=job.seed)
        calib = [calib_batch(train_ids, calib_pool, job, 10_000 * r + i, i, job.seed + 1)
                 for i in range(job.calib_batches)]
        refit = [calib_batch(train_ids, calib_pool, job, 10_000 * r + 5_000 + i, job.calib_batches + i, job.seed + 2)
                 for i in range(job.recon_batches)] if job.reconstruct or job.rank_by == "obs" else []
        out["calibration_tokens"] += sum(b.numel() for b in calib + refit)
        with ph("calibrate"):
            bar = _phase(job, len(calib), "calibrate", "batch")
            by_layer = _calib_grads(job, fam, cfg, est)  # one layer's activations: whole batches
            scores = fisher(ce, params, groups, calib, estimator=est, on_batch=_ticks(bar),
                            micro_batch=None if by_layer else job.micro_batch, grad_fn=by_layer)
            bar.close()
        obs, fused = None, job.rank_by == "obs" and job.reconstruct
        if fused:  # one pass: the obs scores, the choice, the slicing and the refit (obs_refit)
            t0 = time.perf_counter()
            counts = _keep(job, r, params, sizes, groups, scores, None)
            release = r == job.rounds and not keep_dense
            if release:  # nothing reads the dense model (nor this round's source) after this pass: handed
                # over, each dense layer freed once its pruned layer exists (the peak holds ~one model)
                source = {**params, "layers": list(params["layers"])}
                reference = source if params is dense else {**dense, "layers": list(dense["layers"])}
                params = dense = None
            else:
                source, reference = params, dense
            with ph("obs scores + refit"):
                bar = _phase(job, cfg.n_layers, "obs scores + refit", "layer")
                fit = obs_refit(source, reference, cfg, groups, refit, counts, ridge=job.ridge, obs_ridge=job.obs_ridge,
                                target=job.recon_target, keep_pruned=True, cache_inner=False, release=release,
                                on_layer=_ticks(bar))
                bar.close()
            del source, reference
            seconds = time.perf_counter() - t0
            with ph("eval pruned"):  # the model before the refit, then dropped
                row = {"ppl_pruned": perplexity(forward, fit.pruned, cfg, val_ids, **ev), "reconstruct_seconds": seconds}
            params = fit.params
            del fit
        elif job.rank_by == "obs":
            with ph("obs scores"):
                bar = _phase(job, cfg.n_layers, "obs scores", "layer")
                obs = obs_scores(params, cfg, groups, refit, on_layer=_ticks(bar),
                                 ridge=job.ridge if job.obs_ridge is None else job.obs_ridge)
                bar.close()
        if not fused:
            with ph("prune"):
                params = slice_units(params, groups, _keep(job, r, params, sizes, groups, scores, obs))
            with ph("eval pruned"):
                row = {"ppl_pruned": perplexity(forward, params, cfg, val_ids, **ev)}
        if job.reconstruct and not fused:
            t0 = time.perf_counter()
            with ph("refit"):
                bar = _phase(job, cfg.n_layers, "refit", "layer")
                # in place: the pruned tree before the refit is not read again (dense's leaves never
                # written); inner activations recomputed, not kept per batch (-0.11 GB at 32 batches, +9% time)
                params = reconstruct(params, dense, cfg, refit, ridge=job.ridge, target=job.recon_target,
                                     on_layer=_ticks(bar), donate=True, cache_inner=False)
                bar.close()
            row.update(reconstruct_seconds=time.perf_counter() - t0)
        if r == job.rounds and not keep_dense:
            dense = None  # nothing reads it from here on
        if job.reconstruct:
            with ph("eval refit"):
                row.update(ppl_reconstructed=perplexity(forward, params, cfg, val_ids, **ev))
        if job.progress:
            done = row.get("ppl_reconstructed", row["ppl_pruned"])
            tqdm.write(f"round {r}: {1 - group_params(params, groups) / dense_info['group_params']:.1%}"
                       f" of group params removed, held-out ppl {ppl_dense:.2f} -> {row['ppl_pruned']:.2f}"
                       + (f" -> {done:.2f} after the refit" if job.reconstruct else ""))
            sys.stdout.flush()  # in a log too, when it is known (not at the end of the job)

        def point(i, p, done=(r - 1) * per_round):
            """A curve point at the job's recovery step done + i (``--eval-at``)."""
            if done + i in job.eval_at:
                pt = {"step": done + i, "ppl": perplexity(forward, p, cfg, val_ids, **ev), "ppl_extra": held_out(p)}
                out["curve"].append(pt)
                if job.progress:  # in the log when it is known: a long job stopped later keeps it
                    tqdm.write(f"recovery step {pt['step']}: held-out ppl {pt['ppl']:.2f}"
                               + "".join(f", {src} {v:.2f}" for src, v in pt["ppl_extra"].items()))
                    sys.stdout.flush()

        t0 = time.perf_counter()
        with ph("recover"):  # with its --eval-at curve points
            if per_round:  # recovery updates params in place: never the teacher, nor the model a
                # caller passed as loaded= (without --distill, dense is already dropped here); a
                # fixed leaf stays shared
                params = _owned(params, dense, loaded[1] if loaded is not None else None,
                                skip=frozen)
            params, losses = recover(train_loss, params, train_ids, job, per_round, job.seed + r, point,
                                     grad_and_value=train_grads, frozen=frozen, pool=pool)
        last = out["curve"][-1] if out["curve"] and out["curve"][-1]["step"] == r * per_round else None
        row.update(steps=per_round, recover_seconds=time.perf_counter() - t0,
                   final_train_loss=losses[-1] if losses else None)
        with ph("eval recovered"):
            row.update(ppl_recovered=(last["ppl"] if last else perplexity(forward, params, cfg, val_ids, **ev))
                       if per_round else row.get("ppl_reconstructed", row["ppl_pruned"]))
        out["rounds"].append(row)
    # the final params were just evaluated when the curve's last point is the last step
    with ph("eval held-out"):
        out["ppl_extra"] = last["ppl_extra"] if last else held_out(params)
    with ph("latency"):
        ratio = dense_latency / latency(forward, params, cfg, job.eval_seq_len)
    out.update(_sizes(dense_info, params, groups), ppl_pruned=out["rounds"][0]["ppl_pruned"],
               ppl_reconstructed=out["rounds"][0].get("ppl_reconstructed"),
               ppl_recovered=out["rounds"][-1]["ppl_recovered"], latency_ratio=ratio,
               job=dataclasses.asdict(job))
    out.update(phases=ph.rows, phase_seconds=ph.seconds(), peak_rss_mb=ph.peak_mb(),
               peak_rss_exact=ph.exact, dense_bytes=dense_info["dense_bytes"])
    with ph("save"):
        _save(job, params, cfg, out)
    out.update(phases=ph.rows, phase_seconds=ph.seconds(), peak_rss_mb=ph.peak_mb())  # with the save
    return out


def _dense_perplexities(job: Job, forward, dense, cfg, val_ids, extra_ids: dict, ev: dict):
    """The dense model's perplexity on the VAL split of ``job.data`` and on each extra source:
    ``job.ppl_dense`` / ``job.ppl_dense_extra`` when given, else from ``eval_cache`` (keyed by the
    weights, the tokens and the settings) or evaluated. Returns (ppl, {source: ppl}, [sources read
    from the cache])."""
    need = job.ppl_dense is None or not job.ppl_dense_extra
    model = eval_cache.fingerprint(dense, cfg) if job.eval_cache and need else None
    settings = dict(seq_len=ev["seq_len"], batch_size=ev["batch_size"], max_windows=ev["max_windows"],
                    chunked_loss=ev["loss_fn"] is not None)
    hits = []

    def one(src, ids):
        ppl, hit = eval_cache.cached(lambda: perplexity(forward, dense, cfg, ids, **ev), model, ids, settings,
                                     {"model": job.model, "source": src})
        hits.extend([src] * hit)
        return ppl

    ppl = job.ppl_dense or one(job.data, val_ids)
    extra = dict(job.ppl_dense_extra) if job.ppl_dense_extra else {s: one(s, ids) for s, ids in extra_ids.items()}
    return ppl, extra, hits


def _nbytes(tree) -> int:
    """Bytes of the tree's tensors (the dense model: what peak memory is measured against)."""
    return sum(get_path(tree, p).numel() * get_path(tree, p).element_size() for p in leaf_paths(tree)
               if torch.is_tensor(get_path(tree, p)))


def _sizes(dense, params, groups) -> dict:
    """Parameter counts; ``dense`` is the dense tree or an earlier ``_sizes`` of it."""
    if "layers" in dense:
        dense = {"dense_params": count_params(dense), "group_params": group_params(dense, groups),
                 "block_params": count_params(dense["layers"])}
    return {"dense_params": dense["dense_params"], "kept_params": count_params(params),
            "group_params": dense["group_params"], "block_params": dense["block_params"],
            "group_fraction_removed": 1 - group_params(params, groups) / dense["group_params"],
            "block_fraction_removed": 1 - count_params(params["layers"]) / dense["block_params"]}


def _tokenizer_spec(model: str) -> Optional[str]:
    """What ``models.load_tokenizer`` needs later: the source spec, or a checkpoint's own
    (a compress checkpoint's ``extra["tokenizer"]``, a train checkpoint's train config)."""
    model = run_checkpoint(model)
    if os.path.isfile(os.path.join(model, "manifest.json")):
        return checkpoint_tokenizer_spec(model)
    return model if not os.path.exists(model) else os.path.abspath(model)


def _save(job: Job, params, cfg, summary: dict) -> None:
    """The checkpoint first (the job's result), then the exports: a failed export (disk full, a
    format that cannot hold the tree) is recorded in ``summary["export_failed"]`` and leaves the
    checkpoint as saved."""
    check_finite(params, "before saving")
    if job.out:
        check_out_dir(job.out, overwrite=job.overwrite)  # again: it may have changed while we computed
        if os.path.isdir(job.out) and not os.listdir(job.out):
            os.rmdir(job.out)  # an empty directory given as --out: the checkpoint takes its place
        with write_errors(job.out, "no checkpoint was saved (an earlier one at --out is unchanged)"):
            checkpoint.save(job.out, params, cfg,
                            extra={"tokenizer": _tokenizer_spec(job.model), "summary": summary})
    failed = []
    for flag, path, fmt in (("--export-hf", job.export_hf, "hf-padded"),
                            ("--export", job.export, job.export_format)):
        if not path:
            continue
        try:
            res = export(params, cfg, path, fmt, tokenizer=load_tokenizer(_tokenizer_spec(job.model)),
                         tokenizer_info=source_tokenizer_info(job.model) if fmt in GGUF_LAYOUTS else None,
                         special_tokens=source_special_tokens(job.model) if fmt not in GGUF_LAYOUTS else None,
                         general=source_general_info(job.model) if fmt in GGUF_LAYOUTS else None,
                         overwrite=job.overwrite)
            summary[flag.lstrip("-").replace("-", "_")] = f"{res['format']}: {res['path']}"
        except (OSError, ValueError, RuntimeError) as err:
            summary[flag.lstrip("-").replace("-", "_")] = f"FAILED: {message_of(err)}"
            failed.append(f"{flag} {path}: {message_of(err)}")
    if failed:
        kept = (f"the compressed model IS saved at {os.path.abspath(job.out)}; export it again with "
                f"`ecospa export --model {job.out} --format FORMAT --out PATH`" if job.out
                else "nothing was saved (no --out)")
        summary["export_failed"] = "; ".join(failed) + f" ({kept})"


def message_of(err: BaseException) -> str:
    return " ".join((str(err) or type(err).__name__).split())


def table(summary: dict) -> str:
    """The final summary as an aligned text table."""
    rows = [("dense params", f"{summary['dense_params'] / 1e6:.2f}M"),
            ("kept params", f"{summary['kept_params'] / 1e6:.2f}M"),
            ("coupled-group params removed", f"{summary['group_fraction_removed']:.1%}"),
            ("block params removed", f"{summary['block_fraction_removed']:.1%}"),
            ("ppl dense", f"{summary['ppl_dense']:.2f}")]
    for i, r in enumerate(summary["rounds"], 1):
        rows.append((f"ppl after prune (round {i})", f"{r['ppl_pruned']:.2f}"))
        if r.get("ppl_reconstructed") is not None:
            rows.append((f"ppl after the refit (round {i})", f"{r['ppl_reconstructed']:.2f}"))
        rows.append((f"ppl after recovery (round {i}, {r['steps']} steps)", f"{r['ppl_recovered']:.2f}"))
    for c in summary.get("curve", []):
        extra = "".join(f", {src} {v:.2f}" for src, v in c["ppl_extra"].items())
        rows.append((f"ppl at recovery step {c['step']}", f"{c['ppl']:.2f}{extra}"))
    for src, dense_ppl in summary.get("ppl_dense_extra", {}).items():
        final = summary["ppl_extra"][src]
        rows.append((f"held-out {src}: ppl dense -> final", f"{dense_ppl:.2f} -> {final:.2f} "
                     f"({final / dense_ppl:.2f}x)"))
    rows.append(("forward latency dense / pruned", f"{summary['latency_ratio']:.2f}x"))
    if "export_hf" in summary:
        rows.append(("HF export", summary["export_hf"]))
    if "export" in summary:
        rows.append(("export", summary["export"]))
    return aligned(rows)


__all__ = ["Job", "RecoveryDiverged", "compress", "recover", "check_finite", "check_out_dir",
           "latency", "group_params", "table"]
