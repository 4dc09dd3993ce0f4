"""The manifest: the build's receipt, assembled from stage records (which carry every output's sha256)."""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path
from typing import Any

from stages import artifacts
from stages.models import COMPONENTS
from stages.recipe import LoadedRecipe
from stages.taskgraph import (BACKEND_PACKAGES, MANIFEST_PACKAGES, STAGES, model_identity, stage_instances,
                              tool_versions)

SCHEMA_VERSION = 1


def write_manifest(loaded: LoadedRecipe) -> Path:
    path = artifacts.recipe_dir(loaded.name) / "manifest.json"
    artifacts.write_json_atomic(path, build_manifest(loaded))
    return path


def build_manifest(loaded: LoadedRecipe) -> dict[str, Any]:
    recipe = loaded.recipe
    target = recipe.target
    cc = target.compute_capability
    source = recipe.model
    return {
        "schema_version": SCHEMA_VERSION,
        "recipe": {"name": loaded.name, "source": loaded.source, "resolved": loaded.resolved,
                   "overrides": loaded.overrides},
        "model": {
            "source": "tiny" if source.is_tiny else "checkpoint",
            **model_identity(loaded),
            **({"warning": "TINY RANDOM-WEIGHT MODEL: not Qwen-Image; accuracy numbers do not transfer"}
               if source.is_tiny else {}),
            "checkpoint": _stage_outputs(loaded, None, "checkpoint") if source.is_tiny else None,
        },
        "target": {"gpu": target.gpu, "backend": target.backend, "compute_capability": f"{cc[0]}.{cc[1]}"},
        "versions": tool_versions((*MANIFEST_PACKAGES, BACKEND_PACKAGES[target.backend], "onnxscript")),
        "platform": {"python": sys.version.split()[0], "machine": platform.machine()},
        "components": {name: _component_entry(loaded, name) for name in recipe.components},
        "pipeline_check": _pipeline_check_entry(loaded),
    }


def _pipeline_check_entry(loaded: LoadedRecipe) -> dict[str, Any] | None:
    report = _report(loaded, None, "pipeline_check")
    if report is None:
        return None
    keep = ("passed", "runner", "runners", "reference", "engine", "components", "thresholds", "settings",
            "truncated_prompts", "summary", "failure")
    return {**{k: report[k] for k in keep if k in report},
            "prompts": [{k: p[k] for k in ("index", "prompt", "language", "runs") if k in p}
                        for p in report.get("prompts", [])],
            "artifacts": _stage_outputs(loaded, None, "pipeline_check")}


def _component_entry(loaded: LoadedRecipe, component: str) -> dict[str, Any]:
    stages = [spec.name for spec in STAGES.values() if component in stage_instances(loaded, spec)]
    reports = {stage: _report(loaded, component, stage) for stage in stages}
    engine = reports.get("engine") or {}
    validation = reports.get("validate")
    return {
        "artifacts": {stage: _stage_outputs(loaded, component, stage) for stage in stages},
        "feed_function": COMPONENTS[component].feed_function,
        "text_length": loaded.recipe.text_length,
        "tokenizer": _tokenizer_entry(component, reports.get("export") or {}),
        "profile": engine.get("profile"),
        "precision": _precision_entry(reports.get("precision") or {}),
        "calibration": reports.get("calibration") and {k: reports["calibration"][k] for k in (
            "digest", "shared_dir", "reused", "samples", "files", "prompts", "settings", "inputs")
            if k in reports["calibration"]},
        "surgery": [{k: v for k, v in p.items() if k != "frozen_nodes"} for p in (reports.get("surgery") or {}).get("passes", [])],
        "validation": None if validation is None else {
            "passed": validation["passed"],
            "metrics": validation["comparisons"],
            "measured_against_comparison_graphs": validation.get("measured_against_comparison_graphs", []),
            "freezing_effect": validation.get("freezing_effect"),
            "engine_run": validation["engine"],
            "onnxruntime_run": validation["onnxruntime"],
            "cases": validation["cases"],
            "results": _relative(artifacts.stage_dir(loaded.name, component, "validate") / validation["results_file"]),
        },
    }


BULKY_PRECISION_KEYS = ("excluded_nodes", "quantized_gemms", "detached_shared_qdq")


def _precision_entry(report: dict[str, Any]) -> dict[str, Any]:
    """How precision was decided: converter or quantizer, counts of quantized/excluded nodes and why."""
    return {key: value for key, value in report.items() if key not in BULKY_PRECISION_KEYS}


def _tokenizer_entry(component: str, export: dict[str, Any]) -> dict[str, Any] | None:
    if "tokenizer" not in export:
        return None
    return {"path": f"{component}/export/{export['tokenizer']}", "padding": export["padding"]}


def _report(loaded: LoadedRecipe, component: str | None, stage: str) -> dict[str, Any] | None:
    path = artifacts.record_path(loaded.name, component, stage)
    return artifacts.read_json(path)["report"] if path.exists() else None


def _stage_outputs(loaded: LoadedRecipe, component: str | None, stage: str) -> list[dict[str, Any]] | None:
    path = artifacts.record_path(loaded.name, component, stage)
    if not path.exists():
        return None
    outputs = artifacts.read_json(path)["outputs"]
    folder = path.parent
    return [{"path": _relative(folder / name), **meta} for name, meta in outputs.items()]


def _relative(path: Path) -> str:
    return str(path.relative_to(artifacts.recipe_dir(path.relative_to(artifacts.ARTIFACTS_DIR).parts[0])))


def summary_lines(manifest: dict[str, Any]) -> list[str]:
    """What a person needs at the end of a build: where the receipt is, what passed, what was not run."""
    path = artifacts.recipe_dir(manifest["recipe"]["name"]) / "manifest.json"
    lines = [f"manifest: {os.path.relpath(path)}"]
    if manifest["model"].get("warning"):
        lines.append(f"*** {manifest['model']['warning']} (seed {manifest['model'].get('seed')}) ***")
    check = manifest.get("pipeline_check")
    if check is not None:
        lines.append(f"pipeline check: {'PASSED' if check['passed'] else 'FAILED'} on {check.get('runner')} "
                     f"({len(check.get('prompts', []))} prompts; images in pipeline_check/)")
    for component, entry in manifest["components"].items():
        validation = entry.get("validation")
        if validation is None:
            lines.append(f"{component}: not validated")
            continue
        verdict = "PASSED" if validation["passed"] else "FAILED"
        engine = validation["engine_run"]
        ran = "engine ran (TrtRunner)" if engine.get("ran") else f"engine NOT run: {engine.get('skipped_because')}"
        lines.append(f"{component}: validation {verdict} on ONNX Runtime; {ran}")
    return lines
