from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from stages import taskgraph
from stages.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def tasks(overrides: dict[str, str] | None = None, model: str | None = None) -> dict[str, dict[str, Any]]:
    loaded = load_recipe("a10-fp16", overrides, model)
    graph = {}
    for stage in taskgraph.STAGES:
        for task in taskgraph.stage_tasks(loaded, stage):
            graph[f"{stage}:{task['name']}"] = task
    manifest = taskgraph.manifest_task(loaded)
    graph[f"manifest:{manifest['name']}"] = manifest
    return graph


def fingerprint(task: dict[str, Any]) -> str:
    return task["uptodate"][0]._calc_digest()


def test_one_task_per_recipe_component_stage() -> None:
    assert sorted(tasks()) == sorted([
        "checkpoint:a10-fp16", "export:a10-fp16/transformer", "surgery:a10-fp16/transformer",
        "precision:a10-fp16/transformer", "engine:a10-fp16/transformer", "validate:a10-fp16/transformer",
        "manifest:a10-fp16",
    ])


def test_dependencies_follow_the_pipeline() -> None:
    graph = tasks()
    assert graph["surgery:a10-fp16/transformer"]["file_dep"][0].endswith("a10-fp16/transformer/export/record.json")
    assert any(dep.endswith("a10-fp16/checkpoint/record.json") for dep in graph["export:a10-fp16/transformer"]["file_dep"])
    assert len(graph["manifest:a10-fp16"]["file_dep"]) == 6


def test_tolerance_change_touches_only_validation() -> None:
    before = tasks()
    after = tasks({"components.transformer.validate.tolerances.sample.atol": "0.01"})
    changed = {name for name in before if fingerprint(before[name]) != fingerprint(after[name])}
    assert changed == {"validate:a10-fp16/transformer", "manifest:a10-fp16"}


def test_surgery_change_does_not_touch_export() -> None:
    before = tasks()
    after = tasks({"components.transformer.surgery.passes": "[fold_constants, freeze_text_branch]"})
    changed = {name for name in before if fingerprint(before[name]) != fingerprint(after[name])}
    assert changed == {"surgery:a10-fp16/transformer", "manifest:a10-fp16"}


def test_checkpoint_dir_model_has_no_checkpoint_task(tmp_path: Path) -> None:
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    graph = tasks(model=str(tmp_path))
    assert "checkpoint:a10-fp16" not in graph
    assert graph["export:a10-fp16/transformer"]["file_dep"] == []


def test_building_the_graph_imports_nothing_heavy() -> None:
    code = ("import sys; sys.argv=['doit','list','--all','recipe=a10-fp16'];"
            "from doit.doit_cmd import DoitMain; from doit.cmd_base import ModuleTaskLoader;"
            "import dodo; DoitMain(ModuleTaskLoader(dodo)).run(sys.argv[1:]);"
            "heavy=[m for m in ('torch','onnx','onnxruntime','diffusers','modelopt','tensorrt_rtx') if m in sys.modules];"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
