"""Numerical accuracy audits people can read: `doit audit recipes=a10-fp16,a10-int8`.

Reads each recipe's build (its manifest and the records of its view; recipes never built in this artifacts
root are built first) and writes `artifacts/audit/<name>/`:

* `report.html`: one self-contained page (charts as SVG and images as PNG data URIs; opens offline);
* `report.json`: every figure the page shows (schema below);
* `images/<recipe>/<prompt>_<run>.png`: each pipeline-check prompt's reference, built and amplified-difference
  images; `charts/*.svg`: every chart.

`<name>` is the audited views joined by `+` (a digest is appended past 64 characters). `audit` is a reserved
recipe name, so an audit folder can never be taken for a recipe's view.

report.json (``schema_version`` 2; 1 had no ``execution`` or ``not_measured``, and 0 or 1 where OCR read nothing)::

    {"schema_version", "name", "passed", "failures": [line], "tools": {package: version},
     "recipes": {view: {
        "built_by_audit", "manifest_key", "recipe": {name, file, file_sha256, overrides}, "target",
        "model": {source, seed | identity, warning}, "versions",
        "execution": {"runners": [runs whose numbers gate the recipe], "engine_ran": [part],
                      "engine_not_run": {part: reason}, "summary": "on ONNX Runtime — engine NOT run (...)"},
        "components": {component: {
            "precision", "validation_passed", "engine_run",
            "fit": the manifest's {estimated_bytes, engine_bytes, streaming: {budget_gib, resident_bytes,
                   streamed_bytes_per_call, host_link, seconds_per_call, calls_per_image, seconds_per_image}} | null,
            "errors": [validate rows: runner, against, output, gated, max_abs_diff, mean_abs_diff,
                       reference_max_abs, reference_rms, max_error, rms_error, min_cosine_similarity,
                       tolerance {max_error, rms_error, cosine}, would_pass_with {max_error, rms_error, cosine},
                       passed],
            "freezing": {output: {max_abs_diff_frozen, max_abs_diff_unfrozen, cosine_frozen,
                                  cosine_unfrozen, cosine_gain_from_freezing}} | null,
            "blocks": [BLOCK_ROW] | null, "blocks_status": "measured" | "not measured", "charts"}},
        "pipeline_check": null | {passed, runners, reference, thresholds, settings, engine, charts,
            "prompts": [{index, prompt, language, quoted_text,
                         "runs": {runner: {step_cosine: [...], min_step_cosine, psnr_db, ssim, identical,
                                           max_pixel_diff, passed}},
                         "images": {run or "difference:<runner>": file},
                         "differences": {runner: {gain, max_pixel_diff}},
                         "ocr": {run: {text, lines, characters, accuracy_vs_prompt: float | null,
                                       agreement_with_reference: float | null (graph runs),
                                       not_measured: {figure: reason}}}}]},
        "audit_thresholds": {min_ocr_agreement, min_text_accuracy}, "passed", "failures"}},
     "cross_recipe": {"components": [rows], "pipeline": [rows], "charts"}}

``execution`` is read from the records (each validation's ``engine_run`` and gated rows, the pipeline
check's ``engine`` and ``runners``); a part is a component or ``pipeline_check``. The page's headline is the
verdict followed by the summary, so a PASS measured on ONNX Runtime never reads as the engine's.

OCR figures need text: ``accuracy_vs_prompt`` is null when the prompt quotes no text ("the prompt quotes no
text") or when OCR read no text in this image nor in the reference ("no text read" for the reference, "no
text read in either image" for a run); ``agreement_with_reference`` is null in the second case. The reason
is in ``not_measured`` and the page shows it in place of a number. Where the reference holds text and a run
none, 0 is measured. Cross-recipe pipeline rows add ``ocr_images`` and ``ocr_images_with_text``; their worst
figures are over measured values only (null when none was).

The recipe's ``audit`` gates (min_ocr_agreement, min_text_accuracy) apply to each graph run of each prompt.
On a prompt that quotes text, a figure that was not measured does not pass the gate: the audit fails with a
"NOT MEASURED (reason): <gate> unchecked" line, since a gate that was asked for was never checked (the tiny
random-weight model renders no legible text, so there an OCR gate ends this way). On a prompt that quotes no
text, an unmeasured figure is not gated: no text is expected there.

BLOCK_ROW, the per-block error of block-wise validation (the validate report's ``blocks``, copied by the
manifest to ``components.<c>.validation.blocks``; the manifest's copy is read first), worst over the cases::

    {"block": int | str (graph order), "max_abs_diff": float, "cosine": float (the image stream),
     "text_max_abs_diff": float | None, "text_cosine": float | None (optional: the text stream),
     "runner": str (optional, default the built graph), "output": str (optional)}

Until block-wise validation exists the report says "not measured".

This module is light (the task graph imports it): recipes are checked here, before doit runs anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.audit.request import AUDIT_DIR, RUNNER_NAMES, AuditRequest
from stages.errors import ForgeError, fail
from stages.paths import RECIPES_DIR
from stages.recipe.load import load_recipe

__all__ = ["AUDIT_DIR", "RUNNER_NAMES", "AuditRequest", "parse_request", "recipe_names"]

VARIABLE = "recipes"


def available_recipes() -> list[str]:
    from stages.paths import RECIPES_DIR

    return sorted(path.stem for path in RECIPES_DIR.glob("*.yaml"))


def _bad(message: str) -> ForgeError:
    return fail(f"{VARIABLE}=", None, f"{message}; allowed: comma-separated recipe names "
                f"({', '.join(available_recipes())}) or paths to .yaml recipe files")


def recipe_names(value: str | None) -> list[str]:
    """The recipes `recipes=` names (comma-separated, duplicates dropped), each one a shipped recipe or a file.

    Raises ForgeError, one line naming `recipes=` and the allowed values.
    """
    items = [item.strip() for item in (value or "").split(",")]
    if not any(items):
        raise _bad("is empty")
    if not all(items):
        raise _bad(f"has an empty name in {value!r}")
    names: list[str] = []
    for item in items:
        if item.endswith((".yaml", ".yml")):
            if not Path(item).is_file():
                raise _bad(f"recipe file {item!r} not found")
        elif not (RECIPES_DIR / f"{item}.yaml").is_file():
            raise _bad(f"no recipe named {item!r}")
        if item not in names:
            names.append(item)
    return names


def parse_request(sources: list[str], overrides: dict[str, str], model: str | None, root: Path,
                  build_vars: tuple[tuple[str, str], ...] = ()) -> AuditRequest:
    """Load every recipe (with the command line's overrides) before anything runs: bad input is one line."""
    kept: list[str] = []
    views: list[str] = []
    thresholds: dict[str, dict[str, float | None]] = {}
    for source in sources:
        loaded = load_recipe(source, overrides=overrides, model=model)
        if loaded.name in views:  # a path to a shipped recipe and its name are one view
            continue
        kept.append(source)
        views.append(loaded.name)
        thresholds[loaded.name] = audit_thresholds(loaded)
    return AuditRequest(tuple(kept), tuple(views), tuple(sorted(overrides.items())), model, root, thresholds,
                        build_vars)


def audit_thresholds(loaded: Any) -> dict[str, float | None]:
    """The recipe's optional `audit:` section (stages.recipe.schema.AuditThresholds) as a plain dict."""
    section = getattr(loaded.recipe, "audit", None)
    return section.model_dump() if section is not None else {}
