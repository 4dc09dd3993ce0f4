"""Recipe -> doit task dicts. Light on purpose: building the graph imports no torch and touches no artifact.

A task is up to date when its fingerprint (resolved stage settings, model identity, tool versions) is
unchanged and its upstream records (which carry the sha256 of every upstream output) are unchanged.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.metadata
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from doit.exceptions import TaskFailed
from doit.tools import config_changed

from stages import artifacts, capabilities
from stages.errors import ForgeError
from stages.models import COMPONENTS
from stages.recipe import LoadedRecipe, load_recipe

DEFAULT_RECIPE = "a10-fp16"
RESERVED_VARS = ("recipe", "model")

SettingsFn = Callable[[LoadedRecipe, str | None], dict[str, Any]]


def _component_section(section: str) -> SettingsFn:
    def settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
        return {section: loaded.resolved["components"][component][section], "text_length": loaded.recipe.text_length}

    return settings


def _model_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    return {"model": model_identity(loaded)}


def _export_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    return {**_component_section("export")(loaded, component), "model": model_identity(loaded)}


def _engine_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    section = loaded.resolved["components"][component]
    return {"build": section["build"], "profile": section["profile"], "target": loaded.resolved["target"],
            "text_length": loaded.recipe.text_length}


def _validate_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    section = loaded.resolved["components"][component]
    return {"validate": section["validate"], "target": loaded.resolved["target"], "model": model_identity(loaded),
            "text_length": loaded.recipe.text_length}


def _calibration_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    """The calibration data's own identity: the task reruns exactly when the shared data would differ."""
    from stages.calibration import calibration_digest

    settings = loaded.recipe.components[component].precision.calibration
    assert settings is not None
    return {"digest": calibration_digest(component, model_identity(loaded), settings, loaded.recipe.text_length)}


def _pipeline_check_settings(loaded: LoadedRecipe, component: str | None) -> dict[str, Any]:
    return {"pipeline_check": loaded.resolved.get("pipeline_check"), "target": loaded.resolved["target"],
            "model": model_identity(loaded), "text_length": loaded.recipe.text_length}


def _always(loaded: LoadedRecipe, component: str | None) -> bool:
    return True


@dataclass(frozen=True)
class StageSpec:
    name: str
    module: str
    upstream: tuple[str, ...]
    per_component: bool
    settings: SettingsFn
    versions: tuple[str, ...]
    applies: Callable[[LoadedRecipe, str | None], bool] = _always


STAGES: dict[str, StageSpec] = {
    spec.name: spec
    for spec in (
        StageSpec("checkpoint", "stages.checkpoint", (), False, _model_settings, ("torch", "diffusers"),
                  lambda loaded, _: loaded.recipe.model.is_tiny),
        StageSpec("calibration", "stages.calibration", ("checkpoint",), True, _calibration_settings,
                  ("torch", "diffusers", "transformers"),
                  lambda loaded, c: loaded.recipe.components[c].precision.needs_calibration),
        StageSpec("export", "stages.export", ("checkpoint",), True, _export_settings,
                  ("torch", "diffusers", "onnx", "onnxscript")),
        StageSpec("surgery", "stages.surgery", ("export",), True, _component_section("surgery"),
                  ("onnx", "onnx-graphsurgeon", "polygraphy")),
        StageSpec("precision", "stages.precision", ("surgery", "calibration"), True, _component_section("precision"),
                  ("onnx", "nvidia-modelopt")),
        StageSpec("engine", "stages.engine", ("precision",), True, _engine_settings, ("polygraphy",)),
        StageSpec("validate", "stages.validate", ("checkpoint", "precision", "engine"), True, _validate_settings,
                  ("torch", "diffusers", "onnxruntime", "polygraphy")),
        StageSpec("pipeline_check", "stages.pipeline_check", ("checkpoint", "precision", "engine"), False,
                  _pipeline_check_settings, ("torch", "diffusers", "transformers", "onnxruntime", "scikit-image"),
                  lambda loaded, _: loaded.recipe.pipeline_check is not None),
    )
}

BACKEND_PACKAGES = {"tensorrt-rtx": "tensorrt-rtx-cu13", "tensorrt": "tensorrt"}
MANIFEST_PACKAGES = ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "polygraphy", "nvidia-modelopt",
                     "onnx-graphsurgeon")


def command_line_vars() -> dict[str, str]:
    """All `key=value` arguments doit parsed; doit only exposes them one by one through get_var."""
    from doit import doit_cmd

    return dict(doit_cmd._CMDLINE_VARS or {})


def load_from_command_line(cli_vars: dict[str, str]) -> LoadedRecipe:
    overrides = {key: value for key, value in cli_vars.items() if key not in RESERVED_VARS}
    loaded = load_recipe(cli_vars.get("recipe") or DEFAULT_RECIPE, overrides=overrides, model=cli_vars.get("model"))
    capabilities.activate_backend(loaded.recipe.target.backend)
    return loaded


