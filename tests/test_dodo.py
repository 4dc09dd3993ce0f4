"""The user's view: `doit build recipe=...` from the command line, incremental behaviour and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, executed_tasks, run_doit

RECIPE_FILE = REPO / "tests" / "recipes" / "transformer-only.yaml"
RECIPE = "transformer-only"


def test_second_build_runs_nothing(built: dict[str, Path]) -> None:
    result = run_doit(["build", "recipe=a10-fp16"], built["artifacts"], built["db"])
    assert executed_tasks(result.stdout) == []
    assert "-- validate:a10-fp16/transformer" in result.stdout


def test_tolerance_change_reruns_only_validation_and_gates(checkpoint_build: dict[str, Path]) -> None:
    built = checkpoint_build
    tight = "components.transformer.validate.tolerances.sample.atol=1e-9"
    result = run_doit([*built["args"], tight, "components.transformer.validate.tolerances.sample.rtol=1e-9"],
                      built["artifacts"], built["db"], check=False)
    assert result.returncode != 0
    assert executed_tasks(result.stdout) == [f"validate:{RECIPE}/transformer"]
    assert "onnxruntime sample" in result.stderr + result.stdout and "would pass with atol >=" in result.stderr + result.stdout
    manifest = json.loads((built["recipe"] / "manifest.json").read_text())
    assert manifest["components"]["transformer"]["validation"]["passed"] is False
    assert manifest["recipe"]["overrides"]["components.transformer.validate.tolerances.sample.atol"] == 1e-9
    again = run_doit(built["args"], built["artifacts"], built["db"])
    assert executed_tasks(again.stdout) == [f"validate:{RECIPE}/transformer", f"manifest:{RECIPE}"]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "db"
    cases = [
        (["build", "recipe=a10-fp16", "components.transformer.profile.height.min=100"], "multiples of 16"),
        (["build", "recipe=a10-fp16", "target.gpu=t4", "components.transformer.precision.dtype=bf16"],
         "components.transformer.precision.dtype: bf16 is not supported by t4"),
        (["build", "recipe=a10-fp16", "model=/no/such/dir"], "model.path"),
        (["build", "recipe=nope"], "no recipe named 'nope'"),
    ]
    for args, expected in cases:
        result = run_doit(args, artifacts, db, check=False)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert not artifacts.exists()


@pytest.fixture(scope="module")
def checkpoint_build(built: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """model=<dir> exercises the real offline loading path; transformer only, for the task-graph mechanics."""
    checkpoint = built["recipe"] / "checkpoint"
    root = tmp_path_factory.mktemp("from-checkpoint")
    artifacts, db = root / "artifacts", root / "db"
    args = ["build", f"recipe={RECIPE_FILE}", f"model={checkpoint}",
            "components.transformer.validate.timesteps=[1.0, 0.4]"]
    run_doit(args, artifacts, db)
    return {"artifacts": artifacts, "db": db, "recipe": artifacts / RECIPE, "checkpoint": checkpoint, "args": args}


def test_build_from_checkpoint_directory(built: dict[str, Path], checkpoint_build: dict[str, Path]) -> None:
    """Same weights loaded from the directory give byte-identical graphs."""
    manifest = json.loads((checkpoint_build["recipe"] / "manifest.json").read_text())
    assert manifest["model"]["source"] == "checkpoint" and "warning" not in manifest["model"]
    assert manifest["model"]["path"] == str(checkpoint_build["checkpoint"].resolve())
    assert not (checkpoint_build["recipe"] / "checkpoint").exists()
    tiny = json.loads((built["recipe"] / "manifest.json").read_text())
    digest = {e["path"]: e["sha256"] for e in tiny["components"]["transformer"]["artifacts"]["surgery"]}
    mine = {e["path"]: e["sha256"] for e in manifest["components"]["transformer"]["artifacts"]["surgery"]}
    assert mine["transformer/surgery/model.onnx"] == digest["transformer/surgery/model.onnx"]
    assert list(manifest["components"]) == ["transformer"] and manifest["pipeline_check"] is None
    assert manifest["components"]["transformer"]["validation"]["passed"]


def test_surgery_change_does_not_reexport(checkpoint_build: dict[str, Path]) -> None:
    built = checkpoint_build
    result = run_doit([*built["args"], "components.transformer.surgery.passes=[fold_constants, infer_shapes, freeze_text_branch]"],
                      built["artifacts"], built["db"])
    assert executed_tasks(result.stdout) == [f"{stage}:{RECIPE}/transformer" for stage in (
        "surgery", "precision", "engine", "validate")] + [f"manifest:{RECIPE}"]


def test_clean_removes_outputs(checkpoint_build: dict[str, Path]) -> None:
    run_doit(["clean", *checkpoint_build["args"][1:]], checkpoint_build["artifacts"], checkpoint_build["db"])
    assert not (checkpoint_build["recipe"] / "manifest.json").exists()
    assert not (checkpoint_build["recipe"] / "transformer" / "export").exists()
    assert checkpoint_build["checkpoint"].exists(), "clean must never touch the user's checkpoint"
