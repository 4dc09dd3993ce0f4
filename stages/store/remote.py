"""A remote mirror of the store over fsspec, so CI runners share store entries instead of rebuilding them.

`FORGE_REMOTE=<url>` (or `remote=<url>` on the doit command line) names it: `s3://bucket/prefix` through s3fs
(endpoint, region and credentials from the standard AWS variables and files, e.g. AWS_ENDPOINT_URL), a plain
directory (NFS included), or another fsspec protocol. Layout under the URL:

    objects/<sha256[:2]>/<sha256>    file contents by digest: immutable, shared between entries
    entries/<stage>/<key>.json       the entry's record.json, byte for byte: its commit object, written last

A publish uploads the objects first and the commit object last, each as one whole-object write (a rename on
filesystems), so a reader that sees the commit object sees every object it lists. Two runners publishing one
entry write the same names; if a tool is not bit-reproducible the last commit object wins, and either one is
consistent. A fetch rehashes every object against the record and checks that the record's inputs are this
build's key material, under the entry's lock, into scratch, then renames the entry into place: a damaged,
tampered or foreign remote entry is reported in one line and the task is built locally (and republished).

Files with the content of a file of the user's checkpoint (`model=<dir>`: weights referenced in place, hard-linked
shards, copied configs) are never uploaded; a fetch links them from the runner's own checkpoint, found by sha256
(the same checkpoint, since keys carry its digests). The tiny model is a store entry like any other: published.
An unreachable remote is one warning and a local build, unless the remote is required (FORGE_REMOTE_REQUIRED=1
or `remote_required=1`). Only the standard library at import: fsspec is imported on the first transfer.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import log
from stages.errors import ForgeError, fail, summary
from stages.log import human_bytes
from stages.store.digests import canonical, digest, sha256_file
from stages.store.local import RECORD, SCHEMA, STAT_CACHE, TIMINGS, Entry, Store

ENV_URL = "FORGE_REMOTE"
ENV_REQUIRED = "FORGE_REMOTE_REQUIRED"
VAR_URL = "remote"
VAR_REQUIRED = "remote_required"
CHUNK = 8 << 20
PROGRESS_BYTES = 16 << 20
PROGRESS_EVERY_S = 2.0

# Protocols fsspec implements and the package each needs (checked without importing it); entry points in
# `fsspec.specs` add more. Object stores take whole-object writes; the others get a temporary name + rename.
PROTOCOL_PACKAGES: dict[str, str | None] = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
    "sftp": "paramiko", "ssh": "paramiko", "hdfs": "pyarrow", "webdav": "webdav4", "smb": "smbprotocol",
    "ftp": None, "file": None, "local": None,
}
OBJECT_STORES = {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"}
REFUSED = {"memory": "lives inside one process", "http": "is read-only in fsspec", "https": "is read-only in fsspec"}
URL_PATTERN = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$")
HEX64 = re.compile(r"^[0-9a-f]{64}$")
LOG = log.get()
PROGRESS_LOG = log.get("remote")


@dataclass(frozen=True)
class RemoteSettings:
    """A checked remote setting: the URL (a local path made absolute), whether it is required, and its source."""

    url: str
    protocol: str
    required: bool
    source: str


def settings_from(cli_vars: Mapping[str, str], environ: Mapping[str, str]) -> RemoteSettings | None:
    """The remote this build uses (None: none); raises ForgeError naming the setting for bad values."""
    source = f"command line: {VAR_URL}" if VAR_URL in cli_vars else f"environment: {ENV_URL}"
    value = (cli_vars[VAR_URL] if VAR_URL in cli_vars else environ.get(ENV_URL, "")).strip()
    required_source = f"command line: {VAR_REQUIRED}" if VAR_REQUIRED in cli_vars else f"environment: {ENV_REQUIRED}"
    required_value = cli_vars.get(VAR_REQUIRED, environ.get(ENV_REQUIRED, "")).strip()
    if required_value not in ("", "0", "1"):
        raise fail(*required_source.split(": "), f"must be 0 or 1, got {required_value!r}")
    required = required_value == "1"
    if not value:
        if required:
            raise fail(*required_source.split(": "), f"is 1 but no remote is set ({ENV_URL}=<url> or {VAR_URL}=<url>)")
        return None
    url, protocol = _normalise(value, source)
    return RemoteSettings(url, protocol, required, source)


def _normalise(value: str, source: str) -> tuple[str, str]:
    where, key = source.split(": ")
    allowed = "s3://bucket/prefix, a directory, or an fsspec URL (" + ", ".join(sorted(_known_protocols())) + ")"
    if "::" in value:
        raise fail(where, key, f"chained fsspec URLs are not supported: {value!r}; use {allowed}")
    match = URL_PATTERN.match(value)
    if match is None:
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", value) and not value.startswith(("./", "/")):
            raise fail(where, key, f"{value!r} is neither a URL (<protocol>://...) nor a directory; use {allowed}")
        return _local(value, where, key), "file"
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol in ("file", "local"):
        return _local(rest, where, key), "file"
    if protocol in REFUSED:
        raise fail(where, key, f"{protocol}:// {REFUSED[protocol]}; use {allowed}")
    known = _known_protocols()
    if protocol not in known:
        raise fail(where, key, f"unsupported protocol {protocol!r} in {value!r}; use {allowed}")
    package = known[protocol]
    if package and importlib.util.find_spec(package.replace("-", "_")) is None:
        raise fail(where, key, f"{protocol}:// needs the Python package {package} (pip install {package})")
    bucket = rest.split("/", 1)[0]
    if protocol in OBJECT_STORES and not bucket:
        raise fail(where, key, f"{value!r} names no bucket; use {protocol}://<bucket>/<prefix>")
    return f"{protocol}://{rest.rstrip('/')}", protocol


def _local(path: str, where: str, key: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if resolved.exists() and not resolved.is_dir():
        raise fail(where, key, f"{resolved} exists and is not a directory")
    return str(resolved)


def _known_protocols() -> dict[str, str | None]:
    known = dict(PROTOCOL_PACKAGES)
    for point in importlib.metadata.entry_points(group="fsspec.specs"):
        known.setdefault(point.name, None)
    return known


class RemoteDamage(Exception):
    """The remote entry cannot be used: a missing object, a digest that differs, a malformed record."""


class Progress:
    """Bytes and rate of one long transfer, printed every few seconds and at its end (small files stay quiet)."""

    def __init__(self, verb: str, label: str, total: int) -> None:
        self.verb, self.label, self.total = verb, label, total
        self.started = self.last = time.perf_counter()
        self.loud = total >= PROGRESS_BYTES

    def update(self, done: int, final: bool = False) -> None:
        now = time.perf_counter()
        if self.loud and (final or now - self.last >= PROGRESS_EVERY_S):
            rate = done / max(now - self.started, 1e-9)
            PROGRESS_LOG.info(f"{self.verb} {self.label}: {human_bytes(done)} of {human_bytes(self.total)} "
                              f"({human_bytes(rate)}/s)")
            self.last = now


@dataclass(frozen=True)
class Transfer:
    """What one fetch or publish moved: the caller counts it (the summary line), the remote keeps no tally."""

    bytes: int
    seconds: float


class Remote:
    """The remote of one doit process. Methods that place entries expect the caller to hold the entry's lock."""

    def __init__(self, settings: RemoteSettings) -> None:
        self.settings = settings
        self.url = settings.url
        self.available = True
        self._fs: Any = None
        self._root = ""
        self._damaged: set[tuple[str, str]] = set()
        self.note: str | None = None  # said in the summary line, e.g. why the build went on without it

    # -- plumbing -------------------------------------------------------------------------------------------

    @property
    def fs(self) -> Any:
        if self._fs is None:
            import fsspec

            options: dict[str, Any] = {"skip_instance_cache": True}
            if self.settings.protocol in ("s3", "s3a"):
                # fail fast when the endpoint is down: 2 attempts, not botocore's 5 with backoff (about 10 s)
                options |= {"use_listings_cache": False, "config_kwargs": {
                    "connect_timeout": 5, "read_timeout": 120, "retries": {"max_attempts": 2, "mode": "standard"}}}
            self._fs, self._root = fsspec.core.url_to_fs(self.url, **options)
            if hasattr(self._fs, "retries"):
                self._fs.retries = 2
        return self._fs

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018 - resolves the root
        return "/".join([self._root.rstrip("/"), *parts])

    def commit_path(self, stage: str, key: str) -> str:
        return self._path("entries", stage, f"{key}.json")

    def object_path(self, sha256: str) -> str:
        return self._path("objects", sha256[:2], sha256)

    def _atomic_names(self) -> bool:
        """Filesystems (directories, NFS, sftp) need a temporary name and a rename; object stores write whole."""
        return self.settings.protocol not in OBJECT_STORES

    def _unreachable(self, error: BaseException, doing: str) -> None:
        reason = summary(error)
        if self.settings.required:
            raise ForgeError(f"remote {self.url} unreachable while {doing}: {reason} ({self.settings.source} is "
                             f"required: {ENV_REQUIRED}=1 or {VAR_REQUIRED}=1)")
        if self.available:
            LOG.warning(f"warning: remote {self.url} unreachable while {doing} ({reason}); building locally "
                        "without it")
        self.available = False
        self.note = "unreachable: local build"

    # -- fetch ----------------------------------------------------------------------------------------------

    def fetch(self, store: Store, stage: str, key: str, material: dict[str, Any], where: str,
              weights: Mapping[str, Path]) -> tuple[Entry, Transfer] | None:
        """Place the remote entry for `key` in the local store (verified) and say what it moved, or None: absent,
        refused, unreachable. `weights`: {sha256: file} of the user's checkpoint, linked instead of downloaded."""
        if not self.available:
            return None
        try:
            raw = self._read_commit(stage, key)
        except Exception as error:  # noqa: BLE001 - any transport failure means: no remote for this build
            self._unreachable(error, f"looking up {where}")
            return None
        if raw is None:
            return None
        try:
            record = check_record(raw, stage, key, material)
        except RemoteDamage as problem:
            self._refuse(stage, key, where, f"refused remote entry {where}: {problem}")
            return None
        started, moved = time.perf_counter(), 0
        try:
            with store.scratch(key) as scratch:
                moved = self._download(record, scratch, where, weights)
                entry = store.adopt(scratch, stage, key, raw)
        except RemoteDamage as problem:
            self._refuse(stage, key, where, f"damaged remote entry {where}: {problem}")
            return None
        except ForgeError:
            raise
        except Exception as error:  # noqa: BLE001
            self._unreachable(error, f"fetching {where}")
            return None
        took = time.perf_counter() - started
        LOG.info(f"fetched {where} <- {self.url}/entries/{stage}/{key}.json ({human_bytes(moved)} in {took:.1f} s)")
        return entry, Transfer(moved, took)

    def _refuse(self, stage: str, key: str, where: str, line: str) -> None:
        self._damaged.add((stage, key))
        LOG.warning(f"{line}; building locally")

    def _read_commit(self, stage: str, key: str) -> bytes | None:
        try:
            return self.fs.cat_file(self.commit_path(stage, key))
        except FileNotFoundError:
            return None

    def _download(self, record: dict[str, Any], scratch: Path, where: str, weights: Mapping[str, Path]) -> int:
        moved = 0
        for name, meta in sorted(record["outputs"].items()):
            target = scratch / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if meta["sha256"] in weights:
                _link_from_checkpoint(weights[meta["sha256"]], target, name)
                size, sha = target.stat().st_size, sha256_file(target)
            else:
                size, sha = self._get(self.object_path(meta["sha256"]), target, name, f"{where} {name}", meta["bytes"])
                target.chmod(0o444)
                moved += size
            if size != meta["bytes"] or sha != meta["sha256"]:
                raise RemoteDamage(f"{name}: sha256 differs from the record ({size} bytes, recorded {meta['bytes']})")
        return moved

    def _get(self, source: str, target: Path, name: str, label: str, size: int) -> tuple[int, str]:
        """Stream one object into `target`, hashing as it goes; (bytes, sha256). Stops past the recorded size."""
        progress = Progress("fetching", label, size)
        digest, done = hashlib.sha256(), 0
        try:
            handle = self.fs.open(source, "rb", block_size=CHUNK)
        except FileNotFoundError:
            raise RemoteDamage(f"{name}: object {source} is missing") from None
        with handle, open(target, "wb") as out:
            while done <= size and (block := handle.read(CHUNK)):
                out.write(block)
                digest.update(block)
                done += len(block)
                progress.update(done)
        progress.update(done, final=True)
        return done, digest.hexdigest()

    # -- publish --------------------------------------------------------------------------------------------

    def has(self, stage: str, key: str) -> bool:
        return bool(self.fs.exists(self.commit_path(stage, key)))

    def publish(self, entry: Entry, where: str, weights: Mapping[str, Path]) -> Transfer | None:
        """Upload the entry's objects the remote lacks, then its commit object; what it moved when this call
        committed it, else None. The user's checkpoint content (`weights`) is never uploaded."""
        if not self.available:
            return None
        repair = (entry.stage, entry.key) in self._damaged
        started, moved = time.perf_counter(), 0
        try:
            if not repair and self.has(entry.stage, entry.key):
                return None  # another runner published it first: same inputs, an equally valid entry
            for name, meta in sorted(entry.outputs.items()):
                if meta["sha256"] in weights:
                    continue  # the user's checkpoint content (weights referenced in place): never uploaded
                target = self.object_path(meta["sha256"])
                if not repair and self._has_object(target, meta["bytes"]):
                    continue
                moved += self._put(entry.path / name, target, f"{where} {name}")
            self._write(self.commit_path(entry.stage, entry.key), (entry.path / RECORD).read_bytes())
        except Exception as error:  # noqa: BLE001
            self._unreachable(error, f"publishing {where}")
            return None
        self._damaged.discard((entry.stage, entry.key))
        took = time.perf_counter() - started
        LOG.info(f"published {where} -> {self.url}/entries/{entry.stage}/{entry.key}.json ({human_bytes(moved)} in "
                 f"{took:.1f} s)")
        return Transfer(moved, took)

    def _has_object(self, path: str, size: int) -> bool:
        try:
            return int(self.fs.info(path)["size"]) == size
        except FileNotFoundError:
            return False

    def _put(self, source: Path, target: str, label: str) -> int:
        size = source.stat().st_size
        progress = Progress("publishing", label, size)
        temporary = self._temporary(target)
        done = 0
        with open(source, "rb") as handle, self.fs.open(temporary, "wb", block_size=max(CHUNK, 5 << 20)) as out:
            while block := handle.read(CHUNK):
                out.write(block)
                done += len(block)
                progress.update(done)
        progress.update(done, final=True)
        self._settle(temporary, target)
        return done

    def _write(self, target: str, data: bytes) -> None:
        temporary = self._temporary(target)
        self.fs.pipe_file(temporary, data)
        self._settle(temporary, target)

    def _temporary(self, target: str) -> str:
        if not self._atomic_names():
            return target
        self.fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        return f"{target}.{uuid.uuid4().hex}.tmp"

    def _settle(self, temporary: str, target: str) -> None:
        if temporary != target:
            self.fs.mv(temporary, target)


