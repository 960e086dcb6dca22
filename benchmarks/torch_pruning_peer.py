"""Torch-Pruning (DepGraph) as a peer for the compression benchmark (benchmarks/compress.py).

The REAL SmolLM2-135M is loaded with ecospa's loader and converted to a transformers
LlamaForCausalLM (both tools start from identical weights; the logits are checked against
ecospa's forward), pruned with ``tp.pruner.MetaPruner`` following Torch-Pruning's
``examples/LLMs/prune_llm.py`` (``num_heads`` for q/k/v, ``prune_num_heads=True``,
``prune_head_dims=False`` so RoPE is untouched, ``ignored_layers=[lm_head]``), at the SAME number
of removed block parameters (q,k,v,o,gate,up,down of every layer) as ecospa's ``--budget``, then
evaluated exactly like ecospa: held-out perplexity on the pydoc VAL split in non-overlapping
512-token windows, right after pruning and after an optional recovery fine-tune with ecospa's
optimizer settings and batches (AdamW lr 2e-4, betas 0.9/0.95, eps 1e-8, no weight decay,
global grad-norm clip 1.0; 4 x 256 TRAIN windows from ``ecospa.io.data.batch_at``).

Modes (``--mode``):
  inner    heads + MLP channels only; the residual width stays (ecospa's coupled groups prune
           exactly these units). ``embed_tokens``, ``lm_head``, every ``o_proj`` and
           ``down_proj`` are ignored layers, so no hidden-size group is prunable.
  example  prune_llm.py as published: hidden size, heads and MLP channels by one ratio (the
           ratio is searched so that the block-parameter count matches); also shrinks the
           embedding and the norms.

Importances: ``magnitude`` = tp.importance.MagnitudeImportance(p=2); ``taylor`` =
tp.importance.TaylorImportance() with gradients of the mean CE over the 4 calibration batches
ecospa uses (``batch_at(train, 10_000 + i, 4, 256, seed + 1)``).

    OMP_NUM_THREADS=1 python benchmarks/torch_pruning_peer.py --importance magnitude taylor \
        --levels 0.5 0.25 --steps 0
    python benchmarks/torch_pruning_peer.py --tiny --steps 2     # smoke test on a random model

Results go to benchmarks/results/compress.json under "peers" (read-modify-write, atomic).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
from _common import write_results  # noqa: E402

from ecospa.func import llama  # noqa: E402
from ecospa.io import hf_llama  # noqa: E402
from ecospa.io.data import batch_at, corpus  # noqa: E402
from ecospa.io.load import encode, load_model, load_tokenizer  # noqa: E402
from ecospa.jobs.evaluate import nll  # noqa: E402

BLOCK = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ----------------------------------------------------------------------------- model
def hf_from_ecospa(params, cfg, attn="eager"):
    """LlamaForCausalLM holding exactly ecospa's weights (via ecospa.io.hf_llama.to_hf)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    sd, conf = hf_llama.to_hf(params, cfg)
    conf = dict(conf, attn_implementation=attn)
    model = LlamaForCausalLM(LlamaConfig(**conf))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    if cfg.tie_embeddings:
        model.tie_weights()
    return model.eval()


def block_params(model) -> int:
    """Parameters of the q,k,v,o,gate,up,down matrices of every layer."""
    return sum(m.weight.numel() for n, m in model.named_modules()
               if n.rsplit(".", 1)[-1] in BLOCK)


def all_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


def hf_forward(model):
    return lambda _params, tokens, _cfg: model(tokens, use_cache=False).logits


