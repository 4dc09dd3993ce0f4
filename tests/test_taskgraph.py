"""The task graph and store keys: which settings reach which task, without running any stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.plan import fingerprint, registry
from stages.plan.registry import Ref
from stages.plan.resolve import Build
from stages.recipe.load import load_recipe
from stages.tasks import taskgraph

REPO = Path(__file__).resolve().parent.parent


def graph(recipe: str = "a10-fp16", root: Path = Path("/nonexistent"), **overrides: str) -> dict[str, dict[str, Any]]:
    build = Build(load_recipe(recipe, overrides), root)
    tasks = {}
    for stage in registry.STAGES:
        for task in taskgraph.stage_tasks(build, stage):
            tasks[f"{stage}:{task['name']}"] = task
    manifest = taskgraph.manifest_task(build)
    tasks[f"manifest:{manifest['name']}"] = manifest
    return tasks


def test_one_task_per_recipe_component_stage() -> None:
    per_component = [f"{stage}:a10-fp16/{component}" for stage in ("export", "surgery", "precision", "engine", "validate")
                     for component in ("text_encoder", "transformer", "vae_decoder")]
    expected = ["checkpoint:a10-fp16", "pipeline_check:a10-fp16", "manifest:a10-fp16", *per_component]
    assert sorted(graph()) == sorted(expected)
    quantized = graph("l40s-fp8")
    assert [name for name in quantized if name.startswith("calibration:")] == ["calibration:l40s-fp8/transformer"]


def test_dependencies_follow_the_pipeline() -> None:
    tasks = graph()
    assert tasks["surgery:a10-fp16/transformer"]["task_dep"] == ["export:a10-fp16/transformer"]
    assert tasks["export:a10-fp16/transformer"]["task_dep"] == ["checkpoint:a10-fp16"]
    check = tasks["pipeline_check:a10-fp16"]["task_dep"]
    assert sorted(check) == sorted(["checkpoint:a10-fp16"] + [
        f"{s}:a10-fp16/{c}" for c in ("text_encoder", "transformer", "vae_decoder") for s in ("precision", "engine")])
    assert len(tasks["manifest:a10-fp16"]["task_dep"]) == len(tasks) - 1
    assert "calibration:l40s-fp8/transformer" in graph("l40s-fp8")["precision:l40s-fp8/transformer"]["task_dep"]


def keys(built: dict[str, Path], recipe: str = "a10-fp16", **overrides: str) -> dict[str, str | None]:
    """Every task's store key against the session build's store (None: an upstream entry would be new)."""
    build = Build(load_recipe(recipe, overrides), built["artifacts"])
    return {ref.label: build.key(ref) for ref in build.refs()}


def test_keys_of_an_unchanged_recipe_are_the_built_entries(built: dict[str, Path]) -> None:
    current = keys(built)
    assert None not in current.values()
    for label, key in current.items():
        stage = label.split("/")[-1]
        assert (built["recipe"] / label).resolve() == built["artifacts"] / "store" / stage / key


def test_tolerance_change_touches_only_validation(built: dict[str, Path]) -> None:
    before, after = keys(built), keys(built, **{"components.transformer.validate.tolerances.sample.max_error": "0.01"})
    assert {label for label in before if before[label] != after[label]} == {"transformer/validate"}


def test_build_settings_change_touches_the_engine_and_what_reads_it(built: dict[str, Path]) -> None:
    before, after = keys(built), keys(built, **{"components.transformer.build.optimization_level": "1"})
    changed = {label for label in before if before[label] != after[label]}
    assert changed == {"transformer/engine", "transformer/validate", "pipeline_check"}
    assert after["transformer/engine"] is not None and after["transformer/validate"] is None, \
        "validation's key waits for the new engine's bytes"


def test_recipe_name_is_not_part_of_any_key(built: dict[str, Path]) -> None:
    """a10-int8 shares everything but the transformer's surgery (no LoRA inputs) and what follows with a10-fp16."""
    fp16, int8 = keys(built), keys(built, "a10-int8")
    same = {label for label in fp16 if fp16[label] == int8.get(label)}
    assert same == {"checkpoint", *(f"{c}/{s}" for c in ("text_encoder", "vae_decoder")
                                    for s in ("export", "surgery", "precision", "engine", "validate")),
                    "transformer/export"}


def test_key_material_names_everything_that_changes_the_output(built: dict[str, Path]) -> None:
    build = Build(load_recipe("a10-fp16"), built["artifacts"])
    material = build.inputs(Ref("validate", "transformer"))
    assert material is not None
    assert set(material) == {"schema", "stage", "component", "settings", "model", "upstream", "versions", "code"}
    assert set(material["upstream"]) == {"transformer/precision", "transformer/engine"}
    assert material["model"] and all(name.startswith("transformer/") for name in material["model"])
    assert material["versions"]["torch"] and material["settings"]["validate"]["batch"] == 2
    closure = {str(p.relative_to(REPO)) for p in fingerprint.module_closure(registry.code_roots(build.loaded, Ref("validate", "transformer")))}
    assert {"stages/validate.py", "stages/families/qwen_image/transformer.py", "stages/graphs/runners.py"} <= closure
    assert "stages/export.py" not in closure and "stages/families/qwen_image/vae.py" not in closure


def test_building_the_graph_imports_nothing_heavy() -> None:
    from tests.conftest import modules_loaded_by_doit

    heavy, output = modules_loaded_by_doit(["list", "--all", "recipe=l40s-fp8"], (
        "torch", "numpy", "onnx", "onnxruntime", "diffusers", "modelopt", "tensorrt_rtx", "polygraphy", "fsspec"))
    assert heavy == [], heavy
    assert "calibration:l40s-fp8/transformer" in output


def test_family_code_run_through_hooks_is_in_the_key() -> None:
    """Family code reached by name (tiny checkpoint, calibration capture, pipeline adapters) counts as imported."""
    loaded = load_recipe("l40s-fp8")
    for ref, module in ((Ref("checkpoint"), "pipeline.py"), (Ref("calibration", "transformer"), "calibration.py"),
                        (Ref("pipeline_check"), "pipeline.py")):
        closure = {p.name for p in fingerprint.module_closure(registry.code_roots(loaded, ref))}
        assert module in closure, ref
    export = {str(p.relative_to(REPO)) for p in fingerprint.module_closure(
        registry.code_roots(loaded, Ref("export", "transformer")))}
    assert "stages/families/qwen_image/calibration.py" not in export


def test_keys_cover_the_code_a_plan_runs_not_the_recipe_machinery() -> None:
    """Type-only imports and thunks are not edges; the precision stage's module follows the plan."""
    checks = {"recipe.py", "fit.py", "memory_fit.py", "model_dir.py", "prompts.py", "taskgraph.py", "registry.py"}
    for recipe in ("a10-fp16", "a10-int8"):
        loaded = load_recipe(recipe)
        for ref in registry.refs(loaded):
            closure = {p.name for p in fingerprint.module_closure(registry.code_roots(loaded, ref))}
            assert not closure & checks, (recipe, ref, closure & checks)
            if ref.stage == "precision":
                quantized = loaded.recipe.components[ref.component].precision.quantized
                assert ("quantize.py" in closure) == quantized and "precision.py" in closure, (recipe, ref)
