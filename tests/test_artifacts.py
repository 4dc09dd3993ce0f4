from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from stages import artifacts


def test_staged_output_replaces_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "stage"
    with artifacts.staged_output(final) as scratch:
        (scratch / "a.txt").write_text("first")
    assert (final / "a.txt").read_text() == "first"
    with pytest.raises(RuntimeError):
        with artifacts.staged_output(final) as scratch:
            (scratch / "a.txt").write_text("half")
            raise RuntimeError("killed mid-stage")
    assert (final / "a.txt").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]


def test_record_digests_every_output(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "model.onnx").write_bytes(b"\x00\x01" * 1000)
    (tmp_path / "sub" / "x.json").write_text("{}")
    record = artifacts.write_record(tmp_path, "export", {"nodes": 3})
    on_disk = json.loads((tmp_path / artifacts.RECORD_NAME).read_text())
    assert on_disk == record
    assert record["outputs"]["model.onnx"]["sha256"] == hashlib.sha256(b"\x00\x01" * 1000).hexdigest()
    assert record["outputs"]["sub/x.json"]["bytes"] == 2
    assert artifacts.RECORD_NAME not in record["outputs"]


def test_write_json_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "m.json"
    artifacts.write_json_atomic(target, {"a": 1})
    artifacts.write_json_atomic(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]
    with pytest.raises(TypeError):
        artifacts.write_json_atomic(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"a": 2}
    assert [p.name for p in target.parent.iterdir()] == ["m.json"]
