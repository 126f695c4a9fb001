"""The package's imports run one way and in no circle (docs/architecture.md):

    errors <- ops, sample <- quant, model <- weights <- spec <- engine <- serve <- cli

A module imports only from packages below its own (or its own package), at module level:
an import inside a function is how a circle hides, so none is allowed. The package's
__init__ and the `python -m` entry points sit on top of everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

RANK = {"errors": 0, "ops": 1, "sample": 1, "quant": 2, "model": 2, "weights": 3, "spec": 4, "engine": 5,
        "serve": 6, "cli": 7}
TOP = 8  # sybil/__init__.py and the entry points (sybil/generate.py, sybil/serve/__main__.py, ...)


def _module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _rank(root: Path, path: Path) -> tuple[str, int]:
    """(package, rank) of a source file under root (the sybil folder)."""
    rel = path.relative_to(root).parts
    if rel[-1] == "__main__.py" or len(rel) == 1 and rel[0] != "errors.py":
        return "", TOP
    package = rel[0].removesuffix(".py")
    return package, RANK[package]


def _imports(tree: ast.Module, name: str) -> list[tuple[str, bool, int]]:
    """(imported sybil module, at module level?, line) for every import in the tree."""
    out = []
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            mods = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            if m == "sybil" or m.startswith("sybil."):
                out.append((m, id(node) in top, node.lineno))
    return out


def violations(root: Path) -> list[str]:
    """Every import in the tree at root that breaks the layering, and every circle."""
    files = {_module_name(root, p): p for p in root.rglob("*.py")}
    problems, graph = [], {}
    for name, path in files.items():
        package, rank = _rank(root, path)
        graph[name] = set()
        for target, top, line in _imports(ast.parse(path.read_text()), name):
            if target not in files:  # `from sybil.ops import native` names a module; `... import X` a name
                continue
            where = f"{path.relative_to(root.parent)}:{line} imports {target}"
            if not top:
                problems.append(f"{where} inside a function")
            graph[name].add(target)
            parts = target.split(".")
            if len(parts) == 1:  # the package itself: its __init__ is on top
                problems.append(f"{where}: the package's __init__ is above every module")
                continue
            their_package = parts[1]
            their_rank = RANK.get(their_package, TOP)
            if their_package != package and their_rank >= rank:
                problems.append(f"{where}: {package or 'the top'} (layer {rank}) may not import "
                                f"{their_package} (layer {their_rank})")
    seen, stack = set(), []

    def visit(node: str) -> None:
        if node in stack:
            problems.append("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in graph and nxt != node:
                visit(nxt)
        stack.pop()

    for node in sorted(graph):
        visit(node)
    return problems


def test_sybil_imports_run_one_way_with_no_circle():
    assert violations(REPO / "sybil") == []


def test_the_check_catches_an_upward_import_a_function_import_and_a_circle(tmp_path):
    root = tmp_path / "sybil"
    for pkg in ("ops", "engine", "model"):
        (root / pkg).mkdir(parents=True)
        (root / pkg / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    (root / "ops" / "a.py").write_text("from sybil.engine import b\n")  # upward
    (root / "engine" / "b.py").write_text("def f():\n    from sybil.ops import a\n")  # inside a function
    (root / "model" / "c.py").write_text("from sybil.model import d\n")
    (root / "model" / "d.py").write_text("from sybil.model import c\n")  # a circle within one package
    found = "\n".join(violations(root))
    assert "sybil/ops/a.py:1 imports sybil.engine.b: ops (layer 1) may not import engine (layer 5)" in found
    assert "sybil/engine/b.py:2 imports sybil.ops.a inside a function" in found
    assert "import circle: sybil.model.c -> sybil.model.d -> sybil.model.c" in found


def test_the_engine_calls_interfaces_and_never_probes_them():
    """The engine and the scheduler call what Drafter and Controller declare: no hasattr or
    getattr on what they were given (sybil.spec.drafter, sybil.spec.controller)."""
    probes = []
    for path in [*(REPO / "sybil" / "engine").glob("*.py"), REPO / "sybil" / "serve" / "scheduler.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr"):
                probes.append(f"{path.name}:{node.lineno} {node.func.id}")
    assert probes == []
