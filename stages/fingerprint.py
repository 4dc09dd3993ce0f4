"""What a store key is made of: canonical digests, tool versions, the code a stage can run, checkpoint identity.

Light on purpose (stdlib only): the task graph uses it without importing torch or numpy.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import itertools
import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LOG = logging.getLogger("forge.identity")

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGE = "stages"


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data: Any, length: int = 32) -> str:
    return hashlib.sha256(canonical(data)).hexdigest()[:length]


def tool_versions(packages: Iterable[str]) -> dict[str, str | None]:
    return {"python": sys.version.split()[0], **{package: package_version(package) for package in packages}}


_VERSIONS: dict[str, str | None] = {}


def package_version(package: str) -> str | None:
    """The installed version (None if absent), read from the metadata headers only: importlib's `version()`
    parses the whole METADATA file, long description included, which a no-op rebuild would pay 40 times."""
    if package not in _VERSIONS:
        try:
            distribution = importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            _VERSIONS[package] = None
            return None
        text = distribution.read_text("METADATA") or distribution.read_text("PKG-INFO") or ""
        headers = itertools.takewhile(bool, text.splitlines())
        found = next((line.split(":", 1)[1].strip() for line in headers if line.startswith("Version:")), None)
        _VERSIONS[package] = found or distribution.version
    return _VERSIONS[package]


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


def _parse_imports(source: str, filename: str) -> tuple[str, ...]:
    """Every project module a source imports anywhere (top level or inside functions), with parent packages."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            parts = name.split(".")
            found.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return tuple(sorted(m for m in found if _module_file(m) is not None))


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

    def imports(self, path: Path) -> tuple[str, ...]:
        memo = self._load()
        stat = path.stat()
        signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
        name = str(path)  # absolute: two checkouts may share one artifacts root
        known = memo.get(name)
        if not (isinstance(known, list) and len(known) == 4 and known[:3] == signature):
            known = [*signature, list(_parse_imports(path.read_text(), str(path)))]
            memo[name] = known
            self._dirty = True
        return tuple(known[3])

    def closure(self, roots: Iterable[str]) -> list[Path]:
        """Files of the root modules and of every project module they import, transitively."""
        seen: dict[str, Path] = {}
        pending = [m for root in roots for m in _with_parents(root)]
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

    def digest(self, roots: Iterable[str]) -> str:
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
        _write_json_atomic(self.memo_path, self._memo)
        self._dirty = False


def _write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def module_closure(roots: Iterable[str]) -> list[Path]:
    """Files of the root modules and of every project module they import, transitively (parsed afresh)."""
    return CodeIndex().closure(roots)


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def code_digest(roots: Iterable[str]) -> str:
    """Digest of the source of every project module the roots can execute (path and bytes)."""
    return CodeIndex().digest(roots)


# -- checkpoint identity: file digests, memoised by (path, size, mtime, inode) --------------------------------


class FileDigests:
    """sha256 of checkpoint files, hashed once and remembered while size, mtime and inode stay the same.

    A 57 GB checkpoint is hashed once (with progress), after that each run only stats it. `rehash=True`
    (verify=1) ignores the memo.
    """

    PROGRESS_BYTES = 256 << 20

    def __init__(self, memo_path: Path, rehash: bool = False) -> None:
        self.memo_path = memo_path
        self.rehash = rehash
        self._memo: dict[str, list[Any]] | None = None
        self._dirty = False

    def _load(self) -> dict[str, list[Any]]:
        if self._memo is None:
            try:
                self._memo = json.loads(self.memo_path.read_text())
            except (OSError, ValueError):
                self._memo = {}
        return self._memo

    def of(self, root: Path, relative: Iterable[str]) -> dict[str, str]:
        memo = self._load()
        result = {}
        for name in sorted(relative):
            path = (root / name).resolve()
            stat = path.stat()
            signature = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
            known = memo.get(str(path))
            if self.rehash or known is None or known[:3] != signature:
                started = time.perf_counter()
                if stat.st_size >= self.PROGRESS_BYTES:
                    LOG.info(f"hashing {name} ({stat.st_size / 1e9:.2f} GB)")
                from stages.store import sha256_file

                known = [*signature, sha256_file(path)]
                memo[str(path)] = known
                self._dirty = True
                if stat.st_size >= self.PROGRESS_BYTES:
                    took = time.perf_counter() - started
                    LOG.info(f"{name}: {stat.st_size / 1e9 / max(took, 1e-9):.2f} GB/s")
            result[name] = known[3]
        self.save()
        return result

    def save(self) -> None:
        if not self._dirty or self._memo is None:
            return
        _write_json_atomic(self.memo_path, self._memo)
        self._dirty = False


def checkpoint_files(root: Path, folders: Iterable[str]) -> list[str]:
    """Files (relative) a stage can read from a diffusers checkpoint: those of its folders (or top-level files)."""
    files = []
    for top in (root / f for f in folders):
        candidates = [top] if top.is_file() else sorted(top.rglob("*")) if top.is_dir() else []
        files += [str(p.relative_to(root)) for p in candidates
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    return sorted(files)
