"""The manifest: the build's receipt, assembled from store entries (whose records carry every output's sha256).

Portable by construction: paths are relative to the recipe's view or the artifacts root, the checkpoint is
named by the sha256 of its files, and the recipe file by its name inside the repository and its digest.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path
from typing import Any

from stages.paths import REPO_DIR
from stages.plan import fingerprint
from stages.plan.registry import MANIFEST_PACKAGES, STAGES, Ref, stage_instances, stage_refs
from stages.plan.resolve import Build
from stages.recipe.fit import estimated_engine_bytes, estimated_part_bytes
from stages.recipe.load import build_overrides
from stages.recipe.schema import TINY_WARNING
from stages.records.reproducibility import REPRODUCIBILITY
from stages.reports import ValidationReport
from stages.store import digests
from stages.targets.backends import BACKENDS
from stages.targets.gpus import HOST_LINKS
from stages.targets.memory_fit import GIB

SCHEMA_VERSION = 2


def manifest_versions(build: Build) -> dict[str, str | None]:
    backend = BACKENDS[build.loaded.recipe.target.backend].package
    return fingerprint.tool_versions((*MANIFEST_PACKAGES, backend, "onnxscript"))


def manifest_key(build: Build) -> str:
    """Identity of the manifest's content: the entries it lists, the recipe, versions and this module's code."""
    return digests.digest({"entries": {ref.label: build.key(ref) for ref in build.refs()},
                           "recipe": _recipe_entry(build), "versions": manifest_versions(build),
                           "code": build.code.digest(["stages.records.manifest"])})


def _recipe_entry(build: Build) -> dict[str, Any]:
    loaded = build.loaded
    source = Path(loaded.source).resolve()
    try:
        shown = str(source.relative_to(REPO_DIR))
    except ValueError:
        shown = source.name
    resolved = {key: value for key, value in loaded.resolved.items() if key != "audit"}  # read by `doit audit` only
    overrides = {key: value for key, value in loaded.overrides.items()
                 if key == "model.path" or key in build_overrides(loaded.overrides)}
    if not loaded.recipe.model.is_tiny:
        shown_model = Path(loaded.recipe.model.path).resolve().name  # the checkpoint by name; model.files has its identity
        resolved["model"] = {**resolved["model"], "path": shown_model}
        overrides = {k: shown_model if k == "model.path" else v for k, v in overrides.items()}
    return {"name": loaded.name, "file": shown, "file_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
            "resolved": resolved, "overrides": overrides}


def model_entry(build: Build) -> dict[str, Any]:
    """The checkpoint by identity: tiny + seed, or the sha256 of every file of the checkpoint the recipe reads."""
    source = build.loaded.recipe.model
    if source.is_tiny:
        return {"source": "tiny", "path": "tiny", "seed": source.seed, "warning": TINY_WARNING,
                "checkpoint": _stage_outputs(build, Ref("checkpoint"))}
    files = build.model_files(Ref("pipeline_check"))
    return {"source": "checkpoint", "name": Path(source.path).resolve().name,
            "identity": digests.digest(files, 64), "files": files}


def build_manifest(build: Build) -> dict[str, Any]:
    recipe = build.loaded.recipe
    target = recipe.target
    cc = target.compute_capability
    entries = {ref.label: build.entry(ref) for ref in build.refs()}
    return {
        "schema_version": SCHEMA_VERSION,
        "build": {"key": manifest_key(build)},
        "recipe": _recipe_entry(build),
        "model": model_entry(build),
        "target": {"gpu": target.gpu, "backend": target.backend, "compute_capability": f"{cc[0]}.{cc[1]}"},
        "versions": manifest_versions(build),
        "platform": {"python": platform.python_version(), "machine": platform.machine()},
        "store": {label: build.store.relative(entry.path) for label, entry in entries.items() if entry},
        "components": {name: _component_entry(build, name) for name in recipe.components},
        "pipeline_check": _pipeline_check_entry(build),
        **({"pipeline_check_not_run": build.loaded.pipeline_check_not_run} if build.loaded.pipeline_check_not_run
           else {}),
        "reproducibility": REPRODUCIBILITY,
    }


def _pipeline_check_entry(build: Build) -> dict[str, Any] | None:
    report = _report(build, Ref("pipeline_check"))
    if report is None:
        return None
    keep = ("passed", "runner", "runners", "reference", "engine", "components", "thresholds", "settings",
            "scheduler", "lora", "truncated_prompts", "summary", "failure")
    return {**{k: report[k] for k in keep if k in report},
            "prompts": [{k: p[k] for k in ("index", "prompt", "language", "runs") if k in p}
                        for p in report.get("prompts", [])],
            "artifacts": _stage_outputs(build, Ref("pipeline_check"))}


def _component_entry(build: Build, component: str) -> dict[str, Any]:
    loaded = build.loaded
    stages = [spec.name for spec in STAGES.values() if component in stage_instances(loaded, spec)]
    reports = {stage: _report(build, Ref(stage, component)) for stage in stages if stage != "engine"}
    engines = [_report(build, ref) or {} for ref in _engine_refs(loaded, component)]
    validation = ValidationReport.model_validate(reports["validate"]) if reports.get("validate") else None
    return {
        "artifacts": {stage: _stage_outputs(build, Ref(stage, component)) if stage != "engine" else
                      _engine_outputs(build, component) for stage in stages},
        "feed_function": build.code.thunk_target(loaded.family.components[component].feed_function),
        "text_length": loaded.recipe.text_length,
        "tokenizer": _tokenizer_entry(component, reports.get("export") or {}),
        "profile": _graph_profile(engines),
        "fit": _fit_entry(build, component),
        "parts": _parts_entry(build, component, engines),
        "precision": _precision_entry(reports.get("precision") or {}),
        "lora": _lora_entry(reports),
        "calibration": reports.get("calibration") and {
            **{k: reports["calibration"][k] for k in ("samples", "files", "prompts", "settings", "inputs")
               if k in reports["calibration"]},
            "entry": build.store.relative(build.entry(Ref("calibration", component)).path)},  # type: ignore[union-attr]
        "surgery": [{k: v for k, v in p.items() if k != "frozen_nodes"}
                    for p in (reports.get("surgery") or {}).get("passes", [])],
        "validation": None if validation is None else {
            "passed": validation.passed,
            "failure": validation.failure,
            "metrics": [row.dump() for row in validation.comparisons],
            "measured_against_comparison_graphs": [row.dump() for row in validation.measured_against_comparison_graphs],
            "freezing_effect": validation.freezing_effect and {
                output: effect.dump() for output, effect in validation.freezing_effect.items()},
            "engine_run": validation.engine.dump(),
            "onnxruntime_run": validation.onnxruntime.dump(),
            "cases": validation.cases,
            "cases_not_run": validation.cases_not_run,
            "blockwise": validation.blockwise,
            "blocks": validation.blocks and [block.dump() for block in validation.blocks],
            "results": f"{component}/validate/{validation.results_file}",
        },
    }


FIT_TOLERANCE = 0.05  # built engine bytes above the estimate by more than this share (and FIT_SLACK_BYTES) warn
FIT_SLACK_BYTES = 64 << 20  # an engine's code and metadata (a few MB at tiny width, ~0.2% at release width)


def _engine_refs(loaded: Any, component: str) -> list[Ref]:
    return [ref for ref in stage_refs(loaded, STAGES["engine"]) if ref.component == component]


def _engine_outputs(build: Build, component: str) -> list[dict[str, Any]] | None:
    found = [_stage_outputs(build, ref) for ref in _engine_refs(build.loaded, component)]
    return None if any(outputs is None for outputs in found) else [o for outputs in found for o in outputs or []]


def _graph_profile(engines: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The profile of the component's graph inputs (a split engine's parts also profile what they hand on)."""
    if len(engines) == 1:
        return engines[0].get("profile")
    profile: dict[str, Any] = {}
    for report in engines:
        taken = {i["name"] for i in (report.get("part") or {}).get("inputs", []) if i["from"] == "graph input"}
        profile.update({name: shape for name, shape in (report.get("profile") or {}).items() if name in taken})
    return profile or None


