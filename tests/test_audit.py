"""`doit audit`: two real tiny builds (a10-fp16 and the LIGHT a10-int8 of test_recipes, one shared store) audited
into report.json and report.html; figures checked against values recomputed here from the manifests and PNGs;
the page opened in real headless Chromium (Debian's package, which .ci/run installs)."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import SMALL_ARGS, SMALL_RECIPE, run_doit

RECIPES = ("a10-fp16", "a10-int8")
NAME = "+".join(RECIPES)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def audited(built: dict[str, Path], light_builds) -> dict:
    light_builds("a10-int8")
    artifacts, db = built["artifacts"], built["db"]
    result = run_doit(["audit", f"recipes={','.join(RECIPES)}"], artifacts, db)
    folder = artifacts / "audit" / NAME
    return {"artifacts": artifacts, "db": db, "folder": folder, "stderr": result.stderr,
            "report": json.loads((folder / "report.json").read_text()),
            "manifests": {r: json.loads((artifacts / r / "manifest.json").read_text()) for r in RECIPES}}


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def normalize(text: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKC", text).casefold() if c.isalnum())


def edit_distance(a: str, b: str) -> int:
    rows = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return rows[-1][-1]


def test_audit_writes_report_json_html_and_image_files(audited: dict) -> None:
    folder, report = audited["folder"], audited["report"]
    assert report["schema_version"] == 1 and report["name"] == NAME and report["passed"] is True
    assert list(report["recipes"]) == list(RECIPES)
    assert "audit report: " in audited["stderr"] and "report.html" in audited["stderr"]
    named = [path for figures in report["recipes"].values() for prompt in figures["pipeline_check"]["prompts"]
             for path in prompt["images"].values()]
    named += [path for figures in report["recipes"].values() for path in figures["pipeline_check"]["charts"].values()]
    named += list(report["cross_recipe"]["charts"].values())
    assert len(named) == 2 * 4 * 3 + 3  # per recipe 4 prompts x (reference, built, difference), 2 curves, 1 chart
    for path in named:
        assert (folder / path).is_file() and (folder / path).stat().st_size > 0, path
    scratch = audited["artifacts"] / "audit" / ".tmp"
    assert not scratch.exists() or not any(scratch.iterdir())


def test_component_errors_and_identity_come_from_the_manifests(audited: dict) -> None:
    report = audited["report"]
    for recipe, manifest in audited["manifests"].items():
        figures = report["recipes"][recipe]
        assert figures["versions"] == manifest["versions"] and figures["manifest_key"] == manifest["build"]["key"]
        assert figures["model"]["warning"] == manifest["model"]["warning"] and "TINY" in figures["model"]["warning"]
        assert figures["recipe"]["overrides"] == manifest["recipe"]["overrides"]
        for component, entry in manifest["components"].items():
            validation = entry["validation"]
            rows = validation["metrics"] + validation["measured_against_comparison_graphs"]
            errors = figures["components"][component]["errors"]
            assert [(r["runner"], r["against"], r["output"]) for r in errors] == [
                (r["runner"], r["against"], r["output"]) for r in rows]
            for mine, theirs in zip(errors, rows):
                assert mine["max_abs_diff"] == theirs["max_abs_diff"]
                assert mine["min_cosine_similarity"] == theirs["min_cosine_similarity"]
                assert mine["would_pass_with"] == {"atol": theirs["max_abs_diff"], "cosine": theirs["min_cosine_similarity"]}
                assert mine["tolerance"]["atol"] == theirs["tolerance"]["atol"]
            assert figures["components"][component]["blocks_status"] == "not measured"
            assert figures["components"][component]["freezing"] == validation["freezing_effect"]
    int8 = report["recipes"]["a10-int8"]["components"]["transformer"]
    against = {(r["runner"], r["against"]) for r in int8["errors"]}
    assert {("onnxruntime:fp16_graph", "pytorch-fp32"), ("onnxruntime", "onnxruntime:fp16_graph")} <= against
    gated = next(r for r in int8["errors"] if r["runner"] == "onnxruntime" and r["against"] == "pytorch-fp32")
    assert int8["freezing"]["sample"]["cosine_frozen"] == gated["min_cosine_similarity"]
    rows = {(r["recipe"], r["component"]): r for r in report["cross_recipe"]["components"]}
    assert len(rows) == 6 and rows[("a10-int8", "transformer")]["vs_fp16_graph"] is not None
    assert rows[("a10-fp16", "transformer")]["vs_fp16_graph"] is None


def test_pipeline_figures_recomputed_from_pngs_and_steps(audited: dict) -> None:
    from skimage.metrics import structural_similarity

    folder, report = audited["folder"], audited["report"]
    for recipe, manifest in audited["manifests"].items():
        check = report["recipes"][recipe]["pipeline_check"]
        view = audited["artifacts"] / recipe
        worst = 1.0
        for prompt, listed in zip(check["prompts"], manifest["pipeline_check"]["prompts"]):
            run = prompt["runs"]["onnxruntime"]
            assert run["step_cosine"] == listed["runs"]["onnxruntime"]["step_cosine"]
            assert run["min_step_cosine"] == min(run["step_cosine"])
            worst = min(worst, run["min_step_cosine"])
            side_by_side = png(view / "pipeline_check" / f"{prompt['index']}.png")
            width = side_by_side.shape[1] // 2
            reference, built = side_by_side[:, :width], side_by_side[:, width:]
            assert np.array_equal(png(folder / prompt["images"]["pytorch-fp32"]), reference)
            assert np.array_equal(png(folder / prompt["images"]["onnxruntime"]), built)
            error = np.mean((reference.astype(np.float64) - built.astype(np.float64)) ** 2)
            assert run["psnr_db"] == pytest.approx(10 * np.log10(255 ** 2 / error), abs=1e-9)
            assert run["ssim"] == pytest.approx(structural_similarity(reference, built, channel_axis=-1, data_range=255))
            difference = np.abs(reference.astype(int) - built.astype(int))
            assert prompt["differences"]["onnxruntime"]["max_pixel_diff"] == difference.max() == run["max_pixel_diff"]
            amplified = np.minimum(255, np.round(difference * (255 / difference.max()))).astype(np.uint8)
            assert np.array_equal(png(folder / prompt["images"]["difference:onnxruntime"]), amplified)
        row = next(r for r in report["cross_recipe"]["pipeline"] if r["recipe"] == recipe)
        assert row["min_step_cosine"] == worst
        assert row["steps"] == len(check["prompts"][0]["runs"]["onnxruntime"]["step_cosine"])


def test_ocr_figures_match_an_independent_reading(audited: dict) -> None:
    """RapidOCR run here on the audit's image files; accuracy and agreement recomputed from the texts."""
    from rapidocr_onnxruntime import RapidOCR

    engine = RapidOCR()
    quote = re.compile(r'"([^"]+)"|“([^”]+)”|「([^」]+)」|『([^』]+)』|‘([^’]+)’')
    check = audited["report"]["recipes"]["a10-int8"]["pipeline_check"]
    for prompt in check["prompts"]:
        asked = [next(g for g in m.groups() if g) for m in quote.finditer(prompt["prompt"])]
        assert prompt["quoted_text"] == asked
        texts = {}
        for run in ("pytorch-fp32", "onnxruntime"):
            found, _ = engine(png(audited["folder"] / prompt["images"][run])[:, :, ::-1].copy())
            texts[run] = " ".join(line[1] for line in found or [])
            assert prompt["ocr"][run]["text"] == texts[run]
            if asked:
                read = normalize(texts[run])
                wanted = [normalize(a) for a in asked]
                errors = sum(min(edit_distance(w, read[i:j]) for i in range(len(read) + 1)
                                 for j in range(i, len(read) + 1)) for w in wanted)
                assert prompt["ocr"][run]["accuracy_vs_prompt"] == pytest.approx(
                    max(0.0, 1 - errors / sum(len(w) for w in wanted)))
            else:
                assert prompt["ocr"][run]["accuracy_vs_prompt"] is None
        a, b = normalize(texts["pytorch-fp32"]), normalize(texts["onnxruntime"])
        expected = 1.0 if not (a or b) else 1 - edit_distance(a, b) / max(len(a), len(b))
        assert prompt["ocr"]["onnxruntime"]["agreement_with_reference"] == pytest.approx(expected)
    assert [p["index"] for p in check["prompts"] if p["quoted_text"]] == [0, 1, 3]


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error',
  e => window.__errors.push(String(e.message || (e.target && e.target.alt) || 'error')), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const out = document.createElement('pre');
  out.id = 'forge-check';
  out.textContent = JSON.stringify({images: images.length, errors: window.__errors,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt)});
  document.body.appendChild(out);
});
</script>"""


def chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium not found: apt-get install chromium (see .ci/run)"
    return subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", *args],
                          capture_output=True, text=True, timeout=180)


def test_report_opens_offline_in_chromium(audited: dict, tmp_path: Path) -> None:
    """The page alone (no files beside it) in headless Chromium: every image decodes, no console message or
    load error; then a screenshot of the real report."""
    page = (audited["folder"] / "report.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:|images/|charts/)""", page), "external resource"
    alone = tmp_path / "alone" / "report.html"
    alone.parent.mkdir()
    alone.write_text(page.replace("<head>", "<head>" + CHECK_SCRIPT, 1))
    result = chromium(["--virtual-time-budget=20000", "--dump-dom", alone.as_uri()], tmp_path)
    found = re.search(r'<pre id="forge-check">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-3000:]
    check = json.loads(html.unescape(found.group(1)))
    assert check == {"images": 2 * 4 * 3 + 3, "errors": [], "broken": []}
    console = [line for line in result.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    dom = result.stdout
    assert "Accuracy audit: a10-fp16 + a10-int8" in dom and "TINY RANDOM-WEIGHT MODEL" in dom
    assert dom.count("Per-block error: not measured") == 6 and "Text-branch freezing on / off" in dom

    screenshot = tmp_path / "report.png"
    shot = chromium(["--window-size=1300,3000", f"--screenshot={screenshot}", (audited["folder"] / "report.html").as_uri()],
                    tmp_path)
    assert screenshot.is_file(), shot.stderr[-3000:]
    pixels = png(screenshot)
    assert pixels.shape[:2] == (3000, 1300) and pixels.std() > 20  # not a blank page
    print(f"screenshot: {screenshot}")


def test_recipe_thresholds_gate_the_audit(audited: dict) -> None:
    """`audit.min_text_accuracy`: the tiny model renders no legible text, so every prompt that quotes text fails;
    the report is still written and says why. OCR agreement (no text in either image) passes."""
    artifacts, db = audited["artifacts"], audited["db"]
    result = run_doit(["audit", "recipes=a10-fp16", "audit.min_text_accuracy=0.5", "audit.min_ocr_agreement=0.9"],
                      artifacts, db, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert ("audit FAILED: a10-fp16: prompt 0 onnxruntime: text accuracy vs the prompt's quoted text 0.000 < "
            "min_text_accuracy 0.5 (+2 more); see ") in result.stdout + result.stderr  # doit: stdout
    assert "audit: a10-fp16: FAILED" in result.stderr
    report = json.loads((artifacts / "audit" / "a10-fp16" / "report.json").read_text())
    figures = report["recipes"]["a10-fp16"]
    assert report["passed"] is False and figures["passed"] is False and len(report["failures"]) == 3
    assert figures["audit_thresholds"] == {"min_ocr_agreement": 0.9, "min_text_accuracy": 0.5}
    assert not [line for line in report["failures"] if "agreement" in line]
    page = (artifacts / "audit" / "a10-fp16" / "report.html").read_text()
    assert "FAILED" in page and "min_text_accuracy 0.5" in page
    bad = run_doit(["audit", "recipes=a10-fp16", "audit.min_ocr_agreement=1.5"], artifacts, db, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "audit.min_ocr_agreement: Input should be less than or equal to 1" in bad.stderr


@pytest.mark.parametrize("value, message", [
    ("nope", "recipes=: no recipe named 'nope'; allowed: comma-separated recipe names (a10-fp16, a10-int8, "),
    ("", "recipes=: is empty; allowed: comma-separated recipe names"),
    ("a10-fp16,,a10-int8", "recipes=: has an empty name in 'a10-fp16,,a10-int8'; allowed:"),
    ("missing.yaml", "recipes=: recipe file 'missing.yaml' not found; allowed:"),
])
def test_bad_recipes_are_one_line_and_write_nothing(value: str, message: str, tmp_path: Path) -> None:
    artifacts = tmp_path / "artifacts"
    result = run_doit(["audit", f"recipes={value}"], artifacts, tmp_path / "doit.db", check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), lines
    assert not artifacts.exists()


def test_audit_builds_what_is_missing_and_says_what_was_not_measured(small: dict, tmp_path: Path) -> None:
    """A recipe file never built in this root: the audit builds it (every stage reused from the same store),
    then reports it; no pipeline check, no block-wise validation: both say so."""
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    shutil.copytree(small["artifacts"], artifacts, symlinks=True)
    recipe = tmp_path / "transformer-copy.yaml"
    recipe.write_text(SMALL_RECIPE.read_text())
    result = run_doit(["audit", f"recipes={recipe}", *SMALL_ARGS[2:]], artifacts, db)
    assert "has no build in" in result.stderr and "reused export:transformer-copy-" in result.stderr
    assert "built export:" not in result.stderr
    folders = [p for p in (artifacts / "audit").iterdir() if not p.name.startswith(".")]
    assert len(folders) == 1 and folders[0].name.startswith("transformer-copy-")
    report = json.loads((folders[0] / "report.json").read_text())
    figures = report["recipes"][folders[0].name]
    assert figures["built_by_audit"] is True and figures["pipeline_check"] is None
    assert list(figures["components"]) == ["transformer"] and report["cross_recipe"]["pipeline"] == []
    page = (folders[0] / "report.html").read_text()
    assert "not run: the recipe has no pipeline_check." in page and "Per-block error: not measured" in page


def test_per_block_error_chart_when_blockwise_validation_exists(built: dict[str, Path], tmp_path: Path) -> None:
    """Block-wise validation is another issue's work: its documented shape (BLOCK_ROW in stages.audit) is put
    into a copy of the a10-fp16 view, once in the manifest and once in a validate record, and charted."""
    from stages.audit import AuditRequest
    from stages.audit.run import Audit
    from stages.errors import ForgeError

    view, root = built["recipe"], tmp_path / "artifacts"
    copy = root / "a10-fp16"
    shutil.copytree(view / "pipeline_check", copy / "pipeline_check")  # follows the link: real files
    for component in ("text_encoder", "transformer", "vae_decoder"):
        (copy / component / "validate").mkdir(parents=True)
        shutil.copy(view / component / "validate" / "record.json", copy / component / "validate")
    manifest = json.loads((view / "manifest.json").read_text())
    blocks = [{"block": 0, "max_abs_diff": 0.001, "cosine": 1 - 1e-6, "text_max_abs_diff": 0.0005, "text_cosine": 1 - 2e-7},
              {"block": 1, "max_abs_diff": 0.002, "cosine": 1 - 2e-6, "text_max_abs_diff": None, "text_cosine": None}]
    manifest["components"]["transformer"]["validation"]["blocks"] = blocks
    (copy / "manifest.json").write_text(json.dumps(manifest))
    record_file = copy / "vae_decoder" / "validate" / "record.json"
    record = json.loads(record_file.read_text())
    record["report"]["blocks"] = [{"block": name, "max_abs_diff": 0.002, "cosine": 0.99999, "runner": runner}
                                  for runner in ("onnxruntime", "tensorrt-engine") for name in ("mid", "up.0", "up.1")]
    record_file.write_text(json.dumps(record))
    request = AuditRequest(("a10-fp16",), ("a10-fp16",), (), None, root, {"a10-fp16": {}})
    report = Audit(request)()
    components = report["recipes"]["a10-fp16"]["components"]
    assert components["transformer"]["blocks"] == [{**row, "runner": "onnxruntime"} for row in blocks]
    assert len(components["vae_decoder"]["blocks"]) == 6 and components["text_encoder"]["blocks"] is None
    assert [components[c]["blocks_status"] for c in ("text_encoder", "transformer", "vae_decoder")] == [
        "not measured", "measured", "measured"]
    chart = root / "audit" / "a10-fp16" / components["transformer"]["charts"]["blocks"]
    assert chart.read_bytes().startswith(b"<?xml") and b"<svg" in chart.read_bytes()
    page = (root / "audit" / "a10-fp16" / "report.html").read_text()
    assert page.count('data-file="charts/a10-fp16_') == 3 and page.count("Per-block error: not measured") == 1

    record["report"]["blocks"] = [{"block": "mid", "cosine": 0.9}]
    record_file.write_text(json.dumps(record))
    with pytest.raises(ForgeError, match=r"vae_decoder/validate/record.json: blocks: row 0 lacks max_abs_diff/cosine"):
        Audit(request)()


def test_the_audit_task_graph_imports_nothing_heavy() -> None:
    from tests.conftest import modules_loaded_by_doit

    heavy, output = modules_loaded_by_doit(["list", "recipes=a10-fp16,a10-int8", "audit.min_ocr_agreement=0.5"], (
        "numpy", "matplotlib", "PIL", "cv2", "rapidocr_onnxruntime", "onnxruntime", "torch"))
    assert heavy == [], heavy
    assert re.search(r"^audit\s+Audit `recipes=a,b`", output, re.M), output
