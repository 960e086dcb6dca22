"""README tables and plot of benchmarks/speed.py results (used by report.py's speed sections).

Tables: speedups eager and compiled (fraction of FLOP-ideal in parentheses), measured peak
training-step memory vs the kept-parameter ratio, compile times, and ecospa's forward vs
transformers' on the same weights (eager and compiled).
"""
from __future__ import annotations


def _cond_line(c: dict) -> str:
    keep = ("device", "gpu", "dtype", "torch", "transformers", "torch_threads", "cpu_count", "seq",
            "train_batch", "reps", "compile_mode", "load", "time", "note")
    return "Conditions: " + ", ".join(f"{k}={c[k]}" for k in keep if c.get(k) is not None)


def _cell(r: dict, key: str) -> str:
    if key + "_speedup" not in r:
        return "—"
    return f"{r[key + '_speedup']:.2f}x ({r[key + '_efficiency']:.0%})"


def speed_table(res: dict, brief: bool = False) -> str:
    """The README tables of one results file; ``brief``: the speedup table only."""
    rows_ = res["rows"]
    batches = sorted({int(k.split("_b")[1].split("_")[0]) for r in rows_ for k in r
                      if k.startswith("prefill_b") and k.endswith("_speedup")})
    modes = [m for m in ("eager", "compiled") if any(f"train_step_{m}_speedup" in r for r in rows_)]
    metrics = [f"prefill_b{b}" for b in batches] + ["train_step"]
    head = [f"{m.replace('_', ' ')} {mode}" for m in metrics for mode in modes]
    out = ["| model | kept | params | FLOP-ideal | " + " | ".join(head) + " |",
           "|---|---|---|---|" + "---|" * len(head)]
    for r in rows_:
        out.append(f"| {r['model']} | {r['kept_fraction']:.2f} | {r['params'] / 1e6:.1f}M | "
                   f"{r['flop_ideal_speedup']:.2f}x | "
                   + " | ".join(_cell(r, f"{m}_{mode}") for m in metrics for mode in modes) + " |")
    if brief:
        return "\n".join([_cond_line(res["conditions"]) + f", multiple_of={res['conditions'].get('multiple_of', 1)}",
                          "", *out])
    mem = [k for k in ("eager", "compiled") if any(f"train_peak_bytes_{k}" in r for r in rows_)]
    if mem:
        out += ["", "| model | kept | params ratio | " + " | ".join(
            f"peak step memory {k} (MB, ratio, minus params ratio)" for k in mem) + " | computed train-state ratio |",
                "|---|---|---|" + "---|" * len(mem) + "---|"]
        for r in rows_:
            cells = []
            for k in mem:
                if f"train_peak_bytes_{k}" in r:
                    ratio = r[f"train_peak_ratio_{k}"]
                    cells.append(f"{r[f'train_peak_bytes_{k}'] / 2**20:.0f}, {ratio:.2f}, "
                                 f"{100 * (ratio - r['params_ratio']):+.0f} pts")
                else:
                    cells.append("—")
            out.append(f"| {r['model']} | {r['kept_fraction']:.2f} | {r['params_ratio']:.2f} | "
                       + " | ".join(cells) + f" | {r['memory_ratio']:.2f} |")
    comp = [k for k in (f"{m}_compiled_compile_s" for m in metrics) if any(k in r for r in rows_)]
    if comp:
        out += ["", "| model | kept | " + " | ".join(
            f"first compiled call, {k[: -len('_compiled_compile_s')].replace('_', ' ')} (s)" for k in comp) + " |",
                "|---|---|" + "---|" * len(comp)]
        for r in rows_:
            out.append(f"| {r['model']} | {r['kept_fraction']:.2f} | "
                       + " | ".join(f"{r[k]:.1f}" if k in r else "—" for k in comp) + " |")
    ov = [(name, o) for name, o in (res.get("overhead") or {}).items() if o and "ecospa_over_transformers" in o]
    if ov:
        out += ["", "| model | batch x seq | ecospa / transformers, eager | ecospa compiled / transformers compiled "
                    "| ecospa compiled / transformers eager |", "|---|---|---|---|---|"]
        for name, o in ov:
            def f(k):
                return f"{o[k]:.3f}" if k in o else "—"
            out.append(f"| {name} | {o['batch']} x {o['seq']} | {f('ecospa_over_transformers')} | "
                       f"{f('ecospa_compiled_over_transformers_compiled')} | {f('ecospa_compiled_over_transformers_eager')} |")
    note = ("Speedups are dense time / pruned time (medians of interleaved repetitions), in parentheses the "
            "fraction of the FLOP-ideal speedup reached. Compiled = `torch.compile(fullgraph=True, dynamic=False)` "
            "(train step: the loss-and-gradient function; AdamW's update eager, as in `ecospa train`). "
            "Peak step memory is measured by the allocator (CUDA: `max_memory_allocated`; CPU: the torch "
            "profiler's memory events) while one step runs from scratch: parameters cloned, AdamW state "
            "initialised, gradients, update. 'minus params ratio' is the gap to the kept-parameter ratio "
            "in percentage points. The computed train-state ratio is params + grads + AdamW moments from "
            "tensor sizes. Overhead ratios < 1 mean ecospa is faster.")
    extra = [f"Other models' conditions: " + "; ".join(f"{m}: {_cond_line(c)[12:]}" for m, c in
                                                       res["conditions_of_other_models"].items())] \
        if res.get("conditions_of_other_models") else []
    return "\n".join([_cond_line(res["conditions"]), *extra, "", *out, "", note])


def plot_speed(res: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model in sorted({r["model"] for r in res["rows"]}):
        rs = [r for r in res["rows"] if r["model"] == model]
        ideal = [r["flop_ideal_speedup"] for r in rs]
        for key, style in [("prefill_b8_eager", "o-"), ("train_step_eager", "s--"),
                           ("prefill_b8_compiled", "^-"), ("train_step_compiled", "v--")]:
            if all(key + "_speedup" in r for r in rs):
                ax.plot(ideal, [r[key + "_speedup"] for r in rs], style,
                        label=f"{model} {key.replace('_', ' ')}")
    lim = max(r["flop_ideal_speedup"] for r in res["rows"]) * 1.05
    ax.plot([1, lim], [1, lim], "k:", label="FLOP-ideal")
    ax.set_xlabel("FLOP-ideal speedup"), ax.set_ylabel("measured speedup vs dense")
    ax.set_title(f"pruned vs dense ({res['conditions']['device']}, {res['conditions']['dtype']})")
    ax.legend(fontsize=6), fig.tight_layout(), fig.savefig(path, dpi=110), plt.close(fig)
    print(f"wrote {path}")
