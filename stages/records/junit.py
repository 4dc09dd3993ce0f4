"""`artifacts/<recipe>/junit.xml`: the build's checks as JUnit test cases, for CI systems to display.

One test case per component validation and one per pipeline-check prompt; a failure's message is the one-line
reason with its figures (measured value, threshold). Built from the manifest alone and written beside it
(atomically, under the view lock); no timestamps, durations or host names, so identical builds give identical
bytes. Standard library only.
"""

from __future__ import annotations

import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.store.local import Store
from stages.store.views import view_dir, view_lock

JUNIT = "junit.xml"


@dataclass(frozen=True)
class Case:
    suite: str
    name: str
    failure: str | None = None
    skipped: str | None = None
    details: str = ""


def cases(manifest: dict[str, Any]) -> list[Case]:
    found = [_validation_case(component, entry) for component, entry in manifest.get("components", {}).items()]
    check = manifest.get("pipeline_check")
    if check is not None:
        found += [_prompt_case(prompt, check.get("thresholds") or {}) for prompt in check.get("prompts", [])]
    return found


def _validation_case(component: str, entry: dict[str, Any]) -> Case:
    validation = entry.get("validation")
    name = f"validate {component}"
    if validation is None:
        return Case("validation", name, skipped="not validated (the recipe has no validate section for it)")
    metrics = validation.get("metrics") or []
    lines = [metric_line(m) for m in metrics]
    engine = validation.get("engine_run") or {}
    lines.append("engine ran (TrtRunner)" if engine.get("ran") else f"engine NOT run: {engine.get('skipped_because')}")
    failure = None
    if not validation.get("passed"):
        failed = [metric_line(m) for m in metrics if not m.get("passed", True)]
        failure = validation.get("failure") or f"validation of {component} failed: " + ("; ".join(failed) or "see manifest")
    return Case("validation", name, failure=failure, details="\n".join(lines))


def metric_line(metric: dict[str, Any]) -> str:
    """`runner output: max_error x (max m), rms_error y (max n), cosine c (min k) -> PASS|FAIL` from a metric row."""
    try:
        tol = metric["tolerance"]
        verdict = "PASS" if metric["passed"] else "FAIL"
        return (f"{metric['runner']} {metric['output']}: max|diff| {metric['max_abs_diff']:.3g}, max_error "
                f"{metric['max_error']:.3g} (max {tol['max_error']:g}), rms_error {metric['rms_error']:.3g} (max "
                f"{tol['rms_error']:g}), cosine {metric['min_cosine_similarity']:.6f} (min {tol['cosine']:g}) -> {verdict}")
    except (KeyError, TypeError, ValueError):
        return str(metric)


def _prompt_case(prompt: dict[str, Any], thresholds: dict[str, Any]) -> Case:
    text = " ".join(str(prompt.get("prompt", "")).split())
    name = f"pipeline_check prompt {prompt.get('index')}: {text[:60]}{'...' if len(text) > 60 else ''}"
    lines, failed = [], []
    for runner, run in (prompt.get("runs") or {}).items():
        figures = (f"min step cosine {run.get('min_step_cosine', float('nan')):.6g}, PSNR {run.get('psnr_db', float('nan')):.4g} dB, "
                   f"SSIM {run.get('ssim', float('nan')):.6g}")
        lines.append(f"{runner}: {figures} ({'PASS' if run.get('passed') else 'FAIL'})")
        if not run.get("passed", True):
            failed.append(f"{runner}: " + (", ".join(run.get("failures") or []) or figures))
    if thresholds:
        lines.append("thresholds: " + ", ".join(f"{k} {v:g}" for k, v in sorted(thresholds.items())))
    failure = f"prompt {prompt.get('index')} ({text[:40]}) " + "; ".join(failed) if failed else None
    return Case("pipeline_check", name, failure=failure, details="\n".join(lines))


def render(manifest: dict[str, Any]) -> bytes:
    recipe = manifest.get("recipe", {}).get("name", "forge")
    found = cases(manifest)
    root = ET.Element("testsuites", name=f"forge {recipe}", tests=str(len(found)),
                      failures=str(sum(c.failure is not None for c in found)), errors="0",
                      skipped=str(sum(c.skipped is not None for c in found)))
    for suite_name in dict.fromkeys(c.suite for c in found):
        members = [c for c in found if c.suite == suite_name]
        suite = ET.SubElement(root, "testsuite", name=f"{recipe}.{suite_name}", tests=str(len(members)),
                              failures=str(sum(c.failure is not None for c in members)), errors="0",
                              skipped=str(sum(c.skipped is not None for c in members)))
        for case in members:
            element = ET.SubElement(suite, "testcase", classname=f"{recipe}.{suite_name}", name=case.name)
            if case.failure is not None:
                ET.SubElement(element, "failure", message=case.failure, type="threshold").text = case.failure
            if case.skipped is not None:
                ET.SubElement(element, "skipped", message=case.skipped)
            if case.details:
                ET.SubElement(element, "system-out").text = case.details
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"


def write(store: Store, name: str, manifest: dict[str, Any]) -> Path:
    """Beside manifest.json, renamed into place (the caller holds the view lock, as for the manifest)."""
    path = view_dir(store, name) / JUNIT
    temporary = store.scratch_path(view_lock(name), ".xml")
    temporary.write_bytes(render(manifest))
    os.replace(temporary, path)
    return path