def ce(model, batch):
    logits = model(batch[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())


# ----------------------------------------------------------------------------- plan
def _q_heads_removed(ratio, n_heads, n_kv):
    """Query heads Torch-Pruning removes per layer for a head ratio (local GQA branch)."""
    if ratio <= 0:
        return 0
    per_kv = math.ceil(math.ceil(ratio * n_heads) / n_kv)
    return per_kv * n_kv


def _kept(n, ratio, round_to=None):
    """Channels TP keeps of n at ``ratio`` (local pruning, optional round_to)."""
    pruned = n - int(n * (1 - ratio))
    if round_to and pruned > 0:
        keep = n - pruned
        keep -= keep % round_to
        pruned = n - keep
    return n - max(pruned, 0)


def plan(mode, level, cfg, head_ratio=None):
    """(pruning_ratio, head_pruning_ratio, predicted block params kept) for a removal level.

    ``head_ratio`` (inner mode) overrides the head ratio; by default it is ``level`` as in
    prune_llm.py, capped to what Torch-Pruning can execute for GQA."""
    D, L, hq, hkv, hd, Fd = cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    dense = L * (2 * hq * hd * D + 2 * hkv * hd * D + 3 * Fd * D)
    target = dense * (1 - level)
    if mode == "inner":
        # Torch-Pruning 1.6.1 silently skips the attention group when head pruning would leave as
        # many query heads as KV heads (it no longer sees GQA after updating num_heads, keeps the
        # k/v indices, and check_pruning_group rejects the group): cap the head ratio so at least
        # two query heads per KV head remain, and give the rest of the budget to the MLP.
        capped, head_ratio = head_ratio is None, level if head_ratio is None else head_ratio
        g = hq // hkv
        while capped and head_ratio > 0 and hq - _q_heads_removed(head_ratio, hq, hkv) < min(2, g) * hkv:
            head_ratio = round(head_ratio - 0.01, 4)
        head_ratio = max(head_ratio, 0.0)
        qk = hq - _q_heads_removed(head_ratio, hq, hkv)
        attn = 2 * qk * hd * D + 2 * hkv * hd * D
        f_keep = round((target / L - attn) / (3 * D))
        f_keep = max(1, min(Fd, f_keep))
        # the smallest ratio for which TP keeps exactly f_keep channels
        ratio = (Fd - f_keep) / Fd
        for eps in (0.0, 1e-9, 1e-7, 1e-5):
            if _kept(Fd, ratio + eps) == f_keep:
                ratio += eps
                break
        kept = L * (attn + 3 * _kept(Fd, ratio) * D)
        return ratio, head_ratio, kept
    # example: one ratio for hidden, heads and MLP (round_to=4 as in prune_llm.py)
    best = None
    for i in range(1, 1000):
        r = i / 1000
        d = _kept(D, r, 4)
        qk = hq - _q_heads_removed(r, hq, hkv)
        f = _kept(Fd, r, 4)
        kept = L * (2 * qk * hd * d + 2 * hkv * hd * d + 3 * f * d)
        if best is None or abs(kept - target) < abs(best[2] - target):
            best = (r, r, kept)
    return best


# ----------------------------------------------------------------------------- prune
def prune(model, cfg, mode, importance, level, calib, log, head_ratio=None):
    import torch_pruning as tp

    ratio, head_ratio, predicted = plan(mode, level, cfg, head_ratio)
    log(f"plan: mode={mode} pruning_ratio={ratio:.6f} head_pruning_ratio={head_ratio:.4f} "
        f"predicted block params kept {predicted}")
    num_heads = {}
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[m.q_proj] = model.config.num_attention_heads
            num_heads[m.k_proj] = model.config.num_key_value_heads
            num_heads[m.v_proj] = model.config.num_key_value_heads
    ignored = [model.lm_head]
    if mode == "inner":
        ignored += [model.model.embed_tokens]
        for layer in model.model.layers:
            ignored += [layer.self_attn.o_proj, layer.mlp.down_proj]
    if importance == "magnitude":
        imp = tp.importance.MagnitudeImportance(p=2)
    elif importance == "taylor":
        imp = tp.importance.TaylorImportance()
    else:
        raise ValueError(importance)
    example = calib[0][:1, :64]
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, importance=imp, global_pruning=False,
        pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
        prune_num_heads=True, prune_head_dims=False, head_pruning_ratio=head_ratio,
        round_to=4 if mode == "example" else None,
        forward_fn=lambda m, x: m(x, use_cache=False).logits)
    if importance == "taylor":
        model.zero_grad()
        for batch in calib:
            (ce(model, batch) / len(calib)).backward()
    n_groups = 0
    for g in pruner.step(interactive=True):
        g.prune()
        n_groups += 1
    model.zero_grad(set_to_none=True)
    del pruner
    # update attributes as prune_llm.py does (head_dim is never changed: prune_head_dims=False)
    heads = set()
    for name, m in model.named_modules():
        if name.endswith("self_attn"):
            hq = m.q_proj.out_features // m.head_dim
            hkv = m.k_proj.out_features // m.head_dim
            if hq % hkv:
                raise RuntimeError(f"{name}: {hq} query heads do not divide over {hkv} KV heads")
            m.num_key_value_groups = hq // hkv
            heads.add((hq, hkv))
        elif name.endswith("mlp"):
            model.config.intermediate_size = m.gate_proj.out_features
    want = cfg.n_heads - _q_heads_removed(head_ratio, cfg.n_heads, cfg.n_kv_heads)
    if len(heads) != 1 or next(iter(heads))[0] != want:
        log(f"WARNING: Torch-Pruning left query heads {sorted(heads)}; the plan asked for {want} "
            f"(head_pruning_ratio {head_ratio})")
    if len(heads) != 1:
        raise RuntimeError(f"heterogeneous heads per layer {heads}: the HF config cannot say it")
    (hq, hkv), = heads
    model.config.num_attention_heads, model.config.num_key_value_heads = hq, hkv
    model.config.hidden_size = model.lm_head.in_features
    info = {"pruning_ratio": ratio, "head_pruning_ratio": head_ratio, "groups_pruned": n_groups,
            "heads_after": [hq, hkv], "head_dim": model.model.layers[0].self_attn.head_dim,
            "hidden_after": model.config.hidden_size,
            "mlp_after": sorted({l.mlp.gate_proj.out_features for l in model.model.layers}),
            "predicted_block_params_kept": predicted}
    return info


