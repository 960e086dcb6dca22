"""``generate --compile`` on CPU: compiling the whole decoder vs compiling its layer function.

    python benchmarks/compile_decode.py                 # SmolLM2-135M's shape, 8 layers, pruned 50%
    python benchmarks/compile_decode.py --budget 0 --modes eager layer --out X.json  # dense
    python benchmarks/compile_decode.py --quick         # 2 tiny layers, the eager backend (CI)

A random model with SmolLM2-135M's widths (dim 576, 9/3 heads, SwiGLU 1536, vocab 49152) and
``--layers`` layers is pruned to 50% of its block parameters with random scores (every layer
gets its own widths, as after real pruning). Three ways generate ``--new`` greedy tokens after a
16-token prompt, in one process: eager; the whole decoder compiled (``torch.compile(decode,
fullgraph=True, dynamic=False)``, the old ``--compile``: the layers are unrolled and each one's
shapes specialize the graph); the layer function compiled with dynamic shapes
(``ecospa.func.decode.compiled_decoder``, today's ``--compile``: two graphs shared by every
layer). Reported: compile + first tokens (wall s until both graphs exist), then tokens/s, the
number of graphs dynamo built, and whether the tokens equal eager's. Inductor's caches are off
(a fresh compile each time). Writes benchmarks/results/compile_decode.json (``--quick``:
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
from ecospa.func.decode import compiled_decoder, decode  # noqa: E402
import ecospa.jobs.generate as gen  # noqa: E402

HERE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--new", type=int, default=32, help="tokens to generate (default 32)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--modes", nargs="+", default=["eager", "layer", "whole"], choices=["eager", "layer", "whole"])
    ap.add_argument("--budget", type=float, default=0.5,
                    help="fraction of the block parameters removed (0: the dense model; default 0.5)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
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
    params = llama.init(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    scores = {k: torch.rand(b, u, generator=g) for k, (b, u) in ecospa.validate(params, groups).items()}
    if a.budget > 0:
        params = ecospa.pruner(groups, budget=a.budget)(params, scores)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    cond = conditions("cpu", torch.float32, layers=cfg.n_layers, dim=cfg.dim, new_tokens=n, prompt=16,
                      backend=backend, inductor_caches="off", budget=a.budget,
                      widths=sorted({(2 * p["wq"].shape[-1], p["wv"].shape[-1], p["w_up"].shape[1])
                                     for p in params["layers"]}))
    print(cond)
    rows, eager = [], None
    for mode in a.modes:
        out, row = run(params, cfg, prompt, n, mode, backend)
        eager = out if mode == "eager" else eager
        row["tokens_equal_eager"] = None if eager is None else bool(torch.equal(out, eager))
        print(row, flush=True)
        rows.append(row)
    path = a.out or os.path.join(HERE, "compile_decode_quick.json" if a.quick else "compile_decode.json")
    write_results(path, {"conditions": cond, "rows": rows})


if __name__ == "__main__":
    main()
