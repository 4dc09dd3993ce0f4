"""report.html: the audit as one self-contained page (no script, no external resource; opens offline).

Every chart and image is embedded as a data URI read from the files report.json names, so the page shows
exactly the files written beside it. The page is built from report.json alone: anything it shows is a
figure in the JSON.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from stages.audit.images import data_uri
from stages.audit.request import RUNNER_NAMES
from stages.log import human_bytes

STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:0 auto;max-width:1280px;padding:16px 24px;color:#1d2330}
h1{font-size:24px}h2{margin-top:36px;border-bottom:2px solid #d7dce5;padding-bottom:4px}h3{margin-top:24px}
table{border-collapse:collapse;margin:8px 0 16px;font-size:12.5px}
th,td{border:1px solid #d7dce5;padding:3px 8px;text-align:left;vertical-align:top}td:first-child{white-space:nowrap}
th{background:#f1f3f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.pass{color:#18794e;font-weight:600}.fail{color:#c62828;font-weight:700}.muted{color:#6b7383}
.warning{background:#fff1f0;border:2px solid #c62828;color:#8b1111;padding:8px 12px;font-weight:700;margin:12px 0}
.verdict{font-size:18px;padding:8px 12px;border-radius:4px;display:inline-block}
.verdict.pass{background:#e6f6ec}.verdict.fail{background:#fdecec}.verdict .how{color:#1d2330;font-weight:600}
figure{margin:8px 0}figure img.chart{max-width:100%;border:1px solid #eceff4}
.panels{display:flex;gap:10px;flex-wrap:wrap}.panels figure{margin:0}
.panels img{width:256px;height:auto;image-rendering:pixelated;border:1px solid #ccd}
figcaption{font-size:12px;color:#4a5263}code{background:#f1f3f7;padding:0 3px}
.engine{background:#fff7e0;border-left:4px solid #c27c00;padding:4px 10px;font-weight:600}
.engine.ran{background:#e6f6ec;border-left-color:#18794e}
nav.contents{border:1px solid #d7dce5;padding:4px 16px;margin:16px 0;background:#fafbfc}
nav.contents h2{margin-top:8px;font-size:16px;border:0}nav.contents ul{margin:2px 0;padding-left:20px}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def num(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return esc(value)


def cosine(value: float | None) -> str:
    return "—" if value is None else f"{value:.8f}"


def verdict(passed: bool | None) -> str:
    if passed is None:
        return '<span class="muted">not run</span>'
    return '<span class="pass">PASS</span>' if passed else '<span class="fail">FAIL</span>'


def table(headers: Sequence[str] | None, rows: Iterable[Sequence[str]], numeric: Sequence[int] = ()) -> str:
    """Cells are HTML already (escaped by the caller); `headers` None makes a key/value table."""
    head = "<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr></thead>" if headers else ""
    body = "".join("<tr>" + "".join(f'<td class="num">{cell}</td>' if i in numeric else f"<td>{cell}</td>"
                                    for i, cell in enumerate(row)) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


class Page:
    """Reads the files report.json names from the report's folder and embeds them."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.contents: list[tuple[int, str, str]] = []  # (heading level, id, title) in page order
        self.ids: set[str] = set()

    def heading(self, level: int, title: str, after: str = "", key: str | None = None) -> str:
        """`<hN id>` listed in the table of contents; `after` is HTML beside the title (a verdict)."""
        anchor = re.sub(r"[^A-Za-z0-9_-]+", "-", key or title).strip("-").lower() or "section"
        unique, count = anchor, 1
        while unique in self.ids:
            count += 1
            unique = f"{anchor}-{count}"
        self.ids.add(unique)
        self.contents.append((level, unique, title))
        return f'<h{level} id="{unique}">{esc(title)}{" " + after if after else ""}</h{level}>'

    def table_of_contents(self) -> str:
        """Nested lists of links to every heading, in page order (levels 2 to 4)."""
        parts, depth = ['<nav class="contents" id="contents"><h2>Contents</h2>'], 1
        for level, anchor, title in self.contents:
            while depth < level:
                parts.append("<ul>")
                depth += 1
            while depth > level:
                parts.append("</ul>")
                depth -= 1
            parts.append(f'<li><a href="#{anchor}">{esc(title)}</a></li>')
        parts += ["</ul>"] * (depth - 1) + ["</nav>"]
        return "".join(parts)

    def image(self, path: str, alt: str, css: str = "") -> str:
        mime = "image/svg+xml" if path.endswith(".svg") else "image/png"
        uri = data_uri((self.folder / path).read_bytes(), mime)
        return f'<img class="{css}" src="{uri}" alt="{esc(alt)}" data-file="{esc(path)}">'

    def chart(self, path: str, caption: str) -> str:
        return f"<figure>{self.image(path, caption, 'chart')}<figcaption>{esc(caption)}</figcaption></figure>"


