"""``python -m ecospa.cli.harness``: lm-evaluation-harness tasks on an ecospa model (needs the
``eval`` extra; the adapter itself is ``ecospa.jobs.harness.EcospaLM``)."""
from __future__ import annotations

import argparse
import json

import lm_eval
from lm_eval.tasks import TaskManager

from ecospa.jobs.harness import EcospaLM


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ecospa.cli.harness",
                                description="lm-evaluation-harness tasks on an ecospa model")
    p.add_argument("--model", required=True, help="registry name, .gguf, HF directory or ecospa checkpoint")
    p.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    p.add_argument("--include-path", help="directory with local task YAMLs (offline tasks)")
    p.add_argument("--limit", type=int, help="examples per task (for a quick look)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int)
    p.add_argument("--out", help="write the results JSON here")
    args = p.parse_args(argv)
    lm = EcospaLM(args.model, max_length=args.max_length, batch_size=args.batch_size)
    res = lm_eval.simple_evaluate(model=lm, tasks=args.tasks.split(","), limit=args.limit,
                                  task_manager=TaskManager(include_path=args.include_path))
    print(json.dumps(res["results"], indent=1, default=str))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res["results"], f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
