"""Shared helpers for the benchmark scripts: conditions, timing, results files."""
from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from typing import Callable

import torch


def cpu_features() -> dict:
    """The CPU's vector unit as torch's kernels see it ("AVX2", "AVX512") and whether it has
    bfloat16 matmuls (AVX512-BF16 / AMX): runs on machines that differ here are not comparable
    (a bfloat16 matmul is ~3x faster than float32 with AVX512-BF16, ~60x slower without)."""
    cpu = torch.backends.cpu
    out = {"cpu_capability": cpu.get_cpu_capability() if hasattr(cpu, "get_cpu_capability") else None}
    try:
        out["cpu_bf16"] = bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch
        out["cpu_bf16"] = None
    return out


def conditions(device: str, dtype: torch.dtype, **settings) -> dict:
    """Everything a reader needs to interpret the numbers."""
    import transformers  # noqa: F401  (version recorded when present)
    info = {"machine": platform.machine(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__,
            "device": device, "dtype": str(dtype).replace("torch.", ""),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), **cpu_features(), **settings}
    try:
        info["transformers"] = transformers.__version__
    except Exception:  # pragma: no cover
        pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median wall time of ``fn()`` in seconds after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_results(path: str, payload: dict) -> None:
    """Write JSON atomically (temp file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1)
        os.replace(tmp, path)
    except BaseException:  # the earlier file stays as it was, and no temp file is left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    print(f"wrote {path}")


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated while ``fn()`` runs, above what was allocated before it: measured by
    the allocator, not computed from tensor sizes. CUDA: ``torch.cuda.max_memory_allocated``.
    CPU: the torch profiler's memory events (every allocation and free of the CPU allocator while
    profiling, in order; blocks allocated before ``fn`` and freed inside it are not subtracted)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return int(peak)
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    total = peak = 0
    for _, nb in events:
        total += nb
        peak = max(peak, total)
    return int(peak)
