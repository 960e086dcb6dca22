"""Decode speed: ecospa's KV-cache decoder, dense vs pruned, and vs ``transformers`` generate.

    python benchmarks/generate.py                       # SmolLM2-135M, prompt 128, 256 new tokens
    python benchmarks/generate.py --quick               # tiny random model, seconds (CI)

For each variant and batch size (1 and 8): greedy generation of ``--new`` tokens after a
``--prompt``-token prompt, timed as a whole (prefill + decode) and per decoded token, medians of
``--reps`` runs, variants interleaved so load drifts hit all alike. Pruned variants: the dense
model pruned with the coupled Fisher to a global budget of 25% and 50% of the block parameters
(calibrated on 2 x 128 tokens of the pydoc TRAIN split). The ideal decode speedup is set by the
bytes of weights read per token (every weight matrix incl. the LM head; the embedding lookup
reads one row). ``transformers`` runs the same dense weights (exported with ecospa's hf-padded
layout, loaded in LlamaForCausalLM, sdpa attention) with ``generate(do_sample=False)``.
Writes benchmarks/results/generate.json (the README's table); ``--quick`` writes
benchmarks/results/generate_quick.json instead, never the committed file.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import conditions, write_results  # noqa: E402

import ecospa  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.jobs.generate import generate  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate.json")


def weight_bytes(params: dict) -> int:
    """Bytes of weights read to decode one token (embedding: one row; tied head: the full matrix)."""
    total = 0
    for p in params["layers"]:
        total += sum(t.numel() * t.element_size() for k, t in p.items() if k != "inv_freq")
    head = params.get("lm_head", params["embed"])
    total += head.numel() * head.element_size() + params["norm"].numel() * params["norm"].element_size()
    total += params["embed"].shape[1] * params["embed"].element_size()
    return total


def load(quick: bool):
    if quick:
        cfg = llama.Config(vocab_size=512, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172,
                           max_seq_len=256, init_std=0.1)
        return cfg, llama.init(cfg, seed=0), None
    from ecospa.io.load import load_model
    return load_model("smollm2-135m")


def calibration(cfg, tok, quick: bool):
    if quick or tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, cfg.vocab_size, (2, 65), generator=g)]
    from ecospa.io.data import corpus
    from ecospa.io.load import encode
    ids = encode(tok, corpus("pydoc", "train")[:20000])
    return [ids[i * 129:(i + 1) * 129].reshape(1, -1).repeat(2, 1) for i in range(2)]


def prune(params, cfg, budget, batches):
    if budget == 0:
        return params
    groups = llama.coupled_groups(cfg)

    def loss(p, b):
        logits = llama.forward(p, b[:, :-1], cfg)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
    scores = ecospa.fisher(loss, params, groups, batches)
    return ecospa.pruner(groups, budget=budget)(params, scores)


def hf_model(params, cfg):
    import transformers

    from ecospa.jobs.export import export
    d = tempfile.mkdtemp(prefix="ecospa-gen-")
    export(params, cfg, os.path.join(d, "hf"), "hf-padded")
    return transformers.AutoModelForCausalLM.from_pretrained(os.path.join(d, "hf"), attn_implementation="sdpa",
                                                             dtype=torch.float32).eval()


def results_path(quick: bool, out=None) -> str:
    """Where a run writes: ``out`` when given, else results/generate.json, or for a quick run
    results/generate_quick.json (a smoke run never replaces the committed numbers)."""
    if out:
        return out
    return RESULTS.replace("generate.json", "generate_quick.json") if quick else RESULTS


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, few tokens (CI)")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", default=None,
                    help="results file (default: results/generate.json; with --quick results/generate_quick.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.prompt, args.new, args.reps = min(args.prompt, 16), min(args.new, 16), min(args.reps, 2)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, dense, tok = load(args.quick)
    batches = calibration(cfg, tok, args.quick)
    models = {"dense": dense}
    for b in args.budgets:
        models[f"pruned {b:.0%}"] = prune(dense, cfg, b, batches)
    bytes_ = {k: weight_bytes(v) for k, v in models.items()}
    hf = None
    if not args.no_transformers:
        try:
            hf = hf_model(dense, cfg)
        except ImportError:
            print("transformers is not installed: skipping the transformers baseline")
    cond = conditions("cpu", torch.float32, prompt=args.prompt, new_tokens=args.new, reps=args.reps,
                      model="tiny random llama" if args.quick else "SmolLM2-135M (GGUF Q4_1, dequantized)",
                      note="greedy; whole generate() timed; interleaved medians")
    print("conditions:", cond, flush=True)
    g = torch.Generator().manual_seed(1)
    rows = []
    for B in args.batches:
        prompt = torch.randint(0, cfg.vocab_size, (B, args.prompt), generator=g)
        runs = {k: [] for k in models}
        first = {}
        if hf is not None:
            runs["transformers dense"] = []
        for rep in range(args.reps + 1):  # rep 0 warms up
            for name, params in models.items():
                t0 = time.perf_counter()
                out = generate(params, cfg, prompt, args.new)
                dt = time.perf_counter() - t0
                first.setdefault(name, out)
                if rep:
                    runs[name].append(dt)
            if hf is not None:
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
                dt = time.perf_counter() - t0
                first.setdefault("transformers dense", out)
                if rep:
                    runs["transformers dense"].append(dt)
        base = statistics.median(runs["dense"])
        for name, times in runs.items():
            t = statistics.median(times)
            key = "dense" if name == "transformers dense" else name
            row = {"variant": name, "batch": B, "seconds": t, "tokens_per_s": B * args.new / t,
                   "ms_per_token_step": 1000 * t / args.new, "speedup_vs_ecospa_dense": base / t,
                   "weight_bytes_per_token": bytes_[key], "ideal_speedup": bytes_["dense"] / bytes_[key]}
            row["fraction_of_ideal"] = row["speedup_vs_ecospa_dense"] / row["ideal_speedup"]
            if name == "transformers dense":
                row["same_tokens_as_ecospa"] = bool(torch.equal(first[name], first["dense"]))
            rows.append(row)
            print(f"b{B} {name:>20}: {row['tokens_per_s']:8.1f} tok/s  {row['ms_per_token_step']:7.2f} ms/step  "
                  f"speedup {row['speedup_vs_ecospa_dense']:.2f}x (ideal {row['ideal_speedup']:.2f}x)", flush=True)
    write_results(results_path(args.quick, args.out), {"conditions": cond, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
