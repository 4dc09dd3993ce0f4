from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from stages import taskgraph
from stages.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


def tasks(overrides: dict[str, str] | None = None, model: str | None = None,
          recipe: str = "a10-fp16") -> dict[str, dict[str, Any]]:
    loaded = load_recipe(recipe, overrides, model)
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
    per_component = [f"{stage}:a10-fp16/{component}" for stage in ("export", "surgery", "precision", "engine", "validate")
                     for component in ("text_encoder", "transformer", "vae_decoder")]
    expected = ["checkpoint:a10-fp16", "pipeline_check:a10-fp16", "manifest:a10-fp16", *per_component]
    assert sorted(tasks()) == sorted(expected)
    quantized = tasks(recipe="l40s-fp8")
    assert [name for name in quantized if name.startswith("calibration:")] == ["calibration:l40s-fp8/transformer"]


def test_dependencies_follow_the_pipeline() -> None:
    graph = tasks()
    assert graph["surgery:a10-fp16/transformer"]["file_dep"] == [
        graph["export:a10-fp16/transformer"]["targets"][0]]
    assert any(dep.endswith("a10-fp16/checkpoint/record.json") for dep in graph["export:a10-fp16/transformer"]["file_dep"])
    check = graph["pipeline_check:a10-fp16"]["file_dep"]
    assert {dep.split("/a10-fp16/")[1] for dep in check} == {"checkpoint/record.json"} | {
        f"{c}/{s}/record.json" for c in ("text_encoder", "transformer", "vae_decoder") for s in ("precision", "engine")}
    assert len(graph["manifest:a10-fp16"]["file_dep"]) == len(graph) - 1
    quantized = tasks(recipe="l40s-fp8")
    assert quantized["calibration:l40s-fp8/transformer"]["targets"][0] in quantized[
        "precision:l40s-fp8/transformer"]["file_dep"]


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


def test_build_settings_change_touches_only_the_engine() -> None:
    before = tasks(recipe="l40s-fp8")
    after = tasks({"components.transformer.build.optimization_level": "1"}, recipe="l40s-fp8")
    changed = {name for name in before if fingerprint(before[name]) != fingerprint(after[name])}
    assert changed == {"engine:l40s-fp8/transformer", "manifest:l40s-fp8"}


def test_checkpoint_dir_model_has_no_checkpoint_task(tmp_path: Path) -> None:
    for folder in ("transformer", "text_encoder", "tokenizer", "vae"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "config.json").write_text("{}")
        (tmp_path / folder / "diffusion_pytorch_model.safetensors").write_bytes(b"x")
    graph = tasks(model=str(tmp_path))
    assert "checkpoint:a10-fp16" not in graph
    assert graph["export:a10-fp16/transformer"]["file_dep"] == []


def test_building_the_graph_imports_nothing_heavy() -> None:
    code = ("import sys; from doit.doit_cmd import DoitMain;"
            "DoitMain().run(['list', '--all', 'recipe=l40s-fp8']);"
            "heavy=[m for m in ('torch','onnx','onnxruntime','diffusers','modelopt','tensorrt_rtx') if m in sys.modules];"
            "print('HEAVY', heavy)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "HEAVY []" in result.stdout, result.stdout + result.stderr
    assert "calibration:l40s-fp8/transformer" in result.stdout
