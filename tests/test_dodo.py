"""The user's view: `doit build recipe=...` from the command line, incremental behaviour and bad input."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.conftest import (REPO, artifact_digests, built_tasks, executed_tasks, modules_loaded_by_doit, reused_tasks,
                            run_doit, view_name)

RECIPE_FILE = REPO / "tests" / "recipes" / "transformer-only.yaml"


def test_second_build_runs_nothing(built: dict[str, Path]) -> None:
    result = run_doit(["build", "recipe=a10-fp16"], built["artifacts"], built["db"])
    assert executed_tasks(result.stdout) == []
    assert "-- validate:a10-fp16/transformer" in result.stdout


def test_killed_seed_one_build_never_leaks_into_seed_zero(built: dict[str, Path]) -> None:
    """The issue's scenario: a seed-1 build killed after its checkpoint (and export) must not make the seed-0
    rebuild use seed-1 weights; the seed-0 receipt stays byte-identical."""
    before = (built["recipe"] / "manifest.json").read_bytes()
    killed = run_doit(["build", "recipe=a10-fp16", "model.seed=1"], built["artifacts"], built["db"],
                      env={"FORGE_TEST_KILL_AT": "export:outputs"}, check=False)
    seeded = view_name("a10-fp16", overrides=["model.seed=1"])
    assert killed.returncode == -9 and f"built checkpoint:{seeded}" in killed.stderr
    assert (built["recipe"] / "manifest.json").read_bytes() == before, "the override has a view of its own"
    again = run_doit(["build", "recipe=a10-fp16"], built["artifacts"], built["db"])
    assert executed_tasks(again.stdout) == []
    after = (built["recipe"] / "manifest.json").read_bytes()
    assert after == before
    assert json.loads(after)["model"]["seed"] == 0
    assert orphaned_scratch(built["artifacts"]) == [], "the killed build's scratch was swept"


def orphaned_scratch(artifacts: Path) -> list[str]:
    """Scratch items whose owning lock is free (a live build's, e.g. another test worker's, holds its lock)."""
    import fcntl
    import os

    found = []
    for item in sorted((artifacts / "store" / ".tmp").iterdir()):
        fd = os.open(artifacts / "store" / ".locks" / f"{item.name.split('.', 1)[0]}.lock", os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            found.append(item.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return found


BINARY = bytes(range(256)) * 8
NESTED = "a: " + "[" * 5000 + "]" * 5000 + "\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n" for i in range(8))


def bad_recipe_files(folder: Path) -> list[tuple[Path, str]]:
    cases = [("garbage.yaml", BINARY, "not a UTF-8 text file"), ("nested.yaml", NESTED.encode(), "nested too deeply"),
             ("bomb.yaml", BOMB.encode(), "too large"), ("huge.yaml", b"# x\n" * 300_000, "at most 1048576 bytes"),
             ("...yaml", b"extends: a10-fp16\n", "'..' is not allowed"),
             ("entropy.yaml", b"extends: l40s-fp8\ncomponents:\n  transformer:\n    precision:\n"
              b"      calibration: {method: entropy}\n",
              "components.transformer.precision.calibration.method: 'entropy' is not offered for fp8; allowed: max")]
    made = []
    for name, data, expected in cases:
        (folder / name).write_bytes(data)
        made.append((folder / name, expected))
    return made


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "db"
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    cases = [
        (["build", "recipe=a10-fp16", "components.transformer.profile.height.min=100"], "multiples of 16"),
        (["build", "recipe=a10-fp16", "target.gpu=t4", "components.transformer.precision.dtype=bf16"],
         "components.transformer.precision.dtype: bf16 is not supported by t4"),
        (["build", "recipe=a10-fp16", "model=/no/such/dir"], "command line: model=: '/no/such/dir': does not exist"),
        (["build", "recipe=a10-fp16", "model="], "command line: model=: is empty; allowed: tiny"),
        (["build", "recipe=a10-fp16.yaml"], "did you mean recipe=a10-fp16"),
        (["build", "recipe=a10-fp16", "-n", "2", "--no-such-option"],
         "option --no-such-option not recognized; usage: doit build [recipe="),
        (["build", "recipe=a10-fp16", "model=/etc/passwd"], "is a file, not a checkpoint directory"),
        (["build", "recipe=nope"], "no recipe named 'nope'"),
        (["build", "recipe=../recipes/a10-fp16"], "'../recipes/a10-fp16' is not allowed"),
        (["build", "recipe=a10-fp16", "verify=yes"], "verify: must be 0 or 1"),
        *[(["build", f"recipe={path}"], expected) for path, expected in bad_recipe_files(recipes)],
    ]
    for args, expected in cases:
        result = run_doit(args, artifacts, db, check=False)
        assert result.returncode != 0, args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, (args, result.stderr)
    assert not artifacts.exists()


def corrupted_checkpoints(source: Path, folder: Path) -> list[tuple[Path, str]]:
    """Copies of a real tiny checkpoint, each damaged in one way a user's download can be."""
    made = []

    def copy(name: str) -> Path:
        target = folder / name
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("record.json", ".stat.json"))
        for path in target.rglob("*"):
            path.chmod(0o755 if path.is_dir() else 0o644)
        made.append(target)
        return target

    shard = next((copy("truncated") / "transformer").glob("*.safetensors"))
    with open(shard, "r+b") as handle:
        handle.truncate(shard.stat().st_size - 100)
    (copy("bad-config") / "vae" / "config.json").write_text('{"in_channels": 3,')
    shutil.rmtree(copy("no-tokenizer") / "tokenizer")
    file_instead = copy("file-instead")
    shutil.rmtree(file_instead / "text_encoder")
    (file_instead / "text_encoder").write_text("not a folder")
    index = copy("bad-index") / "transformer" / "diffusion_pytorch_model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"pos_embed.nonexistent": "diffusion_pytorch_model.safetensors"}}))
    return list(zip(made, ["(truncated?)", "vae/config.json is not valid JSON",
                           "missing tokenizer/", "text_encoder is a file, not a folder",
                           "'pos_embed.nonexistent' -> diffusion_pytorch_model.safetensors but no shard holds it"]))