def check_record(raw: bytes, stage: str, key: str, material: dict[str, Any]) -> dict[str, Any]:
    """The fetched record, if it is a well-formed record of this entry built from exactly this key material."""
    try:
        record = json.loads(raw)
    except ValueError:
        raise RemoteDamage(f"{RECORD} is not JSON") from None
    if not isinstance(record, dict) or record.get("schema") != SCHEMA:
        raise RemoteDamage(f"{RECORD} is not a schema-{SCHEMA} record")
    if record.get("stage") != stage or record.get("key") != key:
        raise RemoteDamage(f"{RECORD} names {record.get('stage')}/{record.get('key')}, not {stage}/{key}")
    outputs = record.get("outputs")
    if not isinstance(outputs, dict) or not isinstance(record.get("report"), dict):
        raise RemoteDamage(f"{RECORD} has no outputs or report")
    for name, meta in outputs.items():
        parts = Path(name).parts
        if (not parts or Path(name).is_absolute() or ".." in parts or name in (RECORD, STAT_CACHE, TIMINGS)
                or not isinstance(meta, dict) or not HEX64.match(str(meta.get("sha256")))
                or not isinstance(meta.get("bytes"), int)):
            raise RemoteDamage(f"{RECORD}: output {name!r} is malformed")
    ours = json.loads(canonical(material))
    if canonical(record.get("inputs")) != canonical(ours) or digest(record.get("inputs"), len(key)) != key:
        raise RemoteDamage(f"built from other inputs ({_first_difference(record.get('inputs'), ours)})")
    return record


def _first_difference(theirs: Any, ours: Any, path: str = "inputs") -> str:
    if isinstance(theirs, dict) and isinstance(ours, dict):
        for name in sorted(set(theirs) | set(ours)):
            if theirs.get(name) != ours.get(name):
                return _first_difference(theirs.get(name), ours.get(name), f"{path}.{name}")
    shown = [json.dumps(v, sort_keys=True)[:72] for v in (theirs, ours)]
    return f"{path}: remote {shown[0]}, local {shown[1]}"


def _link_from_checkpoint(source: Path, target: Path, name: str) -> None:
    """Hard-link (or copy) the local checkpoint file with the recorded digest; rehashed by the caller."""
    if not source.is_file():
        raise ForgeError(f"{name}: the remote entry holds checkpoint file {source.name} by reference, and this "
                         f"runner's checkpoint has no {source}")
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def from_settings(settings: RemoteSettings | None) -> Remote | None:
    return None if settings is None else Remote(settings)