def render(report: dict[str, Any], folder: Path) -> str:
    page = Page(folder)
    recipes = report["recipes"]
    title = f"Accuracy audit: {' + '.join(recipes)}"
    parts = [f"<h1>{esc(title)}</h1>", headline(report)]
    parts += [f'<p class="warning">{esc(name)}: {esc(figures["model"]["warning"])}</p>'
              for name, figures in recipes.items() if figures["model"].get("warning")]
    if report["failures"]:
        parts.append("<ul>" + "".join(f'<li class="fail">{esc(line)}</li>' for line in report["failures"]) + "</ul>")
    sections = [_cross_recipe(page, report["cross_recipe"])]
    sections += [_recipe(page, name, figures) for name, figures in recipes.items()]
    parts += [page.table_of_contents(), *sections]
    tools = ", ".join(f"{esc(k)} {esc(v)}" for k, v in report["tools"].items())
    parts.append(f'<p class="muted">Audit tools: {tools}. Figures: report.json (schema {report["schema_version"]}).</p>')
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{esc(title)}</title>"
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


def headline(report: dict[str, Any]) -> str:
    """PASSED/FAILED with where the numbers were measured and whether the engine ran, first thing on the page:
    a PASS measured on ONNX Runtime is not a PASS of the engine. One sentence when every recipe ran alike,
    else one line per recipe."""
    word = "PASSED" if report["passed"] else "FAILED"
    summaries = {name: figures["execution"]["summary"] for name, figures in report["recipes"].items()}
    if len(set(summaries.values())) == 1:
        text = f'<strong>{word}</strong> <span class="how">{esc(next(iter(summaries.values())))}</span>'
    else:
        text = f"<strong>{word}</strong>" + "".join(f'<br><span class="how">{esc(name)}: {esc(summary)}</span>'
                                                    for name, summary in summaries.items())
    return f'<p class="verdict {"pass" if report["passed"] else "fail"}" id="verdict">{text}</p>'


