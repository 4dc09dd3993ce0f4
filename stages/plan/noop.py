"""The no-op fast path: `doit build` with nothing to do answers from a snapshot, without loading the recipe machinery.

A complete, passing build ends by recomputing its own plan once more (recipe load, every key, every store lookup)
while an audit hook records every file that planning opens and every directory it lists; the snapshot keeps
those with their (size, mtime_ns, inode), the project's code tree, the installed packages' directories, the
command line, the FORGE_* environment, each task's store entry and view link, and the manifest. A later run of
the same command checks exactly these (a few milliseconds) and, when all hold, prints what the full no-op prints.
Anything different, missing or unreadable (or `verify=1`, a remote, another dodo file) takes the full path, which
records a new snapshot when it completes. Light on purpose: json, os and the store only; no pydantic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.paths import REPO_DIR, artifacts_root
from stages.store import views
from stages.store.digests import signature, write_json_atomic
from stages.store.local import CACHE_DIR, Store

SNAPSHOT_DIR = (CACHE_DIR, "noop")
FORMAT = 1
CODE_TREES = ("stages",)
CODE_FILES = ("dodo.py", "pyproject.toml")
UNSAFE_VARS = ("verify", "remote", "remote_required")  # rehash requested, or a remote's line in the summary
LOG_VARS = ("FORGE_LOG", "FORGE_DEBUG")  # how much is said, not what is built

Signature = list[int] | None


def _signature(path: str) -> Signature:
    """The store's file signature, or None for a file that is not there (a file that appears is a change too)."""
    try:
        return signature(os.stat(path))
    except OSError:
        return None


def _dir_signature(path: str) -> Signature:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_mtime_ns, stat.st_ino]


def _tree(root: Path) -> dict[str, Signature]:
    """Every file under `root` with its signature: a new, removed or edited file changes the tree."""
    found: dict[str, Signature] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for name in files:
            if not name.endswith((".pyc", ".pyo")):
                path = os.path.join(folder, name)
                found[path] = _signature(path)
    return found


def invocation(cli_vars: dict[str, str]) -> dict[str, Any]:
    """What the command itself says: a snapshot answers only the same command from the same place."""
    return {"format": FORMAT, "cli": dict(sorted(cli_vars.items())), "cwd": os.getcwd(), "python": sys.executable,
            "version": sys.version, "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FORGE_") and k not in LOG_VARS}}


def eligible(cli_vars: dict[str, str]) -> bool:
    return not any(var in cli_vars for var in UNSAFE_VARS) and not os.environ.get("FORGE_REMOTE")


def snapshot_path(command: dict[str, Any]) -> Path:
    digest = hashlib.sha256(json.dumps(command, sort_keys=True).encode()).hexdigest()[:32]
    return artifacts_root().joinpath(*SNAPSHOT_DIR, f"{digest}.json")


def _environment(trees: list[Path]) -> dict[str, Any]:
    """The inputs read without an `open` the audit hook sees: code (by stat), packages (their directories change
    when one is installed, upgraded or removed), the model directory's files."""
    packages = sorted({sysconfig.get_paths()[key] for key in ("purelib", "platlib")})
    code: dict[str, Signature] = {}
    for root in [REPO_DIR / tree for tree in CODE_TREES] + trees:
        code.update(_tree(root))
    for name in CODE_FILES:
        code[str(REPO_DIR / name)] = _signature(str(REPO_DIR / name))
    return {"packages": {path: _dir_signature(path) for path in packages}, "trees": [str(t) for t in trees],
            "code": code}


@dataclass
class Reads:
    """Files opened and directories listed while recording (outside the artifacts root, which is checked by entry)."""

    files: set[str] = field(default_factory=set)
    dirs: set[str] = field(default_factory=set)


@contextlib.contextmanager
def recording() -> Iterator[Reads]:
    """Collect what planning reads through an audit hook (a hook cannot be removed: it goes quiet after the block)."""
    reads = Reads()
    excluded = str(artifacts_root().resolve()) + os.sep
    active = [True]

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if not active[0] or event not in ("open", "os.listdir", "os.scandir"):
            return
        target = args[0] if args else None
        if isinstance(target, bytes):
            target = os.fsdecode(target)
        if not isinstance(target, (str, os.PathLike)):
            return
        path = os.path.abspath(os.fspath(target) or ".")
        if (path + os.sep).startswith(excluded) or path.startswith(("/proc/", "/dev/", "/sys/")):
            return
        (reads.files if event == "open" else reads.dirs).add(path)

    sys.addaudithook(hook)
    try:
        yield reads
    finally:
        active[0] = False


def save(cli_vars: dict[str, str], reads: Reads, trees: list[Path], store: Store, view: str,
         entries: list[tuple[str, str, str]], links: dict[str, str], manifest: tuple[str, Path],
         banners: list[str]) -> None:
    """Write the snapshot for this command (atomically). `entries`: (task label, stage, key) in task order;
    `manifest`: the manifest task's label and file."""
    command = invocation(cli_vars)
    data = {"command": command, "files": {p: _signature(p) for p in sorted(reads.files)},
            "dirs": {p: _dir_signature(p) for p in sorted(reads.dirs)}, **_environment(trees),
            "store": str(store.root), "view": view, "entries": entries, "links": links,
            "manifest": [manifest[0], str(manifest[1]), _signature(str(manifest[1]))], "banners": banners}
    write_json_atomic(snapshot_path(command), data)


def forget(cli_vars: dict[str, str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        snapshot_path(invocation(cli_vars)).unlink()


@dataclass(frozen=True)
class Answer:
    """A no-op the snapshot vouches for: the task labels (in order) and the banners to print."""

    labels: list[str]
    banners: list[str]


def check(cli_vars: dict[str, str]) -> Answer | None:
    """The snapshot's answer if every input it lists is unchanged and every entry and link still holds, else None."""
    if not eligible(cli_vars):
        return None
    command = invocation(cli_vars)
    try:
        data = json.loads(snapshot_path(command).read_text())
    except (OSError, ValueError):
        return None
    try:
        return _answer(command, data)
    except (KeyError, TypeError, ValueError, OSError):
        return None


def _answer(command: dict[str, Any], data: dict[str, Any]) -> Answer | None:
    if data["command"] != command:
        return None
    if any(_signature(p) != s for p, s in data["files"].items()) or any(
            _dir_signature(p) != s for p, s in data["dirs"].items()):
        return None
    if _environment([Path(t) for t in data["trees"]]) != {k: data[k] for k in ("packages", "trees", "code")}:
        return None
    manifest_label, manifest, signature = data["manifest"]
    if _signature(manifest) != signature:
        return None
    store = Store(Path(data["store"]))
    store.open_session()
    for _, stage, key in data["entries"]:
        entry = store.lookup(stage, key)
        if entry is None or entry.report.get("passed") is False:
            return None
    if not views.links_match(store, data["view"], {label: Path(target) for label, target in data["links"].items()}):
        return None
    return Answer([label for label, _, _ in data["entries"]] + [manifest_label], list(data["banners"]))
