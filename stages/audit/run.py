"""The audit itself: gather every figure of the requested builds, draw, OCR, write report.json and report.html.

Configured like a stage (the constructor only stores the request; the call does the work) and written like a
store entry: everything goes to a scratch folder first and replaces `artifacts/audit/<name>/` in one rename,
so a reader never sees half a report.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.audit.collect import BuildView, component_figures, load_builds, pipeline_source, recipe_figures
from stages.audit.request import AUDIT_DIR, RUNNER_NAMES, AuditRequest
from stages.store.local import CACHE_DIR

SCHEMA_VERSION = 2
TOOLS = ("rapidocr-onnxruntime", "onnxruntime", "matplotlib", "numpy", "pillow")
RUN_KEYS = ("step_cosine", "min_step_cosine", "psnr_db", "ssim", "identical", "max_pixel_diff", "passed")


def tool_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    found: dict[str, str | None] = {}
    for package in TOOLS:
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = None
    return found


@dataclass(frozen=True)
class Audit:
    request: AuditRequest

    def __call__(self) -> dict[str, Any]:
        request = self.request
        builds = load_builds(request)
        scratch = request.root / AUDIT_DIR / ".tmp" / f"{request.name}-{os.getpid()}"
        shutil.rmtree(scratch, ignore_errors=True)
        scratch.mkdir(parents=True)
        try:
            report = self._report(builds, scratch)
            (scratch / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            from stages.audit.report import render

            (scratch / "report.html").write_text(render(report, scratch), encoding="utf-8")
            _replace(scratch, request.out_dir)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return report

    def _report(self, builds: list[BuildView], out: Path) -> dict[str, Any]:
        recipes = {build.name: self._recipe(build, out) for build in builds}
        cross = cross_recipe(recipes)
        from stages.audit import charts

        write(out / "charts" / "cross_recipe.svg", charts.cross_recipe_chart(cross["components"], cross["pipeline"]))
        cross["charts"] = {"cross_recipe": "charts/cross_recipe.svg"}
        failures = [line for figures in recipes.values() for line in figures["failures"]]
        return {"schema_version": SCHEMA_VERSION, "name": self.request.name, "passed": not failures,
                "failures": failures, "tools": tool_versions(), "recipes": recipes, "cross_recipe": cross}

    def _recipe(self, build: BuildView, out: Path) -> dict[str, Any]:
        from stages.audit import charts

        print(f"audit: {build.name}", file=sys.stderr, flush=True)
        figures = recipe_figures(build)
        figures["components"] = {}
        for component in build.manifest["components"]:
            entry = component_figures(build, component)
            if entry["blocks"]:
                path = f"charts/{build.name}_{component}_blocks.svg"
                write(out / path, charts.blocks_chart(entry["blocks"], f"{build.name} {component}: error after each block"))
                entry["charts"]["blocks"] = path
            figures["components"][component] = entry
        figures["pipeline_check"] = self._pipeline(build, out)
        figures["audit_thresholds"] = dict(self.request.thresholds.get(build.name, {}))
        figures["execution"] = execution(figures)
        figures["failures"] = gate(build.name, figures)
        figures["passed"] = not figures["failures"]
        return figures

    def _pipeline(self, build: BuildView, out: Path) -> dict[str, Any] | None:
        from stages.audit import charts, images, ocr

        source = pipeline_source(build)
        if source is None:
            return None
        reference, runners = source["reference"], list(source["runners"])
        cache = self.request.root / CACHE_DIR / "ocr"
        prompts, curves = [], []
        for prompt in source["prompts"]:
            index = prompt["index"]
            picture = images.read_png(build.verified_file(f"pipeline_check/{prompt['image']}"))
            panels = images.split_panels(picture, list(prompt.get("panels") or [reference, *runners]))
            files, differences = {}, {}
            for run, image in panels.items():
                files[run] = f"images/{build.name}/{index}_{run}.png"
                images.write_png(image, out / files[run])
            for runner in runners:
                difference, gain, largest = images.amplified_difference(panels[reference], panels[runner])
                name = f"difference:{runner}"
                files[name] = f"images/{build.name}/{index}_difference_{runner}.png"
                images.write_png(difference, out / files[name])
                differences[runner] = {"gain": gain, "max_pixel_diff": largest}
            print(f"audit: {build.name} prompt {index}: OCR of {len(panels)} images", file=sys.stderr, flush=True)
            text = ocr.score_prompt(prompt["prompt"], panels, reference, cache)
            prompts.append({
                "index": index, "prompt": prompt["prompt"], "language": prompt.get("language"),
                "quoted_text": text["quoted_text"],
                "runs": {runner: {k: run.get(k) for k in RUN_KEYS} for runner, run in prompt["runs"].items()},
                "images": files, "differences": differences, "ocr": text["runs"],
            })
            curves += [(f"prompt {index} ({prompt.get('language')}) {runner}", run["step_cosine"])
                       for runner, run in prompt["runs"].items()]
        thresholds = source.get("thresholds") or {}
        chart = f"charts/{build.name}_step_cosine.svg"
        write(out / chart, charts.step_cosine_chart(curves, thresholds.get("min_step_cosine"),
                                                    f"{build.name}: latents after each step vs PyTorch"))
        return {"passed": source.get("passed"), "reference": reference, "runners": runners,
                "engine": source.get("engine"), "thresholds": thresholds, "settings": source.get("settings"),
                "prompts": prompts, "charts": {"step_cosine": chart}}


def gate(name: str, figures: dict[str, Any]) -> list[str]:
    """One line per failed check: the build's own gates as recorded, then the recipe's `audit` thresholds.

    An OCR gate on a prompt that quotes text, where OCR read no text in the reference or the run, is not
    measured; it does not pass: the line says so and the audit fails, since a gate someone asked for was never
    checked. On a prompt that quotes no text an unmeasured figure is nothing to gate (no text is expected).
    """
    failures = [f"{name}: {component} validation FAILED (its rows are in the report)"
                for component, entry in figures["components"].items() if entry["validation_passed"] is False]
    check = figures["pipeline_check"]
    if check is not None and check["passed"] is False:
        failures.append(f"{name}: pipeline check FAILED")
    thresholds = figures["audit_thresholds"]
    gates = (("min_ocr_agreement", "agreement_with_reference", "OCR agreement with the reference"),
             ("min_text_accuracy", "accuracy_vs_prompt", "text accuracy vs the prompt's quoted text"))
    for prompt in (check or {}).get("prompts", []):
        for runner in check["runners"]:
            read = prompt["ocr"][runner]
            for threshold, key, what in gates:
                minimum, value = thresholds.get(threshold), read.get(key)
                where = f"{name}: prompt {prompt['index']} {runner}"
                if minimum is None or (value is None and not prompt["quoted_text"]):
                    continue
                if value is None:
                    reason = (read.get("not_measured") or {}).get(key, "not recorded")
                    failures.append(f"{where}: {what} NOT MEASURED ({reason}): {threshold} {minimum:g} unchecked")
                elif not value >= minimum:
                    failures.append(f"{where}: {what} {value:.3f} < {threshold} {minimum:g}")
    return failures


def execution(figures: dict[str, Any]) -> dict[str, Any]:
    """On which runners the gated numbers were measured, and whether the engine itself ran, per part.

    Read from the records (each component's validation `engine_run` and gated rows, the pipeline check's
    `engine` and `runners`), so a PASS can never be read as the engine's own when only its ONNX ran.
    """
    runners: list[str] = []
    parts: dict[str, dict[str, Any]] = {}
    for component, entry in figures["components"].items():
        runners += [row["runner"] for row in entry["errors"] if row["gated"]]
        if entry["engine_run"] is not None:
            parts[component] = entry["engine_run"]
    check = figures["pipeline_check"]
    if check is not None:
        runners += check["runners"]
        if check.get("engine") is not None:
            parts["pipeline_check"] = check["engine"]
    runners = list(dict.fromkeys(runners))
    ran = [part for part, engine in parts.items() if engine.get("ran")]
    not_run = {part: str(engine.get("skipped_because") or "no reason recorded")
               for part, engine in parts.items() if not engine.get("ran")}
    target = figures["target"] or {}
    built_for = f"the engine is built for {target.get('gpu')}, compute capability {target.get('compute_capability')}"
    names = " and ".join(RUNNER_NAMES.get(r, r) for r in runners)
    measured = f"on {names}" if runners else "with nothing run (no validation, no pipeline check)"
    reasons = list(dict.fromkeys(not_run.values()))
    if not parts:
        engine = "engine NOT run (nothing recorded running it)"
    elif not not_run:
        engine = f"engine ran ({target.get('backend')} engine through TrtRunner)"
    elif not ran:
        engine = f"engine NOT run ({'; '.join(reasons)}; {built_for})"
    else:
        engine = (f"engine ran for {', '.join(ran)} but NOT for {', '.join(not_run)} "
                  f"({'; '.join(reasons)}; {built_for})")
    return {"runners": runners, "engine_ran": ran, "engine_not_run": not_run, "summary": f"{measured} — {engine}"}


def cross_recipe(recipes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One row per recipe, component and output (the built graph vs PyTorch fp32), and one per recipe end to end."""
    components, pipeline = [], []
    for name, figures in recipes.items():
        for component, entry in figures["components"].items():
            rows = entry["errors"]
            for row in rows:
                if not row["gated"]:
                    continue
                fp16 = next((r for r in rows if r["runner"] == row["runner"] and r["output"] == row["output"]
                             and str(r["against"]).endswith(":fp16_graph")), None)
                components.append({
                    "recipe": name, "component": component, "output": row["output"], "runner": row["runner"],
                    "precision": entry["precision"].get("mode") or entry["precision"].get("dtype"),
                    "max_abs_diff": row["max_abs_diff"], "max_error": row["max_error"],
                    "max_error_gate": row["tolerance"]["max_error"], "rms_error": row["rms_error"],
                    "rms_error_gate": row["tolerance"]["rms_error"],
                    "min_cosine_similarity": row["min_cosine_similarity"], "cosine_gate": row["tolerance"]["cosine"],
                    "passed": row["passed"],
                    "vs_fp16_graph": fp16 and {"max_error": fp16["max_error"],
                                               "min_cosine_similarity": fp16["min_cosine_similarity"]},
                })
        check = figures["pipeline_check"]
        if check is None:
            continue
        runs = [run for prompt in check["prompts"] for run in prompt["runs"].values()]
        reads = [prompt["ocr"][runner] for prompt in check["prompts"] for runner in check["runners"]]
        accuracies = [r["accuracy_vs_prompt"] for r in reads if r["accuracy_vs_prompt"] is not None]
        agreements = [r["agreement_with_reference"] for r in reads if r["agreement_with_reference"] is not None]
        images = [read for prompt in check["prompts"] for read in prompt["ocr"].values()]
        pipeline.append({
            "recipe": name, "runners": check["runners"], "prompts": len(check["prompts"]),
            "steps": (check["settings"] or {}).get("num_inference_steps"),
            "min_step_cosine": min(run["min_step_cosine"] for run in runs),
            "min_psnr_db": min((run["psnr_db"] for run in runs if run["psnr_db"] is not None), default=None),
            "min_ssim": min(run["ssim"] for run in runs),
            "min_ocr_agreement": min(agreements, default=None),
            "min_text_accuracy": min(accuracies, default=None),
            "ocr_images": len(images), "ocr_images_with_text": sum(1 for read in images if read["characters"]),
            "passed": figures["passed"],
        })
    return {"components": components, "pipeline": pipeline}


def write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _replace(scratch: Path, target: Path) -> None:
    """Swap the finished folder in: the old report stays readable until the rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    old = scratch.with_name(scratch.name + "-old")
    if target.exists():
        os.replace(target, old)
    os.replace(scratch, target)
    shutil.rmtree(old, ignore_errors=True)
