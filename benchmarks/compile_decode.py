"""``generate --compile`` on CPU: compiling the whole decoder vs compiling its layer function.

    python benchmarks/compile_decode.py                 # SmolLM2-135M's shape, 8 layers, dense and pruned 50%
    python benchmarks/compile_decode.py --layers 30 --threads 2 --new 64 --fresh --modes eager layer forward forward-layer
    python benchmarks/compile_decode.py --quick         # 2 tiny layers, the eager backend (CI)

A random model with SmolLM2-135M's widths (dim 576, 9/3 heads, SwiGLU 1536, vocab 49152) and
``--layers`` layers, dense and pruned to 50% of its block parameters (``--budgets``) with random
scores (every layer gets its own widths, as after real pruning). Three ways generate ``--new`` greedy tokens after a
16-token prompt, in one process: eager; the whole decoder compiled (``torch.compile(decode,
fullgraph=True, dynamic=False)``, the old ``--compile``: the layers are unrolled and each one's
shapes specialize the graph); the layer function compiled with dynamic shapes
(``ecospa.func.decode.compiled_decoder``, today's ``--compile``: two graphs shared by every
layer). ``--modes forward forward-layer`` also time the first call of the forward (the prompt's
logits, no generation) compiled whole and by its layer function (``compiled_forward``). Reported: compile + first tokens (wall s until both graphs exist), then tokens/s, the
number of graphs dynamo built, and whether the tokens equal eager's. Inductor's caches are off
(a fresh compile each time); ``--fresh`` runs every (budget, mode) in its own process, since
kernels compiled for one row otherwise speed up the next one's compile. Writes benchmarks/results/compile_decode.json (``--quick``:
compile_decode_quick.json).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import conditions, write_results  # noqa: E402

import ecospa  # noqa: E402
from ecospa.func import llama  # noqa: E402
from ecospa.func.decode import compiled_decoder, compiled_forward, decode  # noqa: E402
import ecospa.jobs.generate as gen  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def forward_row(params, cfg, prompt, backend, mode="forward"):
    """The full forward compiled: whole (``forward``: ``torch.compile(llama.forward)``, what the
    README's "Your own loop" does) or its layer function alone (``forward-layer``:
    ``ecospa.func.decode.compiled_forward``): seconds of its first call (compile + run) and of
    an eager call."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        t0 = time.perf_counter()
        want = llama.forward(params, prompt, cfg)
        t1 = time.perf_counter()
        fn = (torch.compile(llama.forward, backend=backend) if mode == "forward"
              else compiled_forward(cfg, backend=backend))
        got = fn(params, prompt, cfg)
        t2 = time.perf_counter()
    return {"mode": mode, "compile_and_first_s": round(t2 - t1, 2), "eager_call_s": round(t1 - t0, 3),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
            "max_abs_diff_vs_eager": float((got - want).abs().max())}


def run(params, cfg, prompt, n, mode, backend):
    import torch._dynamo
    from torch._dynamo.utils import counters
    torch._dynamo.reset()
    counters.clear()
    real = gen.compiled_decoder
    if mode == "whole":
        gen.compiled_decoder = lambda cfg: torch.compile(decode, fullgraph=True, dynamic=False, backend=backend)
    elif mode == "layer":
        gen.compiled_decoder = lambda cfg: compiled_decoder(cfg, backend=backend)
    ready = []
    t0 = time.perf_counter()
    try:
        out = gen.generate(params, cfg, prompt, n, compile=mode != "eager",
                           on_ready=lambda: ready.append(time.perf_counter()))
    finally:
        gen.compiled_decoder = real
    t1 = time.perf_counter()
    first = ready[0] - t0
    return out, {"mode": mode, "compile_and_first_s": round(first, 2),
                 "tokens_per_s_after": round((n - 2) / (t1 - ready[0]), 2),
                 "graphs": int(counters["stats"].get("unique_graphs", 0))}


def _ratios(rows, budgets) -> dict:
    """Per pruned budget and mode: compile time vs the dense model's, and (layer) compiled
    tokens/s vs eager's of the same model."""
    by = {(r["budget"], r["mode"]): r for r in rows}
    out = {}
    for b in budgets:
        for mode in ("layer", "whole", "forward", "forward-layer"):
            r, d = by.get((b, mode)), by.get((0.0, mode))
            if r and d and b > 0 and r.get("compile_and_first_s") and d.get("compile_and_first_s"):
                out[f"{mode} compile, budget {b:g} / dense"] = round(r["compile_and_first_s"] / d["compile_and_first_s"], 3)
        for mode in ("layer", "whole"):
            r, e = by.get((b, mode)), by.get((b, "eager"))
            if r and e and r.get("tokens_per_s_after") and e.get("tokens_per_s_after"):
                out[f"{mode} tokens/s / eager, budget {b:g}"] = round(r["tokens_per_s_after"] / e["tokens_per_s_after"], 3)
    return out


