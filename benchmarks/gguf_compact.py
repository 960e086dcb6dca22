"""GGUF file size and llama.cpp decode speed: dense vs pruned SmolLM2-135M, padded vs compact.

    python benchmarks/gguf_compact.py                  # SmolLM2-135M, dense / 25% / 50% pruned
    python benchmarks/gguf_compact.py --quick          # tiny random model, seconds (smoke run)

Needs llama-cpp-python, which builds from source (15-35 minutes on 2 cores, cmake and g++):

    CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install llama-cpp-python --no-binary llama-cpp-python

The dense model is pruned with the coupled Fisher to a global budget of 25% and 50% of the block
parameters (calibrated on 2 x 128 tokens of the pydoc TRAIN split, as benchmarks/generate.py; no
recovery training: speed and size do not depend on it). Each model is exported with
``ecospa export``'s code as ``gguf`` (llama architecture, padded to the dense shapes) and
``gguf-compact`` (deci architecture, per-layer MLP widths, attention padded), in ``--dtype``.
For each file: its bytes, the parameters llama.cpp holds (``llama_model_n_params``), and
llama.cpp's greedy decode speed: the prompt evaluated once, then ``--new`` tokens one by one
(argmax of the last logits), timed per phase; medians of ``--reps`` runs, files interleaved so
load drifts hit all alike. Greedy tokens of llama.cpp on the compact file are compared with
ecospa's own greedy generation of the same pruned tree (with f32 weights and ``--kv f32``, the
default: llama.cpp's f16 KV cache and f16 flash attention move logits by up to ~0.02 and may
change a token). Writes benchmarks/results/gguf_compact.json (``--quick``: gguf_compact_quick.json).
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

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "gguf_compact.json")
INSTALL = ("CMAKE_ARGS='-DGGML_NATIVE=OFF' pip install llama-cpp-python --no-binary llama-cpp-python "
           "(builds llama.cpp from source: 15-35 minutes, needs cmake and g++)")


def results_path(quick: bool, out=None) -> str:
    if out:
        return out
    return RESULTS.replace("gguf_compact.json", "gguf_compact_quick.json") if quick else RESULTS


def load(quick: bool):
    from ecospa.func import llama
    if quick:
        cfg = llama.Config(vocab_size=260, dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=172,
                           max_seq_len=256, init_std=0.1)
        return cfg, llama.init(cfg, seed=0), None, None
    from ecospa.io.load import load_model
    from ecospa.jobs.export import source_general_info, source_tokenizer_info
    cfg, params, tok = load_model("smollm2-135m")
    return cfg, params, tok, (source_tokenizer_info("smollm2-135m"), source_general_info("smollm2-135m"))


def quick_tokenizer() -> dict:
    from ecospa.io.gguf_tokenizer import _byte_alphabet
    alpha = _byte_alphabet()
    return {"model": "gpt2", "pre": "gpt-2", "tokens": ["<|endoftext|>"] + [alpha[b] for b in range(256)]
            + ["Ġt", "he", "Ġthe"], "merges": ["Ġ t", "h e", "Ġt he"], "token_type": [3] + [1] * 259,
            "bos_token_id": 0, "eos_token_id": 0, "add_bos_token": False}


def calibration(cfg, tok, quick: bool):
    if quick or tok is None:
        g = torch.Generator().manual_seed(0)
        return [torch.randint(0, cfg.vocab_size, (2, 65), generator=g)]
    from ecospa.io.data import corpus
    from ecospa.io.load import encode
    ids = encode(tok, corpus("pydoc", "train")[:20000])
    return [ids[i * 129:(i + 1) * 129].reshape(1, -1).repeat(2, 1) for i in range(2)]


def prune(params, cfg, budget, batches):
    import ecospa
    from ecospa.func import llama
    if budget == 0:
        return params
    groups = llama.coupled_groups(cfg)

    def loss(p, b):
        logits = llama.forward(p, b[:, :-1], cfg)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten())
    scores = ecospa.fisher(loss, params, groups, batches)
    return ecospa.pruner(groups, budget=budget)(params, scores)


def greedy_llama_cpp(llm, prompt: list, n: int) -> tuple:
    """(tokens, prefill seconds, decode seconds) of ``n`` greedy tokens after ``prompt``."""
    import llama_cpp
    import numpy as np
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    out, vocab = [], llm.n_vocab()
    for _ in range(n):
        last = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(vocab,))
        tok = int(np.argmax(last))  # the last position's logits (llama.cpp keeps only those)
        out.append(tok)
        llm.eval([tok])
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny random model, few tokens (smoke run)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.5])
    ap.add_argument("--dtype", choices=("f32", "f16"), default="f32")
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    ap.add_argument("--new", type=int, default=64, help="greedy tokens decoded")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="llama.cpp threads")
    ap.add_argument("--kv", choices=("f32", "default"), default="f32",
                    help="f32: KV cache in f32 and flash attention off (logits as ecospa's, so greedy "
                         "tokens compare); default: llama.cpp's defaults (f16 KV cache, flash attention auto)")
    ap.add_argument("--dir", default=None, help="where the GGUF files go (default: a temporary directory)")
    ap.add_argument("--out", default=None, help="results file (default: results/gguf_compact.json; "
                    "with --quick results/gguf_compact_quick.json)")
    args = ap.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print(f"llama_cpp is not installed: {INSTALL}", file=sys.stderr)
        return 2
    from ecospa.func import llama
    from ecospa.jobs.export import export
    from ecospa.jobs.generate import generate

    if args.quick:
        args.prompt, args.new, args.reps = min(args.prompt, 16), min(args.new, 16), min(args.reps, 2)
    torch.set_num_threads(args.threads)
    cfg, dense, tok, meta = load(args.quick)
    tok_info, general = meta if meta else (quick_tokenizer(), None)
    batches = calibration(cfg, tok, args.quick)
    models = {"dense": dense}
    for b in args.budgets:
        models[f"pruned {b:.0%}"] = prune(dense, cfg, b, batches)
    directory = args.dir or tempfile.mkdtemp(prefix="ecospa-gguf-bench-")
    files = {}
    for name, params in models.items():
        for fmt in ("gguf", "gguf-compact"):
            if name == "dense" and fmt == "gguf-compact":
                continue  # the same shapes as dense gguf, in another architecture: measured below anyway
            path = os.path.join(directory, f"{name.replace(' ', '').replace('%', '')}.{fmt}.gguf")
            export(params, cfg, path, fmt, tokenizer_info=tok_info, general=general, dtype=args.dtype,
                   overwrite=True)
            files[(name, fmt)] = path
    # the dense model as gguf-compact too (one width everywhere): the architecture alone costs nothing
    path = os.path.join(directory, "dense.gguf-compact.gguf")
    export(dense, cfg, path, "gguf-compact", tokenizer_info=tok_info, general=general, dtype=args.dtype,
           overwrite=True)
    files[("dense", "gguf-compact")] = path
    cond = conditions("cpu", torch.float32, llama_cpp_python=llama_cpp.__version__, threads=args.threads,
                      gguf_dtype=args.dtype, kv_cache=args.kv, prompt=args.prompt, new_tokens=args.new, reps=args.reps,
                      model="tiny random llama" if args.quick else "SmolLM2-135M (GGUF Q4_1, dequantized)",
                      pruning="coupled Fisher, global budget, 2 x 128 pydoc train tokens, no recovery",
                      note="llama.cpp greedy decode (eval one token, argmax), interleaved medians; "
                           "load avg at start %.2f" % os.getloadavg()[0])
    print("conditions:", cond, flush=True)
    g = torch.Generator().manual_seed(1)
    prompt = [int(t) for t in torch.randint(1, cfg.vocab_size, (args.prompt,), generator=g)]
    kv = dict(type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False) \
        if args.kv == "f32" else {}
    llms = {k: llama_cpp.Llama(model_path=p, n_ctx=args.prompt + args.new + 8, n_threads=args.threads,
                               n_batch=args.prompt, verbose=False, **kv) for k, p in files.items()}
    runs = {k: {"prefill": [], "decode": []} for k in files}
    tokens = {}
    for rep in range(args.reps + 1):  # rep 0 warms up
        for key, llm in llms.items():
            out, pre, dec = greedy_llama_cpp(llm, prompt, args.new)
            tokens.setdefault(key, out)
            if rep:
                runs[key]["prefill"].append(pre)
                runs[key]["decode"].append(dec)
            print(f"  rep {rep} {key[0]} {key[1]}: {args.new / dec:.1f} tok/s", flush=True)
    ref = {}
    if args.dtype == "f32" and args.kv == "f32":
        for name, params in models.items():
            ref[name] = generate(params, cfg, torch.tensor([prompt]), args.new)[0, -args.new:].tolist()
    base_key = ("dense", "gguf")
    base_tps = args.new / statistics.median(runs[base_key]["decode"])
    base_bytes = os.path.getsize(files[base_key])
    rows = []
    for key, path in files.items():
        name, fmt = key
        dec = statistics.median(runs[key]["decode"])
        row = {"model": name, "format": fmt, "file_bytes": os.path.getsize(path),
               "bytes_vs_dense": os.path.getsize(path) / base_bytes,
               "llama_cpp_params": int(llama_cpp.llama_model_n_params(llms[key].model)),
               "ecospa_params": sum(t.numel() for t in _weights(models[name])),
               "prefill_s": statistics.median(runs[key]["prefill"]), "decode_s": dec,
               "decode_tokens_per_s": args.new / dec, "speedup_vs_dense": (args.new / dec) / base_tps}
        if name in ref:
            row["greedy_tokens_equal_ecospa"] = tokens[key] == ref[name]
        rows.append(row)
        print(f"{name:>11} {fmt:>12}: {row['file_bytes'] / 1e6:8.1f} MB ({row['bytes_vs_dense']:.2f}x)  "
              f"llama.cpp {row['llama_cpp_params'] / 1e6:6.1f}M params  {row['decode_tokens_per_s']:7.1f} tok/s "
              f"({row['speedup_vs_dense']:.2f}x)  tokens==ecospa: {row.get('greedy_tokens_equal_ecospa', 'n/a')}",
              flush=True)
    write_results(results_path(args.quick, args.out), {"conditions": cond, "rows": rows})
    return 0


def _weights(params: dict) -> list:
    """The weight tensors (the rotary tables are buffers)."""
    out = [params["embed"], params["norm"]] + ([params["lm_head"]] if "lm_head" in params else [])
    return out + [v for p in params["layers"] for k, v in p.items() if k != "inv_freq"]


if __name__ == "__main__":
    raise SystemExit(main())
