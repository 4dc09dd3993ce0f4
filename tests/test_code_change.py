"""Editing project code reruns exactly the stages that can execute it, found through transitive imports.

Runs on a copy of the repository (the checkout under test is never edited) against the `small` build's store:
identical code gives identical keys, so the copy starts up to date and only edits cause work.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import REPO, built_tasks, run_doit, view_name


def precision_digest(view: Path) -> str:
    return json.loads((view / "manifest.json").read_text())["components"]["transformer"]["artifacts"]["precision"][0]["sha256"]


def stages_built(stderr: str) -> set[str]:
    return {task.split(":")[0] for task in built_tasks(stderr)}


def test_edits_rerun_exactly_the_stages_that_import_the_module(small: dict, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".venv", "artifacts", ".git", "__pycache__",
                                                              ".pytest_cache", "*.egg-info", ".doit.db*"))
    recipe = copy / "tests" / "recipes" / "transformer-only.yaml"
    args = ["build", f"recipe={recipe}"]
    artifacts, db = small["artifacts"], tmp_path / "doit.db"

    def build_after_editing(*modules: str) -> set[str]:
        for module in modules:
            with open(copy / module, "a") as handle:
                handle.write("\n# an edit that changes no behaviour still changes the code digest\n")
        return stages_built(run_doit(args, artifacts, db, cwd=copy).stderr)

    first = run_doit(args, artifacts, db, cwd=copy)
    assert stages_built(first.stderr) == set(), "same code, same keys: the copy reuses the small build's entries"

    assert build_after_editing("stages/validate.py") == {"validate"}
    # Imported only through the family's pipeline module, which the tiny-checkpoint stage runs; the checkpoint
    # is rewritten with identical bytes, so nothing downstream reruns: upstream outputs enter keys by content.
    assert build_after_editing("stages/families/qwen_image/tokenizer.py") == {"checkpoint"}
    # What a recipe may say and the checks made before any task are not stage code (the recipe enters keys as
    # settings); INT8/FP8 code is not code of an fp16 plan. Edited together: if the union reruns nothing, so
    # does each one (a key covers a set of files).
    assert build_after_editing("stages/recipe/load.py", "stages/recipe/schema.py", "stages/recipe/fit.py",
                               "stages/recipe/checkpoint_checks.py", "stages/recipe/prompts.py",
                               "stages/targets/memory_fit.py", "stages/quantize.py") == set()
    # A graph helper only the precision stage calls; the graph it (re)writes is byte-identical (early cutoff).
    precision_before = precision_digest(artifacts / view_name(str(recipe)))
    assert build_after_editing("stages/graphs/segmented.py") == {"precision"}
    assert precision_digest(artifacts / view_name(str(recipe))) == precision_before, "graphs are written canonically"
    assert build_after_editing("stages/families/qwen_image/transformer.py") == {
        "checkpoint", "export", "surgery", "precision", "engine", "validate"}