def check_equivalent(dense, pruned, tokens):
    """Max |logit diff| between the pruned model and the DENSE model with the removed query heads
    (o_proj columns) and MLP channels (down_proj columns) zeroed: 0 up to rounding iff Torch-Pruning
    removed whole heads/channels and the pruned HF model maps query heads to the right KV heads."""
    import copy
    masked = copy.deepcopy(dense)
    with torch.no_grad():
        for ld, lp in zip(masked.model.layers, pruned.model.layers):
            a, b = ld.self_attn, lp.self_attn
            hd = a.head_dim
            if not torch.equal(a.k_proj.weight, b.k_proj.weight) or \
                    not torch.equal(a.v_proj.weight, b.v_proj.weight):
                raise RuntimeError("k_proj/v_proj changed: KV heads were pruned")
            dq = a.q_proj.weight.view(-1, hd, a.q_proj.in_features)
            pq = b.q_proj.weight.view(-1, hd, b.q_proj.in_features)
            kept = [next(i for i in range(dq.shape[0]) if torch.equal(dq[i], pq[j]))
                    for j in range(pq.shape[0])]
            for h in set(range(dq.shape[0])) - set(kept):
                a.o_proj.weight[:, h * hd:(h + 1) * hd] = 0
            gd, gp = ld.mlp.gate_proj.weight, lp.mlp.gate_proj.weight
            rows = {tuple(r.tolist()): i for i, r in enumerate(gd)}
            keep_f = {rows[tuple(r.tolist())] for r in gp}
            drop = sorted(set(range(gd.shape[0])) - keep_f)
            ld.mlp.down_proj.weight[:, drop] = 0
        ref = masked(tokens, use_cache=False).logits
        got = pruned(tokens, use_cache=False).logits
    return float((ref - got).abs().max())


