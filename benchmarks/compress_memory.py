"""Peak memory of ``ecospa compress`` against the model's float32 bytes, phase by phase.

    python benchmarks/compress_memory.py                         # SmolLM2-135M and a 1.1B LLaMA shape, --steps 0
    python benchmarks/compress_memory.py --models smollm2-135m --steps 0 80
    python benchmarks/compress_memory.py --quick                 # a tiny random model, seconds (tests)

Each job runs in its own child process (``python -m ecospa compress ... --budget 0.5``), under
``/usr/bin/time -v`` where it exists (the kernel's maximum resident set size of the whole
process), and the job's own summary gives the peak of each phase (``ecospa.jobs.phases``: the
VmHWM mark reset at each phase start) and its wall time. The ratio is peak RSS / the dense
model's float32 bytes (the target of issue 28: <= 2.5x for ``--steps 0``, <= 5x with 80 steps).

Models: ``smollm2-135m`` (the registered GGUF) and ``llama-1.1b``: TinyLlama's shape (dim 2048,
22 layers, 32 heads, 4 KV heads, SwiGLU 5632, vocab 32000, untied head), random weights WRITTEN
BY ``transformers`` (``LlamaForCausalLM(config).save_pretrained``, float32, ~4.4 GB on disk in a
temporary directory). A random model has no tokenizer: the directory gets a byte-level
``tokenizer.json`` (256 byte tokens, no merges; ids < 256 < vocab), so the text is bytes.
``--quick`` runs the same path on a tiny random LLaMA (``llama-tiny``).

Memory does not depend on how many windows are evaluated or batches calibrated, nor (with
``--micro-batch 1``, the default) on the rows of a calibration batch beyond two (two rows already
hold the running sum and one row's gradients), except in the refit and obs scores, which keep
the residual streams [rows x seq_len x dim] and one sublayer's inner activations of every refit
batch: ``--job-args`` can shrink a slow job (the 1.1B row uses fewer batches and windows; they
are recorded with the row, and the refit's lists of the default 32 x 4 rows are estimated apart). Writes benchmarks/results/compress_memory.json;
``--quick`` writes results/compress_memory_quick.json, never the committed file.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results", "compress_memory.json")
QUICK_RESULTS = os.path.join(ROOT, "benchmarks", "results", "compress_memory_quick.json")

SHAPES = {  # HF LlamaConfig fields of the random models
    "llama-1.1b": dict(hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                       num_key_value_heads=4, intermediate_size=5632, vocab_size=32000,
                       max_position_embeddings=2048, rope_theta=10000.0, tie_word_embeddings=False),
    "llama-tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, intermediate_size=128, vocab_size=300,
                       max_position_embeddings=512, rope_theta=10000.0, tie_word_embeddings=False),
}
# the slow 1.1B job on fewer batches and windows (memory is the point; see the module doc)
DEFAULT_JOB_ARGS = {"llama-1.1b": "--batch-size 2 --calib-batches 1 --recon-batches 1 --eval-windows 1 "
                                  "--eval-seq-len 128",
                    "llama-tiny": "--calib-batches 1 --recon-batches 2 --eval-windows 2 --batch-size 2 "
                                  "--seq-len 32 --eval-seq-len 64 --eval-extra"}


def write_random_llama(name: str, directory: str) -> None:
    """A random LLaMA of shape ``name`` saved by transformers, plus a byte-level tokenizer.json."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[name], torch_dtype="float32")
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory, safe_serialization=True)
    del model
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(os.path.join(directory, "tokenizer.json"))


def _time_v_max_rss_mb(text: str):
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return int(m.group(1)) / 1024 if m else None