def test_checkpoint_problems_are_found_before_any_task(built: dict[str, Path], tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "db"
    for checkpoint, expected in corrupted_checkpoints(built["recipe"] / "checkpoint", tmp_path):
        result = run_doit(["build", "recipe=a10-fp16", f"model={checkpoint}"], artifacts, db, check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "command line: model=:" in lines[0] and expected in lines[0], lines[0]
    assert not artifacts.exists()


@pytest.fixture(scope="module")
def checkpoint_build(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """model=<dir> exercises the real offline loading path; transformer only, for the task-graph mechanics."""
    checkpoint = built["recipe"] / "checkpoint"
    root = tmp_path_factory.mktemp("from-checkpoint")
    artifacts, db = root / "artifacts", root / "db"
    args = ["build", f"recipe={RECIPE_FILE}", f"model={checkpoint}"]
    run_doit(args, artifacts, db)
    name = view_name(str(RECIPE_FILE), str(checkpoint))
    return {"artifacts": artifacts, "db": db, "recipe": artifacts / name, "name": name, "checkpoint": checkpoint,
            "args": args}


def test_build_from_checkpoint_directory(built: dict[str, Path], checkpoint_build: dict) -> None:
    """Same weights loaded from the directory give byte-identical graphs; the manifest names the checkpoint by
    the digests of its files, not by a path of this machine."""
    manifest = json.loads((checkpoint_build["recipe"] / "manifest.json").read_text())
    model = manifest["model"]
    assert model["source"] == "checkpoint" and "warning" not in manifest["model"]
    tiny = json.loads((built["recipe"] / "manifest.json").read_text())
    tiny_files = {e["path"].removeprefix("checkpoint/"): e["sha256"] for e in tiny["model"]["checkpoint"]}
    assert model["files"] == {name: sha for name, sha in tiny_files.items()}
    assert str(checkpoint_build["checkpoint"]) not in json.dumps(manifest)
    assert not (checkpoint_build["recipe"] / "checkpoint").exists()
    mine = artifact_digests(manifest)
    assert mine["transformer/export/model.onnx"] == artifact_digests(tiny)["transformer/export/model.onnx"]
    assert list(manifest["components"]) == ["transformer"] and manifest["pipeline_check"] is None
    assert manifest["components"]["transformer"]["validation"]["passed"]


def test_checkpoint_builds_and_outside_recipes_get_views_of_their_own(checkpoint_build: dict) -> None:
    name = checkpoint_build["name"]
    assert name.startswith("transformer-only-") and name != view_name(str(RECIPE_FILE))
    assert view_name("a10-fp16") == "a10-fp16" and view_name("a10-fp16", str(checkpoint_build["checkpoint"])) != "a10-fp16"


def test_tolerance_change_reruns_only_validation_and_gates(checkpoint_build: dict) -> None:
    build, name = checkpoint_build, checkpoint_build["name"]
    tight = ["components.transformer.validate.tolerances.sample.max_error=1e-9",
             "components.transformer.validate.tolerances.sample.rms_error=1e-9"]
    own_before = (build["recipe"] / "manifest.json").read_bytes()
    tight_name = view_name(str(RECIPE_FILE), str(build["checkpoint"]), overrides=tight)
    result = run_doit([*build["args"], *tight], build["artifacts"], build["db"], check=False)
    assert result.returncode == 4, result.stderr[-2000:]
    assert built_tasks(result.stderr) == [f"validate:{tight_name}/transformer"], "everything else is reused"
    assert "onnxruntime sample" in result.stderr and "would pass with max_error >=" in result.stderr
    manifest = json.loads((build["artifacts"] / tight_name / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["validation"]["passed"] is False
    assert manifest["recipe"]["overrides"]["components.transformer.validate.tolerances.sample.max_error"] == 1e-9
    repeat = run_doit([*build["args"], *tight], build["artifacts"], build["db"], check=False)
    assert repeat.returncode == 4 and built_tasks(repeat.stderr) == [], "a recorded failure is reused, still failing"
    assert reused_tasks(repeat.stderr) == [f"validate:{tight_name}/transformer"]
    again = run_doit(build["args"], build["artifacts"], build["db"])
    assert executed_tasks(again.stdout) == [], "the overrides went to a view of their own"
    assert (build["recipe"] / "manifest.json").read_bytes() == own_before


def test_surgery_change_does_not_reexport(checkpoint_build: dict) -> None:
    """A new surgery reruns precision; what follows reruns only if precision's bytes changed (early cutoff)."""
    build = checkpoint_build

    def precision_sha(view: Path) -> str:
        manifest = json.loads((view / "manifest.json").read_text())
        outputs = manifest["components"]["transformer"]["artifacts"]["precision"]
        return next(o["sha256"] for o in outputs if o["path"].endswith("model.onnx"))  # shards are linked, unchanged

    before = precision_sha(build["recipe"])
    passes = ["components.transformer.surgery.passes=[fold_constants, infer_shapes]"]
    result = run_doit([*build["args"], *passes], build["artifacts"], build["db"])
    changed = build["artifacts"] / view_name(str(RECIPE_FILE), str(build["checkpoint"]), overrides=passes)
    downstream = [] if precision_sha(changed) == before else ["engine", "validate"]
    assert built_tasks(result.stderr) == [f"{stage}:{changed.name}/transformer" for stage in (
        "surgery", "precision", *downstream)]
    assert precision_sha(changed) != before, "without freezing, the text branch is converted too"


NOOP_LINE = "no-op answered from its snapshot"
HEAVY = ("pydantic", "yaml", "stages.recipe", "stages.tasks.taskgraph", "stages.plan.resolve", "stages.plan.fingerprint")


def test_noop_rebuild_answers_from_its_snapshot_without_the_recipe_machinery(built: dict[str, Path]) -> None:
    """The complete cold build left a snapshot: a no-op checks it and prints what the full path prints
    (the same task lines, the same counts) without importing pydantic, YAML or the key computation."""
    env = {"FORGE_ARTIFACTS": str(built["artifacts"]), "FORGE_LOG": "debug"}
    loaded, stdout = modules_loaded_by_doit(["run", "--db-file", str(built["db"]), "build", "recipe=a10-fp16"], HEAVY, env)
    assert loaded == [], "the full path ran"
    fast = [line for line in stdout.splitlines() if not line.startswith("LOADED ")]
    assert all(line.startswith("-- ") for line in fast)
    assert sorted(line[3:] for line in fast) == sorted(executed_tasks(built["log"].stdout))
    full = run_doit(["build", "recipe=a10-fp16", "verify=1"], built["artifacts"], built["db"])  # never answered fast
    assert sorted(full.stdout.splitlines()) == sorted(fast)
    assert "summary: 0 built, 0 fetched, 0 reused, 17 up to date; no remote;" in full.stderr


def test_noop_snapshot_sees_checkpoint_files_recipe_files_and_entries(checkpoint_build: dict, tmp_path: Path) -> None:
    """Any input the plan read that changed sends the no-op down the full path, which decides (and records anew)."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(checkpoint_build["checkpoint"], checkpoint)
    recipe = tmp_path / "transformer-only.yaml"
    shutil.copyfile(RECIPE_FILE, recipe)
    args = ["build", f"recipe={recipe}", f"model={checkpoint}"]
    artifacts, db = checkpoint_build["artifacts"], checkpoint_build["db"]
    debug = {"FORGE_LOG": "debug"}

    def noop(expect_fast: bool) -> None:
        result = run_doit(args, artifacts, db, env=debug)
        assert (NOOP_LINE in result.stderr) is expect_fast, result.stderr[-1500:]
        assert "summary: 0 built, 0 fetched, 0 reused, 5 up to date; no remote;" in result.stderr

    first = run_doit(args, artifacts, db)
    assert built_tasks(first.stderr) == [], "same bytes as the checkpoint_build's: every entry is reused"
    noop(expect_fast=True)
    weights = next(checkpoint.glob("transformer/*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # same bytes, new mtime
    noop(expect_fast=False)
    noop(expect_fast=True)
    recipe.write_text(recipe.read_text() + "\n")
    noop(expect_fast=False)
    noop(expect_fast=True)
    view = artifacts / view_name(str(recipe), str(checkpoint))
    (view / "transformer" / "engine").unlink()  # a view link gone: the manifest task relinks it
    result = run_doit(args, artifacts, db, env=debug)
    assert NOOP_LINE not in result.stderr and (view / "transformer" / "engine").is_symlink()