# ----------------------------------------------------------------------------- recover
def recover(model, train_ids, steps, seed, lr=2e-4, batch=4, seq=256, log=print,
            at=(), on_step=None):
    """ecospa's recovery: adamw(lr, b1 .9, b2 .95, eps 1e-8, wd 0, clip 1.0), batch_at(seed+1).
    ``on_step(step)`` is called after each step in ``at`` (e.g. an intermediate evaluation)."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.0)
    losses = []
    for step in range(steps):
        b = batch_at(train_ids, step, batch, seq, seed + 1)
        loss = ce(model, b)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        log(f"  recover step {step + 1}/{steps} loss {losses[-1]:.4f}")
        if step + 1 in at and step + 1 < steps and on_step is not None:
            model.eval()
            on_step(step + 1)
            model.train()
    model.eval()
    return losses


# ----------------------------------------------------------------------------- io
def _write_peers(path, new_runs):
    """Read-modify-write only the top-level "peers" key, atomically."""
    data = json.load(open(path)) if os.path.isfile(path) else {}
    peers = data.get("peers", [])
    def key(r):
        return tuple(r.get(k) for k in ("tool", "mode", "importance", "level", "steps",
                                        "head_ratio_arg"))
    keys = {key(r) for r in new_runs}
    peers = [r for r in peers if key(r) not in keys]
    data["peers"] = peers + new_runs
    write_results(path, data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--tiny", action="store_true", help="random 2-layer 9/3-head model (smoke test)")
    p.add_argument("--mode", nargs="+", default=["inner"], choices=["inner", "example"])
    p.add_argument("--importance", nargs="+", default=["magnitude", "taylor"],
                   choices=["magnitude", "taylor"])
    p.add_argument("--levels", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--steps", type=int, default=0)
    p.add_argument("--eval-at", type=int, nargs="*", default=[16],
                   help="also evaluate after these recovery steps (ecospa's stored run has 16)")
    p.add_argument("--head-ratio", type=float, default=None,
                   help="inner mode: head_pruning_ratio (default: the level, capped for GQA)")
    p.add_argument("--eval-windows", type=int, default=40)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(HERE, "results", "compress.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import torch_pruning as tp

    def log(msg):
        print(msg, flush=True)

    if args.tiny:
        cfg = llama.Config(vocab_size=49152, dim=72, n_layers=2, n_heads=9, n_kv_heads=3,
                           ffn_dim=96)
        params, tok = llama.init(cfg, seed=0), load_tokenizer(args.model)
        out = os.path.join(tempfile.mkdtemp(), "tiny.json")
    else:
        cfg, params, tok = load_model(args.model)
        out = args.out
    train_ids = encode(tok, corpus("pydoc", "train"))
    val_ids = encode(tok, corpus("pydoc", "val"))
    calib = [batch_at(train_ids, 10_000 + i, 4, 256, args.seed + 1) for i in range(4)]

    # identical weights: HF logits == ecospa logits
    probe = val_ids[:64][None]
    with torch.no_grad():
        ref = llama.forward(params, probe, cfg)
        got = hf_from_ecospa(params, cfg)(probe).logits
    diff = float((ref - got).abs().max())
    log(f"HF vs ecospa logits on 64 tokens: max |diff| {diff:.3e} (scale {float(ref.abs().max()):.1f})")
    if diff > 1e-3:
        raise SystemExit("the HF model does not reproduce ecospa's forward")

    runs = []
    for mode in args.mode:
        for level in args.levels:
            for importance in args.importance:
                torch.manual_seed(args.seed)
                t0 = time.perf_counter()
                model = hf_from_ecospa(params, cfg)
                dense_block = block_params(model)
                dense_all = all_params(model)
                run = {"tool": "torch-pruning", "tool_version": getattr(tp, "__version__", "?"),
                       "mode": mode, "importance": importance, "level": level,
                       "head_ratio_arg": args.head_ratio,
                       "steps": args.steps, "block_params_dense": dense_block,
                       "params_dense": dense_all, "ppl_pruned": None, "ppl_recovered": None}
                log(f"\n== torch-pruning {mode} {importance} @ {level}")
                try:
                    info = prune(model, cfg, mode, importance, level, calib, log,
                                 args.head_ratio)
                    run["prune_seconds"] = time.perf_counter() - t0
                    kept = block_params(model)
                    run.update(info, block_params_kept=kept, params_kept=all_params(model),
                               block_fraction_removed=1 - kept / dense_block)
                    log(f"pruned in {run['prune_seconds']:.1f}s: {json.dumps(info)}; block params "
                        f"{dense_block} -> {kept} ({1 - kept / dense_block:.4%} removed); all "
                        f"params {dense_all} -> {run['params_kept']}")
                    if mode == "inner":
                        run["equivalence_max_abs_diff"] = check_equivalent(
                            hf_from_ecospa(params, cfg), model, probe)
                        log(f"pruned model vs dense with removed heads/channels zeroed: max |logit "
                            f"diff| {run['equivalence_max_abs_diff']:.3e}")
                    t1 = time.perf_counter()
                    r = nll(hf_forward(model), None, None, val_ids, 512, 4, args.eval_windows)
                    run["ppl_pruned"] = math.exp(r["nll"])
                    run["eval_windows"] = r["windows"]
                    run["eval_seconds"] = time.perf_counter() - t1
                    log(f"ppl after pruning {run['ppl_pruned']:.3f} ({r['windows']} windows, "
                        f"{run['eval_seconds']:.1f}s)")
                    if args.steps > 0:
                        t2 = time.perf_counter()
                        run["ppl_at_steps"] = {}

                        def midway(step, model=model, run=run):
                            r = nll(hf_forward(model), None, None, val_ids, 512, 4,
                                    args.eval_windows)
                            run["ppl_at_steps"][str(step)] = math.exp(r["nll"])
                            log(f"ppl after {step} recovery steps {math.exp(r['nll']):.3f}")
                            _write_peers(out, [dict(run, partial=f"{step}/{args.steps} steps")])

                        losses = recover(model, train_ids, args.steps, args.seed, log=log,
                                         at=set(args.eval_at), on_step=midway)
                        run["recover_seconds"] = time.perf_counter() - t2
                        run["final_train_loss"] = losses[-1]
                        r = nll(hf_forward(model), None, None, val_ids, 512, 4, args.eval_windows)
                        run["ppl_recovered"] = math.exp(r["nll"])
                        log(f"ppl after {args.steps} recovery steps {run['ppl_recovered']:.3f}")
                except Exception as err:  # record what Torch-Pruning cannot do, with the text
                    run["error"] = f"{type(err).__name__}: {err}"
                    run["traceback"] = traceback.format_exc()[-2000:]
                    log(run["traceback"])
                run["seconds"] = time.perf_counter() - t0
                run["threads"] = args.threads
                runs.append(run)
                _write_peers(out, [run])
                del model
    log(f"\nwrote {len(runs)} peer runs to {out}")


if __name__ == "__main__":
    main()
