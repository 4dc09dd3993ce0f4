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

from stages.audit import AUDIT_DIR, AuditRequest
from stages.audit.collect import BuildView, component_figures, load_builds, pipeline_source, recipe_figures

SCHEMA_VERSION = 1
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
        figures["failures"] = gate(build.name, figures)
        figures["passed"] = not figures["failures"]
        return figures

    def _pipeline(self, build: BuildView, out: Path) -> dict[str, Any] | None:
        from stages.audit import charts, images, ocr

        source = pipeline_source(build)
        if source is None:
            return None
        reference, runners = source["reference"], list(source["runners"])
        cache = self.request.root / "cache" / "ocr"
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
    """One line per failed check: the build's own gates as recorded, then the recipe's `audit` thresholds."""
    failures = [f"{name}: {component} validation FAILED (its rows are in the report)"
                for component, entry in figures["components"].items() if entry["validation_passed"] is False]
    check = figures["pipeline_check"]
    if check is not None and check["passed"] is False:
        failures.append(f"{name}: pipeline check FAILED")
    thresholds = figures["audit_thresholds"]
    minimum_agreement, minimum_accuracy = thresholds.get("min_ocr_agreement"), thresholds.get("min_text_accuracy")
    for prompt in (check or {}).get("prompts", []):
        for runner in check["runners"]:
            read = prompt["ocr"][runner]
            value = read.get("agreement_with_reference")
            if minimum_agreement is not None and not value >= minimum_agreement:
                failures.append(f"{name}: prompt {prompt['index']} {runner}: OCR agreement with the reference "
                                f"{value:.3f} < min_ocr_agreement {minimum_agreement:g}")
            value = read.get("accuracy_vs_prompt")
            if minimum_accuracy is not None and value is not None and not value >= minimum_accuracy:
                failures.append(f"{name}: prompt {prompt['index']} {runner}: text accuracy vs the prompt's quoted "
                                f"text {value:.3f} < min_text_accuracy {minimum_accuracy:g}")
    return failures


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
                    "max_abs_diff": row["max_abs_diff"], "atol": row["tolerance"]["atol"],
                    "min_cosine_similarity": row["min_cosine_similarity"], "cosine_gate": row["tolerance"]["cosine"],
                    "passed": row["passed"],
                    "vs_fp16_graph": fp16 and {"max_abs_diff": fp16["max_abs_diff"],
                                               "min_cosine_similarity": fp16["min_cosine_similarity"]},
                })
        check = figures["pipeline_check"]
        if check is None:
            continue
        runs = [run for prompt in check["prompts"] for run in prompt["runs"].values()]
        reads = [prompt["ocr"][runner] for prompt in check["prompts"] for runner in check["runners"]]
        accuracies = [r["accuracy_vs_prompt"] for r in reads if r["accuracy_vs_prompt"] is not None]
        pipeline.append({
            "recipe": name, "runners": check["runners"], "prompts": len(check["prompts"]),
            "steps": (check["settings"] or {}).get("num_inference_steps"),
            "min_step_cosine": min(run["min_step_cosine"] for run in runs),
            "min_psnr_db": min((run["psnr_db"] for run in runs if run["psnr_db"] is not None), default=None),
            "min_ssim": min(run["ssim"] for run in runs),
            "min_ocr_agreement": min(r["agreement_with_reference"] for r in reads),
            "min_text_accuracy": min(accuracies, default=None),
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
