"""What a store key is made of: canonical digests, tool versions, the code a stage can run, checkpoint identity.

Light on purpose (stdlib only): the task graph uses it without importing torch or numpy.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import itertools
import json
import logging
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from stages.paths import REPO_DIR
from stages.store.digests import signature, write_json_atomic

LOG = logging.getLogger("forge.identity")

PACKAGE_ROOT = REPO_DIR
PROJECT_PACKAGE = "stages"


def tool_versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {"python": sys.version.split()[0], **{package: package_version(package) for package in packages}}


@functools.lru_cache(maxsize=None)
def package_version(package: str) -> str | None:
    """The installed version (None if absent), read from the metadata headers only: importlib's `version()`
    parses the whole METADATA file, long description included, which a no-op rebuild would pay 40 times."""
    try:
        distribution = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        return None
    text = distribution.read_text("METADATA") or distribution.read_text("PKG-INFO") or ""
    headers = itertools.takewhile(bool, text.splitlines())
    found = next((line.split(":", 1)[1].strip() for line in headers if line.startswith("Version:")), None)
    return found or distribution.version


# -- code: the transitive closure of project imports -----------------------------------------------------------


def _module_file(module: str) -> Path | None:
    parts = module.split(".")
    if parts[0] != PROJECT_PACKAGE:
        return None
    base = PACKAGE_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_thunk(node: ast.AST) -> bool:
    """A lazy reference: a module-level function without arguments whose body (after a docstring) is one import
    and a `return` of the imported name. It names code without running it, so its import is not an edge of the
    importing module's closure; a task that calls one names it among its roots instead (`thunk_target`)."""
    if not isinstance(node, ast.FunctionDef) or node.args.args or node.args.kwonlyargs or node.args.vararg:
        return False
    body = [n for n in node.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    return (len(body) == 2 and isinstance(body[0], (ast.Import, ast.ImportFrom)) and isinstance(body[1], ast.Return)
            and isinstance(body[1].value, ast.Name))


def _is_type_checking(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` blocks: imports for annotations only, never executed."""
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def executed_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: top level and inside functions, not in thunks or TYPE_CHECKING blocks."""
    pending: list[ast.AST] = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not (is_thunk(node) and node in getattr(tree, "body", ())) and not _is_type_checking(node):
            pending.extend(ast.iter_child_nodes(node))


def imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    """Dotted names an absolute import statement names (`from a import b` names `a` and `a.b`)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.module and node.level == 0:
        return [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return []


def _parse_imports(source: str, filename: str) -> tuple[tuple[str, ...], dict[str, str]]:
    """(every project module the source can import, with parent packages; {thunk name: its target})."""
    tree = ast.parse(source, filename=filename)
    found: set[str] = set()
    for node in executed_imports(tree):
        for name in imported_names(node):
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    thunks = {}
    for node in tree.body:
        if is_thunk(node):
            statement = node.body[-2]  # type: ignore[attr-defined]
            if isinstance(statement, ast.ImportFrom) and statement.module:
                module, name = statement.module, statement.names[0].name
                thunks[node.name] = f"{module}.{name}" if _module_file(f"{module}.{name}") else f"{module}:{name}"
            else:
                thunks[node.name] = statement.names[0].name
    return tuple(sorted(m for m in found if _module_file(m) is not None)), thunks


class CodeIndex:
    """The project's import graph, each file parsed once and remembered while its size, mtime and inode stay the
    same (as the store's stat cache does): a no-op rebuild must not re-parse every module for every task.

    The digest itself always covers the files' current bytes; only the parse is cached. `memo_path=None` keeps
    the memo in memory.
    """

    def __init__(self, memo_path: Path | None = None) -> None:
        self.memo_path = memo_path
        self._memo: dict[str, list[Any]] | None = None
        self._dirty = False
        self._digests: dict[tuple[str, ...], str] = {}

    def _load(self) -> dict[str, list[Any]]:
        if self._memo is None:
            self._memo = {}
            if self.memo_path is not None:
                try:
                    loaded = json.loads(self.memo_path.read_text())
                    self._memo = loaded if isinstance(loaded, dict) else {}
                except (OSError, ValueError):
                    pass
        return self._memo

    def _parsed(self, path: Path) -> list[Any]:
        memo = self._load()
        current = signature(path.stat())
        name = str(path)  # absolute: two checkouts may share one artifacts root
        known = memo.get(name)
        if not (isinstance(known, list) and len(known) == 5 and known[:3] == current):
            imports, thunks = _parse_imports(path.read_text(), str(path))
            known = [*current, list(imports), thunks]
            memo[name] = known
            self._dirty = True
        return known

    def imports(self, path: Path) -> tuple[str, ...]:
        return tuple(self._parsed(path)[3])

    def thunk_target(self, thunk: Callable[[], Any]) -> str:
        """What a thunk refers to, read from its source: `package.module`, or `package.module:name` for a function."""
        path = _module_file(thunk.__module__)
        target = self._parsed(path)[4].get(thunk.__name__) if path else None
        if target is None:
            raise ValueError(f"{thunk.__module__}.{thunk.__qualname__} is not a thunk (one import, one return)")
        return target

    def closure(self, roots: Iterable[str | Callable[[], Any]]) -> list[Path]:
        """Files of the root modules (or thunks' targets) and of every project module they import, transitively."""
        seen: dict[str, Path] = {}
        names = [root if isinstance(root, str) else self.thunk_target(root).split(":")[0] for root in roots]
        pending = [m for root in names for m in _with_parents(root)]
        while pending:
            module = pending.pop()
            if module in seen:
                continue
            path = _module_file(module)
            if path is None:
                continue
            seen[module] = path
            pending.extend(self.imports(path))
        self.save()
        return sorted(set(seen.values()))

    def digest(self, roots: Iterable[str | Callable[[], Any]]) -> str:
        """Digest of the source of every project module the roots can execute (path and bytes)."""
        key = tuple(roots)
        if key not in self._digests:
            hasher = hashlib.sha256()
            for path in self.closure(key):
                hasher.update(str(path.relative_to(PACKAGE_ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
            self._digests[key] = hasher.hexdigest()[:32]
        return self._digests[key]

    def save(self) -> None:
        if not self._dirty or self._memo is None or self.memo_path is None:
            return
        write_json_atomic(self.memo_path, self._memo)
        self._dirty = False


def module_closure(roots: Iterable[str | Callable[[], Any]]) -> list[Path]:
    """Files of the root modules and of every project module they import, transitively (parsed afresh)."""
    return CodeIndex().closure(roots)


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def code_digest(roots: Iterable[str | Callable[[], Any]]) -> str:
    """Digest of the source of every project module the roots can execute (path and bytes)."""
    return CodeIndex().digest(roots)


def checkpoint_files(root: Path, folders: Iterable[str]) -> list[str]:
    """Files (relative) a stage can read from a diffusers checkpoint: those of its folders (or top-level files)."""
    files = []
    for top in (root / f for f in folders):
        candidates = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        files += [str(p.relative_to(root)) for p in candidates
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)
