"""The "Levers of issue 28" section of docs/BENCHMARKS.md, from results/compress_levers28.json
(rows written by benchmarks/job_rows.py)."""
from __future__ import annotations


def _x(v, dense):
    return f"{v:.2f} ({v / dense:.3f}x)" if v is not None and dense else "–"


def levers28_section(res: dict) -> str:
    """One line per job: pydoc VAL after the refit, the curve points, and both held-out texts at
    the end (stdlib also as a ratio to the dense model)."""
    rows = res.get("rows") or []
    if not rows:
        return "(no results: run benchmarks/job_rows.py)"
    out = ["| run | recovery steps | pydoc after refit | curve (step: pydoc / stdlib) | pydoc at the end | "
           "stdlib at the end (x dense) |", "|---|---|---|---|---|---|"]
    for r in rows:
        dense_std = (r.get("ppl_dense_extra") or {}).get("stdlib")
        curve = ", ".join(f"{p['step']}: {p['ppl']:.2f} / {p['ppl_extra'].get('stdlib', float('nan')):.2f}"
                          for p in r.get("curve") or []) or "–"
        std = (r.get("ppl_extra") or {}).get("stdlib")
        refit = f"{r['ppl_reconstructed']:.2f}" if r.get("ppl_reconstructed") else "–"
        out.append(f"| {r['label']} | {r['steps']} | {refit} | {curve} | {r['ppl_recovered']:.2f} | {_x(std, dense_std)} |")
    dense = rows[-1]
    notes = [f"Dense SmolLM2-135M: pydoc val {dense['ppl_dense']:.2f}, stdlib val "
             f"{(dense.get('ppl_dense_extra') or {}).get('stdlib', float('nan')):.2f}. With `--steps 0` the end IS "
             "the model right after the gradient-free stages (calibration, obs scores, refit)."]
    notes += [f"- {r['label']}: `{r['command']}`" + (f" ({r['note']})" if r.get("note") else "") for r in rows]
    return "\n".join(out + [""] + notes)