def _fresh(a, argv) -> None:
    """``main`` once per (budget, mode), each in a new process; the rows and ratios in one file."""
    import json
    import subprocess
    import tempfile
    rest, skip = [], 0
    for i, x in enumerate(argv):  # the arguments without --fresh, --budgets, --modes, --out and their values
        if skip and not x.startswith("--"):
            continue
        skip = x in ("--budgets", "--modes", "--out")
        if not skip and x != "--fresh":
            rest.append(x)
    rows, cond = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for b in a.budgets:
            for mode in [m for m in a.modes if m != "eager"] or ["eager"]:
                out = os.path.join(tmp, f"{b}-{mode}.json")
                cmd = [sys.executable, os.path.abspath(__file__), *rest, "--budgets", str(b),
                       "--modes", *sorted({"eager", mode}, key=["eager", mode].index), "--out", out]
                subprocess.run(cmd, check=True)
                res = json.load(open(out))
                widths = {**(cond or {}).get("widths", {}), **res["conditions"]["widths"]}
                cond = dict(cond or res["conditions"], widths=widths)
                rows += [dict(r, process=f"{b}-{mode}") for r in res["rows"]]
    cond = dict(cond, budgets=a.budgets, fresh_processes=True)
    # tokens/s ratios: each compiled decoder against the eager run of its own process
    ratios = _ratios([r for r in rows if r["mode"] != "eager" or r["process"] == f"{r['budget']}-layer"], a.budgets)
    print(ratios)
    path = a.out or os.path.join(HERE, "compile_decode_quick.json" if a.quick else "compile_decode.json")
    write_results(path, {"conditions": cond, "rows": rows, "ratios": ratios})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["eager", "layer", "whole"], choices=["eager", "layer", "whole", "forward", "forward-layer"],
                    help="eager / layer / whole: generation (see above); forward / forward-layer: the first "
                         "call of the forward compiled whole / by its layer function (no generation)")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.0, 0.5],
                    help="fractions of the block parameters removed, one model each (0: the dense model; "
                         "default 0 0.5)")
    ap.add_argument("--fresh", action="store_true",
                    help="run each (budget, mode) in its own fresh Python process (with an eager run beside "
                         "it for the tokens): no compiled kernel or dynamo state carries over between rows")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if a.fresh:
        return _fresh(a, argv if argv is not None else sys.argv[1:])
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")
    if a.quick:
        cfg = llama.Config(vocab_size=64, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, max_seq_len=64)
        backend, n = "eager", 6
    else:
        cfg = llama.Config(vocab_size=49152, dim=576, n_layers=a.layers, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                           max_seq_len=256)
        backend, n = "inductor", a.new
    groups = llama.coupled_groups(cfg)
    dense = llama.init(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(b, u, generator=g) for k, (b, u) in ecospa.validate(dense, groups).items()}
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    models = {b: ecospa.pruner(groups, budget=b)(dense, scores) if b > 0 else dense for b in a.budgets}
    cond = conditions("cpu", torch.float32, layers=cfg.n_layers, dim=cfg.dim, new_tokens=n, prompt=16,
                      backend=backend, inductor_caches="off", budgets=a.budgets,
                      widths={b: sorted({(2 * p["wq"].shape[-1], p["wv"].shape[-1], p["w_up"].shape[1])
                                         for p in params["layers"]}) for b, params in models.items()})
    print(cond)
    rows = []
    for budget, params in models.items():
        eager = None
        for mode in a.modes:
            if mode.startswith("forward"):
                row = forward_row(params, cfg, prompt, backend, mode)
            else:
                out, row = run(params, cfg, prompt, n, mode, backend)
                eager = out if mode == "eager" else eager
                row["tokens_equal_eager"] = None if eager is None else bool(torch.equal(out, eager))
            row = {"budget": budget, **row}
            print(row, flush=True)
            rows.append(row)
    ratios = _ratios(rows, a.budgets)
    if ratios:
        print(ratios)
    path = a.out or os.path.join(HERE, "compile_decode_quick.json" if a.quick else "compile_decode.json")
    write_results(path, {"conditions": cond, "rows": rows, "ratios": ratios})


if __name__ == "__main__":
    main()