def _cross_recipe(page: Page, cross: dict[str, Any]) -> str:
    rows = [(esc(r["recipe"]), esc(r["component"]), esc(r["output"]), esc(r["runner"]), esc(r["precision"]),
             num(r["max_error"]), num(r["max_error_gate"]), num(r["rms_error"]), num(r["rms_error_gate"]),
             cosine(r["min_cosine_similarity"]), num(r["cosine_gate"]),
             num((r["vs_fp16_graph"] or {}).get("max_error")),
             cosine((r["vs_fp16_graph"] or {}).get("min_cosine_similarity")), verdict(r["passed"]))
            for r in cross["components"]]
    parts = [page.heading(2, "Across recipes"), page.heading(3, "Component outputs vs PyTorch fp32"),
             table(("recipe", "component", "output", "run", "precision", "max error", "max error gate",
                    "rms error", "rms error gate", "min cosine", "cosine gate", "max error vs fp16 graph",
                    "cosine vs fp16 graph", "gate"), rows, numeric=(5, 6, 7, 8, 9, 10, 11, 12))]
    if cross["pipeline"]:
        rows = [(esc(r["recipe"]), esc(", ".join(r["runners"])), num(r["prompts"]), num(r["steps"]),
                 cosine(r["min_step_cosine"]), num(r["min_psnr_db"]), num(r["min_ssim"]),
                 _worst_ocr(r, "min_ocr_agreement"), _worst_ocr(r, "min_text_accuracy"), verdict(r["passed"]))
                for r in cross["pipeline"]]
        parts += [page.heading(3, "End to end (pipeline check) and rendered text"),
                  table(("recipe", "runs", "prompts", "steps", "worst step cosine", "worst PSNR dB", "worst SSIM",
                         "worst OCR agreement", "worst text accuracy (built)", "audit"), rows,
                        numeric=(2, 3, 4, 5, 6, 7, 8))]
    parts.append(page.chart(cross["charts"]["cross_recipe"], "Which recipe drifts where: higher is worse on every "
                            "panel (1 - cosine on a log axis; each error as a share of its gate)."))
    return "\n".join(parts)


def _worst_ocr(row: dict[str, Any], key: str) -> str:
    """A worst OCR figure, or why there is none: "no text read" where OCR found no text in any image."""
    if row[key] is not None:
        return num(row[key], 3)
    if not row.get("ocr_images_with_text"):
        return f'<span class="muted">no text read (in any of the {num(row.get("ocr_images"))} images)</span>'
    return '<span class="muted">not measured</span>'


def runner_names(runners: Iterable[str]) -> str:
    return " and ".join(RUNNER_NAMES.get(runner, runner) for runner in dict.fromkeys(runners))


def _engine(summary: str, ran: bool) -> str:
    return f'<p class="engine{" ran" if ran else ""}">{esc(summary)}</p>'


def _recipe(page: Page, name: str, figures: dict[str, Any]) -> str:
    recipe, model, target = figures["recipe"], figures["model"], figures["target"] or {}
    identity = model.get("identity") or f"tiny random weights, seed {model.get('seed')}"
    overrides = ", ".join(f"{k}={v}" for k, v in (recipe.get("overrides") or {}).items()) or "none"
    execution = figures["execution"]
    parts = [page.heading(2, name, verdict(figures["passed"]), key=f"recipe-{name}"),
             _engine(f"{'PASSED' if figures['passed'] else 'FAILED'} {execution['summary']}",
                     not execution["engine_not_run"] and bool(execution["engine_ran"])),
             table(None, [
                 ("recipe file", f"<code>{esc(recipe.get('file'))}</code> sha256 {esc(recipe.get('file_sha256'))}"),
                 ("overrides", esc(overrides)),
                 ("target", esc(f"{target.get('gpu')} (compute capability {target.get('compute_capability')}), "
                                f"{target.get('backend')}")),
                 ("model", esc(f"{model.get('source')}: {model.get('name') or ''} {identity}")),
                 ("manifest key", esc(figures.get("manifest_key"))),
                 ("built by this audit", num(figures["built_by_audit"])),
                 ("tool versions", esc(", ".join(f"{k} {v}" for k, v in (figures["versions"] or {}).items()))),
                 ("audit thresholds", esc(", ".join(f"{k} {v}" for k, v in figures["audit_thresholds"].items()
                                                    if v is not None) or "none set in the recipe")),
             ])]
    if model.get("warning"):
        parts.append(f'<p class="warning">{esc(model["warning"])}</p>')
    parts += [f'<p class="fail">{esc(line)}</p>' for line in figures["failures"]]
    for component, entry in figures["components"].items():
        parts.append(_component(page, name, component, entry))
    parts.append(_pipeline(page, name, figures["pipeline_check"]))
    return "\n".join(parts)


