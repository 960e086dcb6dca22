"""CUDA correctness before CUDA speed: the core invariants on the GPU, fp32 and bf16.

    python benchmarks/cuda_check.py     # exits non-zero on a mismatch; writes results/cuda_check.json

Checks, for LLaMA (GQA, biases) and GPT-2 at small sizes: CUDA logits == CPU logits (fp32),
sliced == masked on CUDA (fp32 and bf16), torch.compile(fullgraph=True) == eager on a pruned tree.
"""
from __future__ import annotations

import os
import sys

import torch

import ecospa
from ecospa.func import gpt2, llama

sys.path.insert(0, os.path.dirname(__file__))
from _common import conditions, write_results  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
CASES = {"llama": (llama, llama.Config(vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2,
                                        ffn_dim=344, attention_bias=True)),
         "gpt2": (gpt2, gpt2.Config(vocab_size=512, dim=128, n_layers=2, n_heads=4, max_seq_len=64))}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    out, ok = {"conditions": conditions("cuda", torch.float32), "checks": []}, True
    for name, (module, cfg) in CASES.items():
        cpu = module.init(cfg, seed=0)
        groups = module.coupled_groups(cfg)
        scores = {g.name: torch.rand(g.sizes(cpu), generator=torch.Generator().manual_seed(1)) for g in groups}
        keep = ecospa.select(cpu, groups, scores, budget=0.5)
        x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2))
        for dtype in (torch.float32, torch.bfloat16):
            gpu = ecospa.to(cpu, "cuda", dtype)
            small, masked = ecospa.slice_units(gpu, groups, keep), ecospa.mask(gpu, groups, keep)
            pairs = {"sliced_vs_masked": (module.forward(small, x.cuda(), cfg), module.forward(masked, x.cuda(), cfg)),
                     "compiled_vs_eager": (torch.compile(module.forward, fullgraph=True)(small, x.cuda(), cfg),
                                           module.forward(small, x.cuda(), cfg))}
            if dtype == torch.float32:
                pairs["cuda_vs_cpu"] = (module.forward(gpu, x.cuda(), cfg).cpu(), module.forward(cpu, x, cfg))
            for check, (a, b) in pairs.items():
                err = (a.float().cpu() - b.float().cpu()).abs().max().item()
                passed = torch.allclose(a.float().cpu(), b.float().cpu(), **TOL[dtype])
                ok &= passed
                out["checks"].append({"model": name, "dtype": str(dtype), "check": check, "max_abs_err": err, "ok": passed})
                print(f"{name:6} {str(dtype):15} {check:18} max|err|={err:.2e} {'ok' if passed else 'FAIL'}")
    write_results(os.path.join(os.path.dirname(__file__), "results", "cuda_check.json"), out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
