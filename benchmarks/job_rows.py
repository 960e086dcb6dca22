"""Record finished `ecospa compress` jobs as rows of a results file (the lever runs of issue 28).

    python benchmarks/job_rows.py --out benchmarks/results/compress_levers28.json \\
        --label "--calib-text teacher, --steps 0" --command "python -m ecospa compress ..." /tmp/cteach

Reads each job's summary from its checkpoint (``--out`` of the job; only the manifest is read, not
the tensors) and writes one row per job: its held-out numbers after pruning, after the refit, at
each ``--eval-at`` point and at the end (the VAL split of ``--data`` and of every ``--eval-extra``
source), its phase times and peak memory. A row with the same label is replaced; the file is
written atomically. `benchmarks/report.py` renders it (docs/BENCHMARKS.md "Levers of issue 28").
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from ecospa.io.checkpoint import load_extra  # noqa: E402
from ecospa.io.files import atomic_write  # noqa: E402

KEEP = ("ppl_dense", "ppl_dense_extra", "ppl_pruned", "ppl_extra", "curve", "phase_seconds", "peak_rss_mb",
        "dense_bytes", "dense_eval_cached")


def row_of(checkpoint: str, label: str, command: str, note: str = "") -> dict:
    """One results row from the compress checkpoint at ``checkpoint``."""
    s = load_extra(checkpoint).get("summary")
    if not s:
        raise SystemExit(f"{checkpoint}: no compress summary in its manifest (is it an `ecospa compress --out`?)")
    r0 = s["rounds"][0]
    row = {"label": label, "command": command, "steps": s["job"]["steps"], "job": s["job"],
           "ppl_reconstructed": r0.get("ppl_reconstructed"), "ppl_recovered": s["rounds"][-1]["ppl_recovered"],
           **{k: s.get(k) for k in KEEP}}
    if note:
        row["note"] = note
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoints", nargs="+", help="the jobs' --out directories")
    ap.add_argument("--out", required=True, help="results file (JSON) to add the rows to")
    ap.add_argument("--label", action="append", required=True, help="one per checkpoint, in order")
    ap.add_argument("--command", action="append", required=True, help="one per checkpoint, in order")
    ap.add_argument("--note", default="", help="conditions of these runs (threads, load), for the readers")
    args = ap.parse_args(argv)
    if not len(args.checkpoints) == len(args.label) == len(args.command):
        ap.error("give one --label and one --command per checkpoint")
    res = json.load(open(args.out)) if os.path.exists(args.out) else {"rows": []}
    for ckpt, label, cmd in zip(args.checkpoints, args.label, args.command):
        row = dict(row_of(ckpt, label, cmd, args.note), recorded=time.strftime("%Y-%m-%d %H:%M"))
        res["rows"] = [r for r in res["rows"] if r["label"] != label] + [row]
    atomic_write(args.out, json.dumps(res, indent=1))
    print(f"{args.out}: {len(res['rows'])} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
