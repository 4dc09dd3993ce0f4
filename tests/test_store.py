"""The content-addressed store on its own: commit, verification (cheap and deep), locks, orphan sweeping, gc."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from stages.store.local import RECORD, Store


def commit(store: Store, stage: str, key: str, files: dict[str, bytes]) -> Path:
    with store.lock(key), store.scratch(key) as scratch:
        for name, data in files.items():
            (scratch / name).parent.mkdir(parents=True, exist_ok=True)
            (scratch / name).write_bytes(data)
        return store.commit(scratch, stage, key, {"why": "test"}, {"passed": True}).path


def writable(path: Path) -> Path:
    path.chmod(0o644)
    return path


def test_commit_records_every_file_and_the_record_is_last(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = commit(store, "export", "k1", {"model.onnx": b"\x01" * 1000, "sub/x.json": b"{}"})
    record = json.loads((folder / RECORD).read_text())
    assert record["key"] == "k1" and record["inputs"] == {"why": "test"}
    assert record["outputs"]["model.onnx"] == {"sha256": hashlib.sha256(b"\x01" * 1000).hexdigest(), "bytes": 1000}
    assert record["outputs"]["sub/x.json"]["bytes"] == 2
    assert store.lookup("export", "k1").digests() == {n: m["sha256"] for n, m in record["outputs"].items()}
    assert not os.access(folder / "model.onnx", os.W_OK) or os.geteuid() == 0
    assert list(store.tmp.iterdir()) == []


def test_failed_stage_leaves_nothing(tmp_path: Path) -> None:
    store = Store(tmp_path)
    with pytest.raises(RuntimeError), store.lock("k"), store.scratch("k") as scratch:
        (scratch / "half.onnx").write_bytes(b"half")
        raise RuntimeError("killed mid-stage")
    assert not store.exists("export", "k") and list(store.tmp.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "delete", "flip", "record"])
def test_damage_is_seen_by_the_cheap_check(tmp_path: Path, damage: str) -> None:
    store = Store(tmp_path)
    folder = commit(store, "engine", "k", {"engine.plan": bytes(range(256)) * 64})
    plan = writable(folder / "engine.plan")
    if damage == "truncate":
        os.truncate(plan, 100)
    elif damage == "delete":
        plan.unlink()
    elif damage == "flip":
        time.sleep(0.01)
        with open(plan, "r+b") as handle:
            handle.seek(10)
            handle.write(b"\xff")
    else:
        (folder / RECORD).write_text("{not json")
    fresh = Store(tmp_path)
    assert fresh.lookup("engine", "k") is None
    assert fresh.damage("engine", "k") is not None


def test_flip_with_restored_mtime_needs_the_deep_check(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = commit(store, "engine", "k", {"engine.plan": bytes(range(256)) * 64})
    plan = writable(folder / "engine.plan")
    stat = plan.stat()
    with open(plan, "r+b") as handle:
        handle.seek(10)
        handle.write(b"\xff")
    os.utime(plan, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert Store(tmp_path).lookup("engine", "k") is not None, "size, mtime and inode unchanged: cheap check passes"
    reason = Store(tmp_path).damage("engine", "k", deep=True)
    assert reason is not None and "sha256 differs" in reason and "engine.plan" in reason
    assert Store(tmp_path).lookup("engine", "k", deep=True) is None


def test_touched_but_intact_file_still_verifies(tmp_path: Path) -> None:
    store = Store(tmp_path)
    folder = commit(store, "export", "k", {"model.onnx": b"abc"})
    os.utime(folder / "model.onnx", ns=(1, 1))
    assert Store(tmp_path).lookup("export", "k") is not None


def test_discard_removes_an_entry_atomically(tmp_path: Path) -> None:
    store = Store(tmp_path)
    commit(store, "export", "k", {"model.onnx": b"abc"})
    with store.lock("k"):
        store.discard("export", "k")
    assert not store.exists("export", "k") and list(store.tmp.iterdir()) == []


HOLD_LOCK = """
import sys, time
from pathlib import Path
from stages.store.local import Store
store = Store(Path(sys.argv[1]))
with store.lock(sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def test_orphan_scratch_is_swept_only_when_its_lock_is_free(tmp_path: Path) -> None:
    store = Store(tmp_path)
    orphan, live = store.scratch_path("deadkey"), store.scratch_path("livekey")
    orphan.mkdir()
    live.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(tmp_path), "livekey"], stdout=subprocess.PIPE,
                              text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        removed = store.sweep_orphans()
        assert removed == [orphan.name] and live.exists() and not orphan.exists()
    finally:
        holder.kill()
        holder.wait()
    assert store.sweep_orphans() == [live.name]


def test_remove_entries_keeps_what_is_referenced_and_counts_bytes(tmp_path: Path) -> None:
    store = Store(tmp_path)
    commit(store, "export", "a", {"x": b"1" * 10})
    commit(store, "export", "b", {"x": b"2" * 30})
    with store.exclusive():
        count, freed = store.remove_entries({"store/export/a"})
    assert count == 1 and freed >= 30
    assert store.exists("export", "a") and not store.exists("export", "b")
