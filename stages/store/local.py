"""The content-addressed store: every stage output lives in `store/<stage>/<key>/`, named by its inputs.

The key is the digest of everything that produced the output (see stages.plan.resolve), so an entry can never be
mistaken for the output of other inputs; `record.json`, written last, commits it and lists every file's
sha256. Up to date means: the entry exists and its files match the record. A cheap check (size, mtime, inode
from `.stat.json`, a local cache that is not part of the entry) runs every time; a deep check rehashes.

Concurrency and crashes: a builder holds the per-key lock while it computes, in a scratch folder under
`store/.tmp/` named after that lock, so a scratch folder whose lock is free is an orphan of a killed run and
is removed. Builds hold the store lock shared; `clean` and `gc` hold it exclusively. Everything here is plain
files, so a remote mirror (fsspec) can later fetch into and publish from the same layout.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.store.digests import sha256_file, signature

LOG = logging.getLogger("forge")
RECORD = "record.json"
STAT_CACHE = ".stat.json"
TIMINGS = ".timings.json"  # local like the stat cache: wall times differ from run to run, records must not
# A stage may name digests it already knows (checkpoint shards linked in place: rehashing 5 GB per entry would
# cost minutes); trusted only while the file's size, mtime and inode match, like the stat cache. Not an output.
KNOWN_DIGESTS = ".known-digests.json"
STORE_DIR = "store"
CACHE_DIR = "cache"  # memos of this machine (file digests, import graph, no-op snapshots): never shared
AUDIT_DIR = "audit"  # `doit audit` reports
WEIGHTS_STAGE = "weights"  # entries holding one copied checkpoint file each (checkpoint on another filesystem)
SCHEMA = 1


def crashpoint(name: str) -> None:
    """Fault injection for the crash-safety tests: FORGE_TEST_KILL_AT=<name> kills the process (SIGKILL) here."""
    if os.environ.get("FORGE_TEST_KILL_AT") == name:
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    record: dict[str, Any]

    @property
    def outputs(self) -> dict[str, dict[str, Any]]:
        return self.record["outputs"]

    @property
    def report(self) -> dict[str, Any]:
        return self.record["report"]

    def digests(self) -> dict[str, str]:
        return {name: meta["sha256"] for name, meta in self.outputs.items()}


class Store:
    """One artifacts root's store. Methods that change it say which lock they expect to be held."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.base = self.root / STORE_DIR
        self.tmp = self.base / ".tmp"
        self.locks = self.base / ".locks"
        self._session: int | None = None
        self._verified: dict[tuple[str, str], Entry] = {}

    # -- layout ---------------------------------------------------------------------------------------------

    def entry_path(self, stage: str, key: str) -> Path:
        return self.base / stage / key

    def relative(self, path: Path) -> str:
        """Path relative to the artifacts root: what records and manifests carry (portable)."""
        return str(Path(path).relative_to(self.root))

    # -- locks ----------------------------------------------------------------------------------------------

    def _lock_fd(self, name: str) -> int:
        self.locks.mkdir(parents=True, exist_ok=True)
        return os.open(self.locks / f"{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)

    @contextlib.contextmanager
    def lock(self, name: str, announce: str | None = None) -> Iterator[None]:
        """Exclusive per-name lock (an entry key, or `view-<name>`); waits, saying so, if another build holds it."""
        fd = self._lock_fd(name)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                if error.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                LOG.info(f"waiting: {announce or name} is being built by another process")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def open_session(self) -> None:
        """Hold the store lock shared for this process's life: clean/gc wait until running builds finish."""
        if self._session is not None:
            return
        fd = self._lock_fd("store")
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            LOG.info("waiting: the store is being cleaned (doit clean/gc in another process)")
            fcntl.flock(fd, fcntl.LOCK_SH)
        self._session = fd
        self.sweep_orphans()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """The whole store, for clean and gc: no build runs meanwhile."""
        fd = self._lock_fd("store")
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                LOG.info("waiting: builds are running in this artifacts dir")
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    # -- scratch space --------------------------------------------------------------------------------------

    def scratch_path(self, lock_name: str, suffix: str = "") -> Path:
        """A fresh name under .tmp/ owned by `lock_name` (the caller holds that lock)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(dir=self.tmp, prefix=f"{lock_name}.{os.getpid()}.", suffix=suffix,
                                             delete=False)
        handle.close()
        os.unlink(handle.name)
        return Path(handle.name)

    @contextlib.contextmanager
    def scratch(self, key: str) -> Iterator[Path]:
        """A scratch folder for building entry `key` (caller holds the key's lock); removed on any failure."""
        path = self.scratch_path(key)
        path.mkdir()
        try:
            yield path
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            raise

    def sweep_orphans(self) -> list[str]:
        """Remove scratch items whose owning lock is free: leftovers of killed runs, never a live build's."""
        removed = []
        if not self.tmp.is_dir():
            return removed
        for item in sorted(self.tmp.iterdir()):
            lock_name = item.name.split(".", 1)[0]
            fd = self._lock_fd(lock_name)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                if item.is_dir() and not item.is_symlink():
                    shutil.rmtree(item, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        item.unlink()
                removed.append(item.name)
            finally:
                os.close(fd)
        return removed

    # -- entries --------------------------------------------------------------------------------------------

    def read_record(self, stage: str, key: str) -> dict[str, Any] | None:
        try:
            record = json.loads((self.entry_path(stage, key) / RECORD).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("key") == key else None

    def exists(self, stage: str, key: str) -> bool:
        return self.entry_path(stage, key).exists()

    def damage(self, stage: str, key: str, deep: bool = False) -> str | None:
        """Why the entry cannot be used (None when it verifies). Cheap: stat against the cache; deep: rehash."""
        folder = self.entry_path(stage, key)
        record = self.read_record(stage, key)
        if record is None:
            return f"{self.relative(folder)}: {RECORD} missing or unreadable"
        stats = _read_stats(folder)
        fresh: dict[str, list[int]] = {}
        for name, meta in record["outputs"].items():
            path = folder / name
            try:
                stat = path.stat()
            except OSError:
                return f"{self.relative(path)}: missing"
            if stat.st_size != meta["bytes"]:
                return f"{self.relative(path)}: {stat.st_size} bytes, recorded {meta['bytes']}"
            current = signature(stat)
            if deep or stats.get(name) != current:
                if sha256_file(path) != meta["sha256"]:
                    return f"{self.relative(path)}: sha256 differs from the record"
            fresh[name] = current
        if fresh != stats:
            _write_stats(folder, fresh)
        return None

    def lookup(self, stage: str, key: str, deep: bool = False) -> Entry | None:
        """The verified entry, or None (absent or damaged). Verified entries are remembered for this process."""
        known = self._verified.get((stage, key))
        if known is not None:
            return known
        if not self.exists(stage, key) or self.damage(stage, key, deep) is not None:
            return None
        entry = Entry(stage, key, self.entry_path(stage, key), self.read_record(stage, key) or {})
        self._verified[(stage, key)] = entry
        return entry

    def discard(self, stage: str, key: str) -> None:
        """Remove a damaged entry (caller holds its lock): renamed into scratch first, so it vanishes atomically."""
        self._verified.pop((stage, key), None)
        folder = self.entry_path(stage, key)
        if not folder.exists():
            return
        graveyard = self.scratch_path(key, ".damaged")
        os.rename(folder, graveyard)
        shutil.rmtree(graveyard, ignore_errors=True)

    def commit(self, scratch: Path, stage: str, key: str, inputs: dict[str, Any], report: dict[str, Any],
               known_digests: dict[str, dict[str, Any]] | None = None) -> Entry:
        """Digest the scratch folder, write the record last, and rename it into place (caller holds the lock).

        Timings leave the report for a local `.timings.json`: the same inputs and outputs then give the same
        record bytes on every machine, which is what a remote mirror shares. `known_digests` (or the stage's
        `KNOWN_DIGESTS` sidecar) maps a file to {"sha256", "signature": [size, mtime_ns, inode]}: such a file
        (a hard link to a checkpoint shard) is not rehashed while its signature holds, and its mode is left
        alone (it is the user's file too)."""
        known = {**_read_known(scratch), **(known_digests or {})}
        outputs, stats = {}, {}
        for path in sorted(scratch.rglob("*")):
            if path.is_file() and path.name not in (RECORD, STAT_CACHE, KNOWN_DIGESTS):
                name = str(path.relative_to(scratch))
                stat = path.stat()
                claim = known.get(name)
                if claim is not None and list(claim.get("signature", [])) == signature(stat):
                    sha = claim["sha256"]
                else:
                    path.chmod(0o444)
                    stat = path.stat()
                    sha = sha256_file(path)
                outputs[name] = {"sha256": sha, "bytes": stat.st_size}
                stats[name] = signature(stat)
        for sidecar in scratch.rglob(KNOWN_DIGESTS):
            sidecar.unlink()
        report, timings = split_timings(report)
        record = {"schema": SCHEMA, "stage": stage, "key": key, "inputs": inputs, "outputs": outputs, "report": report}
        if timings:
            (scratch / TIMINGS).write_text(json.dumps(timings, indent=2, sort_keys=True) + "\n")
        return self._place(scratch, stage, key, stats, record_bytes(record))

    def adopt(self, scratch: Path, stage: str, key: str, data: bytes) -> Entry:
        """Place a fetched entry whose files were verified against `data`, its record kept byte for byte."""
        record = json.loads(data)
        stats = {}
        for name in record["outputs"]:
            stat = (scratch / name).stat()
            stats[name] = signature(stat)
        return self._place(scratch, stage, key, stats, data)

    def _place(self, scratch: Path, stage: str, key: str, stats: dict[str, list[int]], data: bytes) -> Entry:
        _write_stats(scratch, stats)
        with open(scratch / RECORD, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        crashpoint(f"{stage}:record")
        final = self.entry_path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(scratch, final)
        _fsync_dir(final.parent)
        entry = Entry(stage, key, final, json.loads(data))  # as any later reader sees it (keys sorted)
        self._verified[(stage, key)] = entry
        return entry

    def entries(self) -> Iterator[tuple[str, str, Path]]:
        if not self.base.is_dir():
            return
        for stage_dir in sorted(self.base.iterdir()):
            if stage_dir.name.startswith(".") or not stage_dir.is_dir():
                continue
            for folder in sorted(stage_dir.iterdir()):
                yield stage_dir.name, folder.name, folder

    def remove_entries(self, keep: set[str]) -> tuple[int, int]:
        """Delete every entry whose `store/<stage>/<key>` path is not in `keep` (caller holds `exclusive`).

        Returns (entries removed, bytes freed). Files other entries (or the user's checkpoint) still hardlink
        free nothing."""
        count = freed = 0
        for stage, key, folder in list(self.entries()):
            files = [p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()]
            if self.relative(folder) in keep:
                continue
            freed += sum(p.stat().st_size for p in files if p.stat().st_nlink == 1)
            shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                (self.locks / f"{key}.lock").unlink()
            self._verified.pop((stage, key), None)
            count += 1
        return count, freed


def record_bytes(record: dict[str, Any]) -> bytes:
    return (json.dumps(record, indent=2, sort_keys=True) + "\n").encode()


def split_timings(report: dict[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """(report without wall times, {dotted key: value}) for keys named `seconds` or `*_seconds`."""
    timings: dict[str, float] = {}

    def strip(value: Any, path: str) -> Any:
        if isinstance(value, dict):
            kept = {}
            for name, item in value.items():
                if (str(name) == "seconds" or str(name).endswith("_seconds")) and isinstance(item, (int, float)):
                    timings[f"{path}{name}"] = item
                else:
                    kept[name] = strip(item, f"{path}{name}.")
            return kept
        if isinstance(value, list):
            return [strip(item, f"{path}{index}.") for index, item in enumerate(value)]
        return value

    return strip(report, ""), timings


def _read_known(scratch: Path) -> dict[str, dict[str, Any]]:
    """Claims of every KNOWN_DIGESTS sidecar in the scratch tree, keyed by path relative to the scratch root."""
    known: dict[str, dict[str, Any]] = {}
    for sidecar in scratch.rglob(KNOWN_DIGESTS):
        try:
            data = json.loads(sidecar.read_text())
        except (OSError, ValueError):
            continue
        folder = sidecar.parent.relative_to(scratch)
        if isinstance(data, dict):
            known.update({str(folder / name): claim for name, claim in data.items() if isinstance(claim, dict)})
    return known


def _read_stats(folder: Path) -> dict[str, list[int]]:
    try:
        data = json.loads((folder / STAT_CACHE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_stats(folder: Path, stats: dict[str, list[int]]) -> None:
    """The stat cache is local bookkeeping beside the entry, rewritten atomically; never part of the content."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{STAT_CACHE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(stats, handle)
        os.replace(tmp, folder / STAT_CACHE)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def scratch_beside(out_dir: Path, purpose: str) -> tempfile.TemporaryDirectory:
    """A scratch folder next to the entry being built, named after its lock: removed when the work ends, and by the
    store's sweep (not by another build's) if the process is killed, as the entry's own scratch is."""
    return tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f"{out_dir.name.split('.')[0]}.{purpose}.")
