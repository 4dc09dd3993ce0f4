"""Artifact layout, atomic writes and stage records (the per-stage receipts the manifest is assembled from).

A stage writes everything into a scratch directory and renames it into place at the end, record last, so
an interrupted run leaves either the previous complete output or nothing: never a half-written file that
looks up to date.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ARTIFACTS_DIR = Path(os.environ.get("FORGE_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
RECORD_NAME = "record.json"


def recipe_dir(recipe_name: str) -> Path:
    return ARTIFACTS_DIR / recipe_name


def stage_dir(recipe_name: str, component: str | None, stage: str) -> Path:
    """artifacts/<recipe>/<component>/<stage>; recipe-wide stages (checkpoint) have no component."""
    base = recipe_dir(recipe_name)
    return base / component / stage if component else base / stage


def record_path(recipe_name: str, component: str | None, stage: str) -> Path:
    return stage_dir(recipe_name, component, stage) / RECORD_NAME


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@contextlib.contextmanager
def staged_output(final_dir: Path) -> Iterator[Path]:
    """Yield a scratch dir that replaces `final_dir` only if the block completes."""
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".{final_dir.name}.", suffix=".tmp"))
    try:
        yield scratch
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(scratch, final_dir)


def write_record(scratch: Path, stage: str, report: dict[str, Any]) -> dict[str, Any]:
    """Digest every file in the scratch dir and write record.json beside them (last, so it marks completion)."""
    outputs = {
        str(path.relative_to(scratch)): {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        for path in sorted(scratch.rglob("*"))
        if path.is_file() and path.name != RECORD_NAME
    }
    record = {"stage": stage, "outputs": outputs, "report": report}
    write_json_atomic(scratch / RECORD_NAME, record)
    return record


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