def run_job(model: str, steps: int, budget: float, job_args: str, threads: int, workdir: str) -> dict:
    out = os.path.join(workdir, f"out-{steps}")
    cmd = [sys.executable, "-m", "ecospa", "compress", "--model", model, "--budget", str(budget),
           "--steps", str(steps), "--out", out, "--threads", str(threads)] + shlex.split(job_args)
    timer = ["/usr/bin/time", "-v"] if os.path.exists("/usr/bin/time") else []
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(timer + cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, ECOSPA_PROGRESS_S="60"))
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"the job failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    with open(os.path.join(out, "manifest.json"), encoding="utf-8") as f:
        summary = json.load(f)["extra"]["summary"]
    shutil.rmtree(out, ignore_errors=True)
    flags = [c for c in cmd[4:] if c not in ("--out", out)]
    return {"command": "ecospa compress " + " ".join(shlex.quote(c) for c in flags),
            "steps": steps, "wall_s": round(wall, 1), "load_avg_start": round(load0, 2),
            "load_avg_end": round(os.getloadavg()[0], 2),
            "peak_rss_mb_time_v": _time_v_max_rss_mb(proc.stderr),
            "peak_rss_mb_job": summary.get("peak_rss_mb"), "dense_bytes": summary.get("dense_bytes"),
            "dense_params": summary.get("dense_params"), "phases": summary.get("phases"),
            "ppl_dense": summary.get("ppl_dense"), "ppl_dense_extra": summary.get("ppl_dense_extra"),
            "ppl_pruned": summary.get("ppl_pruned"), "ppl_reconstructed": summary.get("ppl_reconstructed"),
            "ppl_recovered": summary.get("ppl_recovered"), "ppl_extra": summary.get("ppl_extra")}


def results_path(quick: bool, out: str = None) -> str:
    """--out, else the quick file for --quick (never the committed one), else RESULTS."""
    return out or (QUICK_RESULTS if quick else RESULTS)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "llama-1.1b"],
                    help="smollm2-135m, llama-1.1b (random, TinyLlama's shape), llama-tiny, or a model path")
    ap.add_argument("--steps", type=int, nargs="+", default=[0], help="recovery steps of each job")
    ap.add_argument("--budget", type=float, default=0.5)
    ap.add_argument("--job-args", default=None,
                    help="more compress flags for every job (default: fewer batches/windows for the random models)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="llama-tiny only, --steps 2; writes the _quick file")
    ap.add_argument("--out", help=f"results file (default {os.path.relpath(RESULTS, ROOT)})")
    ap.add_argument("--merge", action="store_true",
                    help="keep the file's other rows (a row of the same model, steps and command is replaced)")
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.steps = ["llama-tiny"], [2]
    out_path = results_path(args.quick, args.out)
    import platform

    import torch
    from _common import cpu_features
    cond = {"cpu_count": os.cpu_count(), "threads": args.threads, "python": platform.python_version(),
            "torch": torch.__version__, "budget": args.budget, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_avg_start": round(os.getloadavg()[0], 2), **cpu_features(),
            "memory": "peak RSS: the job's VmHWM per phase and /usr/bin/time -v of the whole process"}
    print("conditions:", json.dumps(cond), flush=True)
    rows = []
    for name in args.models:
        with tempfile.TemporaryDirectory(prefix="ecospa-mem-") as tmp:
            model = name
            if name in SHAPES:
                model = os.path.join(tmp, name)
                t0 = time.perf_counter()
                write_random_llama(name, model)
                print(f"{name}: written by transformers in {time.perf_counter() - t0:.0f} s", flush=True)
            job_args = args.job_args if args.job_args is not None else DEFAULT_JOB_ARGS.get(name, "")
            for steps in args.steps:
                row = run_job(model, steps, args.budget, job_args, args.threads, tmp)
                fp32 = row["dense_bytes"]  # the dense tree as loaded: float32
                peak = max(x for x in (row["peak_rss_mb_time_v"], row["peak_rss_mb_job"]) if x)
                row.update(model=name, fp32_bytes=fp32, peak_over_fp32=round(peak * 2**20 / fp32, 2),
                           command=row["command"].replace(model, name))
                rows.append(row)
                print(f"{name} --steps {steps}: peak {peak / 1024:.2f} GiB = {row['peak_over_fp32']}x the "
                      f"float32 model ({fp32 / 2**30:.2f} GiB), wall {row['wall_s']:.0f} s, load "
                      f"{row['load_avg_start']}-{row['load_avg_end']}", flush=True)
                for p in row["phases"] or []:
                    print(f"    {p['phase']:<16} {p['peak_rss_mb'] / 1024:6.2f} GiB {p['seconds']:8.1f} s")
    from _common import write_results
    if args.merge and os.path.isfile(out_path):
        with open(out_path, encoding="utf-8") as f:
            before = json.load(f)
        new = {(r["model"], r["steps"], r["command"]) for r in rows}
        rows = [r for r in before.get("rows", []) if (r["model"], r["steps"], r["command"]) not in new] + rows
        cond = {"runs": before.get("conditions", {}).get("runs", [before.get("conditions")]) + [cond]}
    write_results(out_path, {"conditions": cond, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
