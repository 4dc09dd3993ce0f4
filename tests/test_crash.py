"""kill -9 anywhere costs at most the task that was running; damaged outputs are never used.

Kills are real SIGKILLs: at named points inside the forge (FORGE_TEST_KILL_AT, so each lands exactly where
the test says) and from outside at a moment chosen by watching the store.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from tests.conftest import (REPO, SMALL_ARGS, artifact_digests, built_tasks, doit_command, run_doit, verify_manifest)

# a graph stage, the engine, validation and the manifest (a kill while the export writes: the external-kill test)
KILLS = ["surgery:outputs", "engine:record", "validate:outputs", "manifest:write"]


def scratch(artifacts: Path) -> list[str]:
    folder = artifacts / "store" / ".tmp"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_kill_nine_at_every_stage_loses_only_the_running_task(small: dict, tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    done: set[str] = set()
    for point in KILLS:
        result = run_doit(SMALL_ARGS, artifacts, db, env={"FORGE_TEST_KILL_AT": point}, check=False)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr[-2000:])
        computed = set(built_tasks(result.stderr))
        assert not computed & done, f"killed at {point}: recomputed {computed & done}"
        assert scratch(artifacts), f"killed at {point}: the running task's scratch is left for the next run"
        done |= computed
    final = run_doit(SMALL_ARGS, artifacts, db)
    assert not set(built_tasks(final.stderr)) & done
    assert scratch(artifacts) == []
    stages = {task.split(":")[0] for task in done | set(built_tasks(final.stderr))}
    assert stages == {"checkpoint", "export", "surgery", "precision", "engine", "validate"}
    resumed = verify_manifest(artifacts / small["name"])
    reference = json.loads((small["view"] / "manifest.json").read_text())
    for path, sha in artifact_digests(reference).items():
        if path.startswith(("checkpoint/", "transformer/export/", "transformer/surgery/")):
            assert artifact_digests(resumed)[path] == sha, f"{path} differs from an uninterrupted build"


def wait_for(condition: callable, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_external_kill_during_export_and_sigterm(tmp_path: Path) -> None:
    """kill -9 from outside while the export is writing; then SIGTERM, which cleans up as Ctrl-C does."""
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    command, env = doit_command(SMALL_ARGS, artifacts, db)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (artifacts / "store" / "checkpoint").is_dir() and bool(scratch(artifacts)))
    process.kill()
    _, stderr = process.communicate()
    assert "built checkpoint:" in stderr and "built export:" not in stderr
    assert not (artifacts / "store" / "export").exists() and scratch(artifacts)

    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (artifacts / "store" / "export").is_dir() and bool(scratch(artifacts)))
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode != 0
    assert "built checkpoint:" not in stderr and "built export:" in stderr, "the checkpoint survived the kill"
    assert scratch(artifacts) == [], "SIGTERM removes the running task's scratch, like Ctrl-C"


def test_damaged_outputs_are_reported_and_rebuilt(small: dict) -> None:
    artifacts, db, view = small["artifacts"], small["db"], small["view"]

    def damage(path: Path, how: str) -> None:
        path = path.resolve()
        path.chmod(0o644)
        stat = path.stat()
        if how == "truncate":
            os.truncate(path, stat.st_size // 2)
        elif how == "delete":
            path.unlink()
        else:
            with open(path, "r+b") as handle:
                handle.seek(stat.st_size // 2)
                byte = handle.read(1)
                handle.seek(stat.st_size // 2)
                handle.write(bytes([byte[0] ^ 0xFF]))
            os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))

    damage(view / "transformer" / "surgery" / "model.onnx", "truncate")
    result = run_doit(small["args"], artifacts, db)
    assert f"damaged surgery:{small['name']}/transformer" in result.stderr
    assert f"surgery:{small['name']}/transformer" in built_tasks(result.stderr)
    verify_manifest(view)

    damage(view / "transformer" / "engine" / "engine.plan", "flip")
    quiet = run_doit(small["args"], artifacts, db)
    assert built_tasks(quiet.stderr) == [], "same size, mtime and inode: only verify=1 can see a flipped byte"
    deep = run_doit([*small["args"], "verify=1"], artifacts, db)
    assert f"damaged engine:{small['name']}/transformer" in deep.stderr and "sha256 differs" in deep.stderr
    assert f"engine:{small['name']}/transformer" in built_tasks(deep.stderr)
    verify_manifest(view)

    damage(view / "transformer" / "engine" / "engine.plan", "delete")
    result = run_doit(small["args"], artifacts, db)
    assert f"engine:{small['name']}/transformer" in built_tasks(result.stderr)
    manifest = verify_manifest(view)
    plan = (view / "transformer" / "engine" / "engine.plan").read_bytes()
    assert manifest["components"]["transformer"]["artifacts"]["engine"][0]["sha256"] == hashlib.sha256(plan).hexdigest()