def fit_line(fit: dict[str, Any]) -> str:
    """The engine's size against the fit estimate, and what streaming it costs at the recipe's budget."""
    line = f"engine {human_bytes(fit['engine_bytes'])} (fit estimate {human_bytes(fit['estimated_bytes'])} of weights)"
    streaming = fit.get("streaming") or {}
    if not streaming.get("streamed_bytes_per_call"):
        return line + "; held whole on the GPU, nothing streamed"
    return (f"{line}; {human_bytes(streaming['resident_bytes'])} resident, {human_bytes(streaming['streamed_bytes_per_call'])} "
            f"streamed per call over {streaming['host_link']}: >= {streaming['seconds_per_call']:.2f} s per call, "
            f">= {streaming['seconds_per_image']:.1f} s per image ({streaming['calls_per_image']} calls)")


def _component(page: Page, name: str, component: str, entry: dict[str, Any]) -> str:
    precision = ", ".join(f"{k} {v}" for k, v in entry["precision"].items())
    parts = [page.heading(3, f"{name} / {component}", verdict(entry["validation_passed"])),
             f'<p class="muted">precision: {esc(precision)}</p>']
    if entry.get("fit"):
        parts.append(f'<p class="muted">{esc(fit_line(entry["fit"]))}</p>')
    engine = entry["engine_run"] or {}
    runs = runner_names(r["runner"] for r in entry["errors"] if r["gated"]) or "nothing"
    if engine.get("ran"):
        parts.append(_engine(f"validated on {runs}; engine ran", True))
    elif engine:
        parts.append(_engine(f"validated on {runs}; engine NOT run: {engine.get('skipped_because')}", False))
    rows = [(esc(r["runner"]), esc(r["against"]), esc(r["output"]), num(r["max_abs_diff"]),
             num(r["reference_max_abs"]), num(r["max_error"]), num(r["tolerance"]["max_error"]),
             num(r["rms_error"]), num(r["tolerance"]["rms_error"]), cosine(r["min_cosine_similarity"]),
             num(r["tolerance"]["cosine"]), verdict(r["passed"]) if r["gated"] else _measured(r["passed"]))
            for r in entry["errors"]]
    parts.append(table(("run", "against", "output", "max |diff|", "max |ref|", "max error", "max error gate",
                        "rms error", "rms error gate", "min cosine", "cosine gate", "gate"), rows,
                       numeric=(3, 4, 5, 6, 7, 8, 9, 10)) if rows else '<p class="muted">not validated</p>')
    if entry["freezing"]:
        rows = [(esc(output), num(f["max_abs_diff_frozen"]), num(f["max_abs_diff_unfrozen"]),
                 cosine(f["cosine_frozen"]), cosine(f["cosine_unfrozen"]), num(f["cosine_gain_from_freezing"]))
                for output, f in entry["freezing"].items()]
        parts += ["<p>Text-branch freezing on / off (same quantization, vs PyTorch fp32):</p>",
                  table(("output", "max |diff| frozen", "max |diff| not frozen", "cosine frozen", "cosine not frozen",
                         "cosine gained by freezing"), rows, numeric=(1, 2, 3, 4, 5))]
    if entry["blocks"]:
        parts.append(page.chart(entry["charts"]["blocks"], f"{component}: error after each block "
                                "(block-wise validation), max |diff| and 1 - cosine, log axes"))
    else:
        parts.append('<p class="muted">Per-block error: not measured (this build has no block-wise validation).</p>')
    return "\n".join(parts)


def _measured(passed: bool) -> str:
    """Comparison-graph rows do not gate: say whether they would have, quietly."""
    return f'<span class="muted">measured ({"within" if passed else "over"} tolerance)</span>'