def tool_versions(packages: tuple[str, ...]) -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def model_identity(loaded: LoadedRecipe) -> dict[str, Any]:
    """Tiny: name + seed. Checkpoint dir: path plus each weight/config file's size and mtime.

    Hashing tens of GB of weights on every no-op run is not affordable; size+mtime of every file in the
    checkpoint folder the recipe's components read is the cheap stand-in, and the export records the digests it produced.
    """
    source = loaded.recipe.model
    if source.is_tiny:
        return {"path": "tiny", "seed": source.seed}
    root = Path(source.path).resolve()
    folders = sorted({folder for name in loaded.recipe.components for folder in COMPONENTS[name].checkpoint_folders})
    files = {
        str(p.relative_to(root)): [p.stat().st_size, p.stat().st_mtime_ns]
        for folder in folders
        for p in sorted((root / folder).glob("*"))
        if p.is_file()
    }
    return {"path": str(root), "files": files}


def code_digest(spec: StageSpec, component: str | None) -> str:
    """The stage's own code counts as a tool version: its module plus the model module it drives."""
    package = Path(__file__).resolve().parent
    files = [package / f"{spec.module.rsplit('.', 1)[1]}.py"]
    if component:
        files.append(package.parent / (COMPONENTS[component].module.replace(".", "/") + ".py"))
    else:
        files += sorted((package / "models").glob("*.py"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def stage_versions(loaded: LoadedRecipe, spec: StageSpec, component: str | None) -> dict[str, str | None]:
    packages = spec.versions
    if spec.name == "engine":
        packages = (*packages, BACKEND_PACKAGES[loaded.recipe.target.backend])
    return {**tool_versions(packages), "forge-stage-code": code_digest(spec, component)}


def stage_instances(loaded: LoadedRecipe, spec: StageSpec) -> list[str | None]:
    """The components this stage runs for (None for a recipe-wide stage), where it applies at all."""
    components: list[str | None] = list(loaded.recipe.components) if spec.per_component else [None]
    return [c for c in components if spec.applies(loaded, c)]


def upstream_records(loaded: LoadedRecipe, spec: StageSpec, component: str | None) -> list[Path]:
    """Records this task reads: same component upstream, every component's for a recipe-wide stage."""
    records = []
    for name in spec.upstream:
        upstream = STAGES[name]
        for instance in stage_instances(loaded, upstream):
            if instance is None or component is None or instance == component:
                records.append(artifacts.record_path(loaded.name, instance, name))
    return records


def task_name(loaded: LoadedRecipe, component: str | None) -> str:
    return f"{loaded.name}/{component}" if component else loaded.name


def stage_tasks(loaded: LoadedRecipe, stage: str) -> Iterator[dict[str, Any]]:
    """One doit sub-task per component (or one per recipe for recipe-wide stages)."""
    spec = STAGES[stage]
    for component in stage_instances(loaded, spec):
        fingerprint = {"settings": spec.settings(loaded, component),
                       "versions": stage_versions(loaded, spec, component)}
        out_dir = artifacts.stage_dir(loaded.name, component, stage)
        yield {
            "name": task_name(loaded, component),
            "actions": [(run_stage, [loaded, component, stage])],
            "file_dep": [str(p) for p in upstream_records(loaded, spec, component)],
            "targets": [str(artifacts.record_path(loaded.name, component, stage))],
            "uptodate": [config_changed(fingerprint)],
            "clean": [(artifacts.remove_tree, [out_dir])],
            "verbosity": 2,
        }


def manifest_task(loaded: LoadedRecipe) -> dict[str, Any]:
    records = [artifacts.record_path(loaded.name, component, spec.name)
               for spec in STAGES.values() for component in stage_instances(loaded, spec)]
    manifest = artifacts.recipe_dir(loaded.name) / "manifest.json"
    fingerprint = {"recipe": loaded.resolved, "overrides": loaded.overrides, "model": model_identity(loaded),
                   "versions": tool_versions(MANIFEST_PACKAGES)}
    return {
        "name": loaded.name,
        "actions": [(write_manifest_action, [loaded])],
        "file_dep": [str(p) for p in records],
        "targets": [str(manifest)],
        "uptodate": [config_changed(fingerprint)],
        "clean": True,
        "verbosity": 2,
    }


def run_stage(loaded: LoadedRecipe, component: str | None, stage: str) -> TaskFailed | None:
    """doit action: configure the stage from its recipe section and upstream artifacts, run it atomically.

    Failures become one line (no traceback) unless FORGE_DEBUG=1; nothing is left in the stage dir.
    """
    label = f"{stage}:{task_name(loaded, component)}"
    try:
        module = importlib.import_module(STAGES[stage].module)
        configured = module.from_recipe(loaded, component)
        with artifacts.staged_output(artifacts.stage_dir(loaded.name, component, stage)) as scratch:
            report = configured(scratch)
            artifacts.write_record(scratch, stage, report)
    except ForgeError as error:
        return TaskFailed(f"{label}: {error}")
    except Exception as error:  # noqa: BLE001 - third-party failures become one readable line
        if os.environ.get("FORGE_DEBUG") == "1":
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        return TaskFailed(f"{label}: {type(error).__name__}: {first_line} (FORGE_DEBUG=1 shows the traceback)")
    if report.get("passed") is False:
        from stages.manifest import write_manifest

        write_manifest(loaded)
        return TaskFailed(f"{label}: {report.get('failure', 'failed')}")
    return None


def write_manifest_action(loaded: LoadedRecipe) -> None:
    from stages.manifest import summary_lines, write_manifest

    for line in summary_lines(artifacts.read_json(write_manifest(loaded))):
        print(line, file=sys.stderr)
