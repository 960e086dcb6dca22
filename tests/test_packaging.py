"""The base install runs the main job: in an interpreter that sees only the installed modules that
ecospa's base requirements bring (a view of site-packages without the others, as on a machine
where only `pip install -e .` ran), ``ecospa train`` trains, saves and reloads its checkpoint.

Regression: safetensors imports numpy inside ``save_file`` but declares it only as an extra, and
torch does not depend on it; a base install died after two minutes of training when the first
checkpoint was written. Opportunistic imports (torch trying ``dill``, tqdm trying ``colorama``)
handle the ImportError themselves and are fine.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import pathlib
import re
import subprocess
import sys
import sysconfig
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, sys
    from ecospa import cli
    rc = cli.main(["train", "--steps", "6", "--eval-every", "3", "--sparsity", "0",
                   "--out", sys.argv[1], "--no-progress"])  # trains, evaluates, checkpoints twice
    from ecospa.io import checkpoint
    checkpoint.load(sys.argv[1] + "/checkpoint")
    print(json.dumps({"rc": rc}))
""")


def _name(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def _base_closure(dist: str) -> set[str]:
    """``dist`` and everything its non-extra requirements pull in, recursively (markers evaluated)."""
    from packaging.requirements import Requirement
    seen, todo = set(), [dist]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = md.requires(name) or []
        except md.PackageNotFoundError:
            continue
        for text in reqs:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue  # an extra, or not for this platform
            todo.append(_name(req.name))
    return seen


def not_base_modules() -> list[str]:
    """Top-level modules of installed distributions outside ecospa's base requirement closure."""
    closure = _base_closure("ecospa")
    stdlib = set(sys.stdlib_module_names)
    out = set()
    for module, dists in md.packages_distributions().items():
        if module in stdlib or module == "ecospa" or module.startswith("_"):
            continue
        if not {_name(d) for d in dists} & closure:
            out.add(module)
    return sorted(out)


def base_view(directory: pathlib.Path, blocked: set) -> pathlib.Path:
    """A directory of links to every site-packages entry except the blocked modules."""
    site = pathlib.Path(sysconfig.get_paths()["purelib"])
    directory.mkdir()
    for entry in site.iterdir():
        module = entry.name.split(".")[0] if entry.suffix in (".py", ".so", "") else None
        if module is None or module in blocked or entry.suffix == ".pth":
            continue  # metadata dirs, .pth hooks (the editable install) and blocked modules
        (directory / entry.name).symlink_to(entry)
    return directory


@pytest.mark.slow
def test_main_job_runs_with_only_base_dependencies(tmp_path):
    pytest.importorskip("packaging")
    blocked = set(not_base_modules())
    assert "pytest" in blocked and "torch" not in blocked and "safetensors" not in blocked
    view = base_view(tmp_path / "site", blocked)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(view), str(ROOT)]), PYTHONNOUSERSITE="1")
    out = subprocess.run([sys.executable, "-S", "-c", SCRIPT, str(tmp_path / "run")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, ("the main job needs a module that a base install does not bring "
                                 f"(declare it in [project] dependencies):\n{out.stderr[-3000:]}")
    assert json.loads(out.stdout.strip().splitlines()[-1])["rc"] == 0