def _parts_entry(build: Build, component: str, engines: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A split engine's parts in run order: files, blocks, what each takes and hands on, and its fit. To run the
    component, run the parts in order; feed each the graph inputs and earlier parts' outputs its `inputs` name."""
    refs = _engine_refs(build.loaded, component)
    if len(refs) == 1:
        return None
    checkpoint = build.checkpoint_dir()
    estimates = (estimated_part_bytes(build.loaded.recipe, checkpoint, component, len(refs))
                 if checkpoint is not None else [None] * len(refs))
    entries = []
    for ref, report, estimate in zip(refs, engines, estimates):
        outputs = _stage_outputs(build, ref) or []
        contract = report.get("part") or {}
        entries.append({"index": ref.part, "blocks": contract.get("blocks"), "files": outputs,
                        "inputs": contract.get("inputs"), "outputs": contract.get("outputs"),
                        "graph_sha256": contract.get("graph_sha256"), "build_seconds": report.get("build_seconds"),
                        "weight_streaming": report.get("weight_streaming"),
                        "fit": {"estimated_bytes": estimate, "engine_bytes": sum(o["bytes"] for o in outputs)}})
    return entries


def _fit_entry(build: Build, component: str) -> dict[str, Any] | None:
    """What the GPU fit check priced for this engine (weights under the plan, from the checkpoint's headers) and
    what the built engine's files hold (all parts of a split one)."""
    checkpoint, outputs = build.checkpoint_dir(), _engine_outputs(build, component)
    if checkpoint is None or outputs is None:
        return None
    recipe = build.loaded.recipe
    built = sum(meta["bytes"] for meta in outputs)
    return {"estimated_bytes": estimated_engine_bytes(recipe, checkpoint, component), "engine_bytes": built,
            "streaming": _streaming_entry(recipe, component, built)}


def _streaming_entry(recipe: Any, component: str, engine_bytes: int) -> dict[str, Any]:
    """Bytes resident on the GPU and streamed over the host link per call at the recipe's budget, and what that
    costs per call and per image at the link's theoretical rate (a floor: real copies reach ~80% of it)."""
    budget = recipe.components[component].build.weight_streaming
    link, rate = HOST_LINKS[recipe.target.gpu]
    resident = engine_bytes if budget is None else min(engine_bytes, int(budget.budget_gib * GIB))
    streamed = engine_bytes - resident
    calls = recipe.family_spec.fit().calls_per_image(component, recipe.components[component])
    return {"budget_gib": None if budget is None else budget.budget_gib, "resident_bytes": resident,
            "streamed_bytes_per_call": streamed, "host_link": link, "host_link_bytes_per_s": rate,
            "seconds_per_call": streamed / rate, "calls_per_image": calls, "seconds_per_image": streamed / rate * calls}


def fit_warnings(manifest: dict[str, Any]) -> list[str]:
    """One line per engine whose built bytes exceed the fit estimate by more than 5% (and 64 MiB)."""
    lines = []
    for component, entry in manifest["components"].items():
        named = [(f"{component} engine", entry.get("fit"))]
        named += [(f"{component} engine part {part['index']}", part["fit"]) for part in entry.get("parts") or []]
        for name, fit in named:
            if fit and fit["estimated_bytes"] is not None and \
                    fit["engine_bytes"] > fit["estimated_bytes"] * (1 + FIT_TOLERANCE) + FIT_SLACK_BYTES:
                lines.append(f"warning: {name} is {fit['engine_bytes'] / GIB:.2f} GiB, "
                             f"{fit['engine_bytes'] / max(fit['estimated_bytes'], 1) - 1:.0%} above the fit check's "
                             f"{fit['estimated_bytes'] / GIB:.2f} GiB estimate: the GPU fit decision may be wrong")
    return lines


BULKY_PRECISION_KEYS = ("excluded_nodes", "quantized_gemms", "detached_shared_qdq")


def _lora_entry(reports: dict[str, Any]) -> dict[str, Any] | None:
    """The engine's LoRA inputs (stages.graphs.lora): targets, rank, what they cost, and validation with LoRAs bound."""
    lora = (reports.get("surgery") or {}).get("lora")
    if not lora:
        return None
    base = lora.get("base_linear_flops_per_token") or 0
    return {**lora, "extra_linear_flops_percent": round(100 * lora["flops_per_token"] / base, 3) if base else None,
            "validation": (reports.get("validate") or {}).get("lora")}


def _precision_entry(report: dict[str, Any]) -> dict[str, Any]:
    """How precision was decided: converter or quantizer, counts of quantized/excluded nodes and why."""
    return {key: value for key, value in report.items() if key not in BULKY_PRECISION_KEYS}


def _tokenizer_entry(component: str, export: dict[str, Any]) -> dict[str, Any] | None:
    if "tokenizer" not in export:
        return None
    return {"path": f"{component}/export/{export['tokenizer']}", "padding": export["padding"]}


def _report(build: Build, ref: Ref) -> dict[str, Any] | None:
    entry = build.entry(ref)
    return entry.report if entry else None


def _stage_outputs(build: Build, ref: Ref) -> list[dict[str, Any]] | None:
    """Outputs with paths inside the recipe's view (`component/stage/file`), sha256 and size."""
    entry = build.entry(ref)
    if entry is None:
        return None
    return [{"path": f"{ref.label}/{name}", **meta} for name, meta in entry.outputs.items()]


def summary_lines(manifest: dict[str, Any], path: str) -> list[str]:
    """What a person needs at the end of a build: where the receipt is, what passed, what was not run."""
    lines = [f"manifest: {path}", *fit_warnings(manifest)]
    if manifest["model"].get("warning"):
        lines.append(f"*** {manifest['model']['warning']} (seed {manifest['model'].get('seed')}) ***")
    check = manifest.get("pipeline_check")
    if manifest.get("pipeline_check_not_run"):
        lines.append(f"pipeline check: NOT RUN: {manifest['pipeline_check_not_run']}")
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
