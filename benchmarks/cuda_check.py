"""CUDA correctness before CUDA speed: the core invariants on the GPU, fp32 and bf16.

    python benchmarks/cuda_check.py                       # exits non-zero on a mismatch; writes results/cuda_check.json
    python benchmarks/cuda_check.py --device cpu --out /tmp/c.json --compile-backend aot_eager   # CPU dry run

Checks, for LLaMA (GQA, biases) and GPT-2 at small sizes: CUDA logits == CPU logits (fp32),
sliced == masked on the device (fp32 and bf16), torch.compile(fullgraph=True) == eager on a pruned
tree, and ecospa vs transformers on the same weights: fp32 logits equal, and in bf16 ecospa's error
against the fp32 reference no larger than transformers' own bf16 error (x2, plus bf16 rounding).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

import ecospa
from ecospa.func import gpt2, llama
from ecospa.io.hf import hf_family_of

sys.path.insert(0, os.path.dirname(__file__))
from _common import conditions, write_results  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}
CASES = {"llama": (llama, llama.Config(vocab_size=512, dim=128, n_layers=2, n_heads=8, n_kv_heads=2,
                                        ffn_dim=344, attention_bias=True)),
         "gpt2": (gpt2, gpt2.Config(vocab_size=512, dim=128, n_layers=2, n_heads=4, max_seq_len=64))}


def hf_model(module, cfg, params, device, dtype):
    import transformers
    sd, conf = hf_family_of(cfg).to_hf(params, cfg)
    # the exported config names the class (LLaMA with biases exports as Qwen2)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**conf)).eval()
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return hf.to(device=device, dtype=dtype)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "cuda_check.json"))
    args = ap.parse_args(argv)
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device; nothing to check")
        return 0
    out, ok = {"conditions": conditions(dev, torch.float32, compile_backend=args.compile_backend),
               "checks": []}, True

    def record(name, dtype, check, a, b, tol=None, passed=None):
        nonlocal ok
        a, b = a.float().cpu(), b.float().cpu()
        err = (a - b).abs().max().item()
        if passed is None:
            passed = torch.allclose(a, b, **(tol or TOL[dtype]))
        ok &= bool(passed)
        out["checks"].append({"model": name, "dtype": str(dtype), "check": check, "max_abs_err": err,
                              "ok": bool(passed)})
        print(f"{name:6} {str(dtype):15} {check:28} max|err|={err:.2e} {'ok' if passed else 'FAIL'}", flush=True)

    with torch.no_grad():
        for name, (module, cfg) in CASES.items():
            cpu = module.init(cfg, seed=0)
            groups = module.coupled_groups(cfg)
            scores = {g.name: torch.rand(g.sizes(cpu), generator=torch.Generator().manual_seed(1)) for g in groups}
            keep = ecospa.select(cpu, groups, scores, budget=0.5)
            x = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(2)).to(dev)
            ref = hf_model(module, cfg, cpu, dev, torch.float32)(x).logits  # fp32 reference
            for dtype in (torch.float32, torch.bfloat16):
                gpu = ecospa.to(cpu, dev, dtype)
                small, masked = ecospa.slice_units(gpu, groups, keep), ecospa.mask(gpu, groups, keep)
                fwd = module.forward
                record(name, dtype, "sliced_vs_masked", fwd(small, x, cfg), fwd(masked, x, cfg))
                comp = torch.compile(fwd, fullgraph=True, dynamic=False, backend=args.compile_backend)
                record(name, dtype, "compiled_vs_eager", comp(small, x, cfg), fwd(small, x, cfg))
                mine = fwd(gpu, x, cfg)
                if dtype == torch.float32:
                    if dev != "cpu":
                        record(name, dtype, "device_vs_cpu", mine, module.forward(cpu, x.cpu(), cfg))
                    record(name, dtype, "ecospa_vs_transformers", mine, ref)
                else:
                    theirs = hf_model(module, cfg, cpu, dev, dtype)(x).logits
                    # both in bf16: each against the fp32 reference; ecospa may not be worse
                    e_mine = (mine.float() - ref).abs().max().item()
                    e_hf = (theirs.float() - ref).abs().max().item()
                    bound = 2 * e_hf + 2 ** -8 * ref.abs().max().item()
                    record(name, dtype, "ecospa_vs_transformers", mine, theirs,
                           passed=e_mine <= bound)
                    out["checks"][-1].update(ecospa_err_vs_fp32=e_mine, transformers_err_vs_fp32=e_hf)
    write_results(args.out, out)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
