"""What an audit reads: each recipe's view (manifest.json and the stage records it links to), built if missing.

The manifest is the receipt (digests, versions, model identity, validation rows); the pipeline check's own
record adds what the manifest leaves out (which panel of the side-by-side PNG is which run). Every PNG the
audit reads is checked against the sha256 the manifest lists, so an audit never shows a damaged image.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.audit.request import AuditRequest
from stages.errors import ForgeError, fail
from stages.paths import REPO_DIR
from stages.store.local import CACHE_DIR

MANIFEST = "manifest.json"
RECORD = "record.json"


@dataclass(frozen=True)
class BuildView:
    """One recipe's build as the audit sees it."""

    name: str
    folder: Path
    manifest: dict[str, Any]
    built_by_audit: bool

    def record(self, label: str) -> dict[str, Any] | None:
        """The report of `<label>/record.json` (e.g. `pipeline_check`, `transformer/validate`)."""
        try:
            data = json.loads((self.folder / label / RECORD).read_text())
        except (OSError, ValueError):
            return None
        report = data.get("report") if isinstance(data, dict) else None
        return report if isinstance(report, dict) else None

    def verified_file(self, path: str) -> Path:
        """A file of the view, after checking its sha256 against the manifest's listing."""
        check = self.manifest.get("pipeline_check") or {}
        listed = {entry["path"]: entry["sha256"] for entry in check.get("artifacts", [])}
        for component in self.manifest.get("components", {}).values():
            for outputs in (component.get("artifacts") or {}).values():
                listed.update({entry["path"]: entry["sha256"] for entry in outputs or []})
        file = self.folder / path
        if path not in listed:
            raise fail(file, None, "not listed in the manifest; rebuild the recipe")
        try:
            digest = hashlib.sha256(file.read_bytes()).hexdigest()
        except OSError as error:
            raise fail(file, None, f"cannot be read ({error.strerror}); rebuild the recipe") from None
        if digest != listed[path]:
            raise fail(file, None, "does not match the sha256 in the manifest (damaged); rebuild the recipe")
        return file


def read_manifest(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "components" in data else None


def build_command(request: AuditRequest, source: str) -> list[str]:
    """`doit build` for one recipe, with the audit's model and overrides; its own doit database (a cache)."""
    database = request.root / CACHE_DIR / "audit-doit.db"
    database.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "doit", "run", "-f", str(REPO_DIR / "dodo.py"), "--db-file", str(database),
               "build", f"recipe={source}"]
    if request.model is not None:
        command.append(f"model={request.model}")
    return command + [f"{key}={value}" for key, value in (*request.build_vars, *request.overrides)]


def load_builds(request: AuditRequest) -> list[BuildView]:
    """Every requested recipe's build; a recipe without a manifest in this artifacts root is built first."""
    builds = []
    for source, name in zip(request.sources, request.views):
        folder = request.root / name
        manifest = read_manifest(folder)
        built = False
        if manifest is None:
            command = build_command(request, source)
            print(f"audit: {name} has no build in {request.root}; building it: doit build recipe={source}",
                  file=sys.stderr, flush=True)
            env = {**os.environ, "FORGE_ARTIFACTS": str(request.root)}
            result = subprocess.run(command, cwd=REPO_DIR, env=env, check=False)
            manifest = read_manifest(folder)
            if result.returncode != 0 or manifest is None:
                raise ForgeError(f"audit: building {name} failed (doit build recipe={source} exited "
                                 f"{result.returncode}); its log is above")
            built = True
        builds.append(BuildView(name, folder, manifest, built))
    return builds


def blocks_of(build: BuildView, component: str) -> list[dict[str, Any]] | None:
    """Per-block errors (see BLOCK_ROW in stages.audit) from the manifest or the validate record; None if absent."""
    validation = (build.manifest["components"].get(component) or {}).get("validation") or {}
    rows = validation.get("blocks")
    if rows is None:
        rows = (build.record(f"{component}/validate") or {}).get("blocks")
    if not isinstance(rows, list) or not rows:
        return None
    clean = []
    for position, row in enumerate(rows):
        if not isinstance(row, dict) or not {"max_abs_diff", "cosine"} <= set(row):
            raise fail(build.folder / component / "validate" / RECORD, "blocks",
                       f"row {position} lacks max_abs_diff/cosine (expected {{block, max_abs_diff, cosine}})")
        clean.append({"block": row.get("block", position), "max_abs_diff": float(row["max_abs_diff"]),
                      "cosine": float(row["cosine"]), "runner": row.get("runner", "onnxruntime"),
                      **{key: row[key] for key in ("output", "text_max_abs_diff", "text_cosine") if key in row}})
    return clean


ERROR_KEYS = ("runner", "against", "output", "gated", "max_abs_diff", "mean_abs_diff", "reference_max_abs",
              "reference_rms", "max_error", "rms_error", "min_cosine_similarity", "tolerance", "would_pass_with",
              "passed")


def component_figures(build: BuildView, component: str) -> dict[str, Any]:
    """Errors vs PyTorch fp32 (gated) and vs the comparison graphs (measured), freezing, blocks."""
    entry = build.manifest["components"][component]
    validation = entry.get("validation")
    blocks = blocks_of(build, component)
    figures: dict[str, Any] = {
        "precision": {k: v for k, v in (entry.get("precision") or {}).items()
                      if k in ("mode", "dtype", "weights", "activations", "converter", "quantizer", "high_precision")},
        "validation_passed": None if validation is None else validation.get("passed"),
        "engine_run": None if validation is None else validation.get("engine_run"),
        "fit": entry.get("fit"),
        "errors": [],
        "freezing": None,
        "blocks": blocks,
        "blocks_status": "measured" if blocks else "not measured",
        "charts": {},
    }
    if validation is not None:
        rows = [*validation.get("metrics", []), *validation.get("measured_against_comparison_graphs", [])]
        figures["errors"] = [{key: row.get(key) for key in ERROR_KEYS} for row in rows]
        figures["freezing"] = validation.get("freezing_effect")
    return figures


def recipe_figures(build: BuildView) -> dict[str, Any]:
    """The identity half of a recipe's audit: recipe, target, model, versions (the manifest's own words)."""
    manifest = build.manifest
    recipe = manifest.get("recipe") or {}
    model = manifest.get("model") or {}
    return {
        "built_by_audit": build.built_by_audit,
        "manifest_key": (manifest.get("build") or {}).get("key"),
        "recipe": {key: recipe.get(key) for key in ("name", "file", "file_sha256", "overrides")},
        "target": manifest.get("target"),
        "model": {key: value for key, value in model.items() if key not in ("checkpoint", "files")},
        "versions": manifest.get("versions"),
    }


def pipeline_source(build: BuildView) -> dict[str, Any] | None:
    """The pipeline check's report (the record has panel order and image names; the manifest the digests)."""
    if build.manifest.get("pipeline_check") is None:
        return None
    report = build.record("pipeline_check")
    if report is None:
        raise fail(build.folder / "pipeline_check" / RECORD, None, "missing or unreadable; rebuild the recipe")
    return report
