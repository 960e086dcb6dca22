"""The package's layers import one way: core <- func <- io <- train <- jobs <- cli.

Every module's imports are read from its source (``ast``, nothing is executed), including
imports inside functions, and each ``ecospa`` import must go to the same layer or a lower one.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "ecospa"
# Lowest first; a module may import from its own layer and the ones before it.
LAYERS = ("core", "func", "io", "train", "jobs", "cli")


def layer_of(module: str) -> str:
    """'ecospa.io.hf' -> 'io'; top-level modules ('ecospa.groups', 'ecospa') are the core, except
    ``ecospa.__main__`` (``python -m ecospa``), the CLI's entry point."""
    if module == "ecospa.__main__":
        return "cli"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS[1:]:
        return parts[1]
    return "core"


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def imports(path: Path) -> list:
    """(line, imported ecospa module) for every import statement in the file."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, me: str, is_package: bool = False) -> list:
    tree = ast.parse(source)
    package = me if is_package else me.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "ecospa"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "ecospa":
                continue
            # "from ecospa import io" / "from ecospa.io import load": the names may be modules
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub if layer_of(sub) != layer_of(target) else target))
    return out


MODULES = sorted(ROOT.rglob("*.py"))


def test_every_layer_has_modules():
    assert {layer_of(module_name(p)) for p in MODULES} == set(LAYERS)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(ROOT.parent)))
def test_no_upward_import(path):
    mine = LAYERS.index(layer_of(module_name(path)))
    upward = [f"line {line}: {target} ({layer_of(target)})" for line, target in imports(path)
              if LAYERS.index(layer_of(target)) > mine]
    assert not upward, (f"{module_name(path)} is in layer {LAYERS[mine]!r} and imports from a "
                        f"higher layer: {upward}")


def test_the_checker_sees_upward_imports():
    """The parser itself: absolute, relative, 'from package import module' and in-function imports."""
    source = ("from ecospa import select\nfrom ecospa.io import load\nfrom ..cli import main\n"
              "def f():\n    import ecospa.train.loop\n")
    found = [(line, layer_of(m)) for line, m in imports_in(source, "ecospa.func.llama")]
    assert found == [(1, "core"), (2, "io"), (3, "cli"), (5, "train")]