def _pipeline(page: Page, name: str, check: dict[str, Any] | None) -> str:
    heading = f"{name} / pipeline check"
    if check is None:
        return page.heading(3, heading) + '<p class="muted">not run: the recipe has no pipeline_check.</p>'
    settings = check["settings"] or {}
    engine = check.get("engine") or {}
    ran = f"run on {runner_names(check['runners'])}; " + (
        "engine ran" if engine.get("ran") else f"engine NOT run: {engine.get('skipped_because')}")
    parts = [page.heading(3, heading, verdict(check["passed"])), _engine(ran, bool(engine.get("ran"))),
             f'<p class="muted">{esc(settings.get("height"))}x{esc(settings.get("width"))}, '
             f'{esc(settings.get("num_inference_steps"))} steps, CFG {esc(settings.get("true_cfg_scale"))}, '
             f'seed {esc(settings.get("seed"))}; gates: '
             f'{esc(", ".join(f"{k} {v}" for k, v in (check["thresholds"] or {}).items()))}</p>',
             page.chart(check["charts"]["step_cosine"], "1 - cosine of the latents after each denoising step, per "
                        "prompt and run (log axis; the dashed line is the recipe's gate)")]
    for prompt in check["prompts"]:
        parts.append(_prompt(page, name, check, prompt))
    return "\n".join(parts)


def _prompt(page: Page, name: str, check: dict[str, Any], prompt: dict[str, Any]) -> str:
    reference = check["reference"]
    quoted = " | ".join(prompt["quoted_text"]) or "none"
    rows = [(esc(runner), cosine(run["min_step_cosine"]), "identical" if run["identical"] else num(run["psnr_db"]),
             num(run["ssim"]), num(run["max_pixel_diff"]), verdict(run["passed"]))
            for runner, run in prompt["runs"].items()]
    panels = [page_figure(page, prompt["images"][reference], f"{reference} (reference)")]
    for runner in check["runners"]:
        difference = prompt["differences"][runner]
        panels.append(page_figure(page, prompt["images"][runner], runner))
        caption = f"|difference| x{difference['gain']:.3g} ({grey_levels(difference['max_pixel_diff'])})"
        panels.append(page_figure(page, prompt["images"][f"difference:{runner}"], caption))
    ocr_rows = []
    for run, read in prompt["ocr"].items():
        text = esc(read["text"]) if read["text"] else '<span class="muted">(no text read)</span>'
        ocr_rows.append((esc(run), text, num(read["characters"]), ocr_cell(read, "accuracy_vs_prompt"),
                         ocr_cell(read, "agreement_with_reference") if run != reference else "—"))
    return "\n".join([
        page.heading(4, f"prompt {prompt['index']} ({prompt['language']})", key=f"{name}-prompt-{prompt['index']}"),
        f"<p>{esc(prompt['prompt'])}</p><p class=\"muted\">text the prompt asks to render: {esc(quoted)}</p>",
        table(("run", "worst step cosine", "PSNR dB", "SSIM", "max pixel diff", "gate"), rows, numeric=(1, 2, 3, 4)),
        f'<div class="panels">{"".join(panels)}</div>',
        table(("image", "OCR text (PP-OCRv4)", "characters", "accuracy vs quoted text", "agreement with reference"),
              ocr_rows, numeric=(2, 3, 4)),
    ])


def grey_levels(largest: int) -> str:
    if largest == 0:
        return "identical: no difference"
    return f"max {largest} grey level{'' if largest == 1 else 's'}"


def ocr_cell(read: dict[str, Any], key: str) -> str:
    """An OCR score, or the reason it was not measured ("no text read ..."): never a 0 or 1 for nothing read."""
    value = read.get(key)
    if value is None:
        reason = (read.get("not_measured") or {}).get(key, "not measured")
        return f'<span class="muted">{esc(reason)}</span>'
    return num(value, 3) + (' <span class="muted">(no text read here)</span>' if not read["characters"] else "")


def page_figure(page: Page, path: str, caption: str) -> str:
    return f"<figure>{page.image(path, caption)}<figcaption>{esc(caption)}</figcaption></figure>"
