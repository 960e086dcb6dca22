"""The real SmolLM2-135M, pruned at 50% with a global budget, through every export format.

    python benchmarks/export_check.py [--budget 0.5] [--new 32]

Prunes with the coupled Fisher (2 x 256 calibration tokens of the pydoc TRAIN split), exports
hf-padded, hf-compact and gguf, loads each the way a user would (stock transformers; transformers
with trust_remote_code; ecospa's GGUF reader), and compares with ecospa's own forward and
``ecospa generate`` (greedy) on a held-out prompt. Writes benchmarks/results/export_smollm2.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import optree
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import conditions, write_results  # noqa: E402

import ecospa  # noqa: E402
from ecospa.io.data import corpus  # noqa: E402
from ecospa.jobs.export import export, source_tokenizer_info  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.jobs.generate import generate  # noqa: E402
from ecospa.io.load import encode, load_model  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "export_smollm2.json")


def n_params(tree) -> int:
    return sum(t.numel() for t in optree.tree_leaves(tree, namespace="") if t.is_floating_point())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    import transformers
    t0 = time.perf_counter()
    cfg, dense, tok = load_model("smollm2-135m")
    train = encode(tok, corpus("pydoc", "train")[:40000])
    batches = [train[i * 257:(i + 1) * 257][None] for i in range(2)]
    groups = llama.coupled_groups(cfg)

    def loss(p, b):
        logits = llama.forward(p, b[:, :-1], cfg)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
    scores = ecospa.fisher(loss, dense, groups, batches)
    small = ecospa.pruner(groups, budget=args.budget)(dense, scores)
    val = corpus("pydoc", "val")
    prompt = encode(tok, val[:400])[None, :48]
    x = encode(tok, val[1000:3000])[None, :128]
    with torch.no_grad():
        ref = llama.forward(small, x, cfg)
    want = generate(small, cfg, prompt, args.new)
    widths = [(2 * p["wq"].shape[-1], p["wv"].shape[-1], p["w_up"].shape[1]) for p in small["layers"]]
    rows = {}
    d = tempfile.mkdtemp(prefix="ecospa-export-check-")
    for fmt in ("hf-padded", "hf-compact", "gguf"):
        path = os.path.join(d, "m.gguf" if fmt == "gguf" else fmt)
        t1 = time.perf_counter()
        res = export(small, cfg, path, fmt, tokenizer=tok,
                     tokenizer_info=source_tokenizer_info("smollm2-135m") if fmt == "gguf" else None)
        row = {"export_s": time.perf_counter() - t1, "notes": res["notes"]}
        if fmt == "gguf":
            c2, p2, tok2 = load_model(path)
            with torch.no_grad():
                got = llama.forward(p2, x, c2)
            gen = generate(p2, c2, prompt, args.new)
            row.update(loader="ecospa load_gguf", params=n_params(p2),
                       tokenizer_same=bool(torch.equal(encode(tok2, val[:400]), encode(tok, val[:400]))))
        else:
            model = transformers.AutoModelForCausalLM.from_pretrained(
                path, trust_remote_code=fmt == "hf-compact", dtype=torch.float32).eval()
            with torch.no_grad():
                got = model(x).logits
                gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                     max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=0)
            row.update(loader=f"transformers {transformers.__version__} {type(model).__name__}",
                       params=sum(p.numel() for p in model.parameters()))
            c3, back, _ = load_model(path, compact=True)
            row["compact_round_trip_exact"] = all(
                a.shape == b.shape and torch.equal(a, b) for a, b in
                zip(optree.tree_leaves(back, namespace=""), optree.tree_leaves(small, namespace="")))
        same = int((gen[0] == want[0]).long().cumprod(0).sum()) - prompt.shape[1]
        row.update(max_abs_logit_diff=float((got - ref).abs().max()), logit_scale=float(ref.abs().max()),
                   greedy_tokens_equal=bool(torch.equal(gen, want)), greedy_tokens_agreeing=same)
        rows[fmt] = row
        print(fmt, row, flush=True)
    result = {"conditions": conditions("cpu", torch.float32, budget=args.budget, new_tokens=args.new,
                                       prompt_tokens=int(prompt.shape[1]), calibration="2 x 256 pydoc train tokens"),
              "dense_params": n_params(dense), "pruned_params": n_params(small),
              "layer_widths_qk_v_mlp": widths, "formats": rows, "wall_s": time.perf_counter() - t0,
              "ecospa_greedy_text": tok.decode(want[0, prompt.shape[1]:].tolist())}
    write_results(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
