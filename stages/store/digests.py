"""Digests, one definition each: canonical JSON and its digest (store keys), a file's sha256, and checkpoint-file
digests remembered by (path, size, mtime, inode). Stdlib only: the bottom of the store layer.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

LOG = logging.getLogger("forge.identity")
FILE_DIGESTS = "file-digests.json"  # the FileDigests memo, under the artifacts root's cache folder


def signature(stat: os.stat_result) -> list[int]:
    """(size, mtime_ns, inode): while these hold, a file is taken as unchanged (every stat cache of the forge)."""
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def canonical(data: Any) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def digest(data: Any, length: int = 32) -> str:
    return hashlib.sha256(canonical(data)).hexdigest()[:length]


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
            known = memo.get(str(path))
            if self.rehash or known is None or known[:3] != signature(stat):
                started = time.perf_counter()
                if stat.st_size >= self.PROGRESS_BYTES:
                    LOG.info(f"hashing {name} ({stat.st_size / 1e9:.2f} GB)")
                known = [*signature(stat), sha256_file(path)]
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
        write_json_atomic(self.memo_path, self._memo)
        self._dirty = False
