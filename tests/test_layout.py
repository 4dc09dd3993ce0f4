"""The folders are the layers (docs/architecture.md): every import of stages/, at module level, inside functions,
in thunks and under TYPE_CHECKING, goes one way, with no cycle between modules or packages."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "stages"
STAGE_MODULES = ("pipeline_check", "validate", "engine", "quantize", "precision", "surgery", "export", "calibration",
                 "checkpoint")
# Top to bottom; a module may import its own layer's modules (no cycle) and any layer below it.
LAYERS: list[tuple[str, ...]] = [
    ("tasks",), ("audit",), ("records",), ("plan",), STAGE_MODULES, ("runtime",), ("recipe",), ("families",), ("graphs",),
    ("targets",), ("store",), ("inputs", "reports"), ("language", "safetensors", "log", "paths", "errors"),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in PACKAGE.rglob("*.py")}


def imports_of(path: Path, own: str = "") -> set[str]:
    """Project modules a file names in any import statement: `from a import b` is `a.b` when that is a module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
    return {name for name in found if name in MODULES and name != own}


GRAPH = {name: imports_of(path, name) for name, path in MODULES.items()}


def group(module: str) -> str:
    """`stages.<first part>`: a subpackage or a top-level module."""
    return ".".join(module.split(".")[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node], _ = 1, path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node], _ = 2, path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_between_modules() -> None:
    assert find_cycle(GRAPH) is None, " -> ".join(find_cycle(GRAPH) or [])


def test_no_import_cycle_between_packages() -> None:
    packages: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        packages.setdefault(group(module), set()).update(group(t) for t in targets if group(t) != group(module))
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_imports_go_down_the_layers() -> None:
    rank = {f"stages.{name}": level for level, names in enumerate(LAYERS) for name in names}
    unplaced = sorted({group(m) for m in MODULES if m != "stages"} - set(rank))
    assert unplaced == [], f"modules without a layer: {unplaced} (add them to LAYERS and docs/architecture.md)"
    upward = [f"{m} -> {t}" for m, targets in sorted(GRAPH.items()) for t in sorted(targets)
              if m != "stages" and group(m) != group(t) and rank[group(t)] < rank[group(m)]]
    assert upward == []


def test_only_tasks_imports_doit_and_no_project_code_is_wired_by_strings() -> None:
    doit_users, wired = [], []
    reference = re.compile(r"""["']stages(\.\w+)+:\w+["']|import_module\(""")
    for name, path in MODULES.items():
        text = path.read_text()
        tree = ast.parse(text)
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | {
            n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(n == "doit" or n.startswith("doit.") for n in names) and group(name) != "stages.tasks":
            doit_users.append(name)
        wired += [f"{name}: {m.group(0)}" for m in reference.finditer(text)]
    assert doit_users == [] and wired == []


def test_the_checker_sees_cycles_inside_functions(tmp_path: Path) -> None:
    """The cycle finder on a graph with a function-level back edge (as `recipe` <-> `fit` once had)."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    module = tmp_path / "m.py"
    module.write_text("def late():\n    from stages.recipe import load\n    return load\n")
    assert imports_of(module) == {"stages.recipe.load"}
