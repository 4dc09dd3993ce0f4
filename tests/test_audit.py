"""`doit audit`: two real tiny builds (the session's a10-fp16 and a10-int8, both as shipped, in one store) audited
into report.json and report.html; figures checked against values recomputed here from the manifests and PNGs;
the page opened in real headless Chromium (Debian's package, which ./forge test installs).

Both builds are the recipes as shipped (conftest's `built` and `built_int8`, shared with test_recipes): `recipes=`
names shipped recipes, whose views hold only what their files say; overridden builds have views of their own."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, SMALL_ARGS, SMALL_RECIPE, run_doit

RECIPES = ("a10-fp16", "a10-int8")
NAME = "+".join(RECIPES)
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def audited(built: dict[str, Path], built_int8: tuple) -> dict:
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


def text_of(fragment: str) -> str:
    """What a reader sees of an HTML fragment: tags dropped, entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", fragment)).split())


def section(page: str, anchor: str) -> str:
    """The HTML from the heading with id `anchor` to the next heading."""
    start = page.rindex("<", 0, page.index(f'id="{anchor}"'))
    following = re.search(r"<h[1-6][ >]", page[start + 1:])
    return page[start:start + 1 + following.start()] if following else page[start:]


def rows(fragment: str) -> list[list[str]]:
    """Every table row of a fragment, as the text of its cells."""
    return [[text_of(cell) for cell in re.findall(r"<t[dh][^>]*>(.*?)</t[dh]>", row, re.S)]
            for row in re.findall(r"<tr>(.*?)</tr>", fragment, re.S)]


def y_tick_labels(svg: bytes) -> list[list[str]]:
    """Per y axis of a matplotlib SVG, its tick labels (matplotlib writes each label's text as a comment beside
    the glyph paths); an unlabelled tick contributes nothing."""
    root = ET.fromstring(svg, parser=ET.XMLParser(target=ET.TreeBuilder(insert_comments=True)))
    axes = []
    for axis in root.iter("{http://www.w3.org/2000/svg}g"):
        ticks = [g for g in axis if g.get("id", "").startswith("ytick_")]
        if ticks:
            axes.append([comment.text.strip() for tick in ticks for comment in tick.iter(ET.Comment)])
    return axes


def expected_execution(manifest: dict) -> str:
    """The headline's account of where the numbers came from, rebuilt from the manifest's own records."""
    engines = [entry["validation"]["engine_run"] for entry in manifest["components"].values()]
    engines.append(manifest["pipeline_check"]["engine"])
    assert all(not engine["ran"] for engine in engines) or all(engine["ran"] for engine in engines)
    if engines[0]["ran"]:
        return "engine ran"
    reasons = "; ".join(dict.fromkeys(engine["skipped_because"] for engine in engines))
    target = manifest["target"]
    return (f"on ONNX Runtime — engine NOT run ({reasons}; the engine is built for {target['gpu']}, compute "
            f"capability {target['compute_capability']})")


def edit_distance(a: str, b: str) -> int:
    rows = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return rows[-1][-1]


def test_audit_writes_report_json_html_and_image_files(audited: dict) -> None:
    folder, report = audited["folder"], audited["report"]
    assert report["schema_version"] == 2 and report["name"] == NAME and report["passed"] is True
    assert list(report["recipes"]) == list(RECIPES)
    assert "audit report: " in audited["stderr"] and "report.html" in audited["stderr"]
    for recipe, manifest in audited["manifests"].items():
        assert f"audit: {recipe}: PASSED {expected_execution(manifest)}\n" in audited["stderr"]
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
                assert mine["would_pass_with"] == {"max_error": theirs["max_error"], "rms_error": theirs["rms_error"],
                                                   "cosine": theirs["min_cosine_similarity"]}
                assert mine["tolerance"] == theirs["tolerance"]
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
        for run in ("pytorch-fp32", "onnxruntime"):
            figures = prompt["ocr"][run]
            assert figures["characters"] == len(normalize(texts[run]))
            blank = not normalize(texts[run]) and not normalize(texts["pytorch-fp32"])  # here nor in the reference
            if asked and not blank:
                read = normalize(texts[run])
                wanted = [normalize(a) for a in asked]
                errors = sum(min(edit_distance(w, read[i:j]) for i in range(len(read) + 1)
                                 for j in range(i, len(read) + 1)) for w in wanted)
                assert figures["accuracy_vs_prompt"] == pytest.approx(
                    max(0.0, 1 - errors / sum(len(w) for w in wanted)))
                assert "accuracy_vs_prompt" not in figures["not_measured"]
            else:  # nothing asked, or nothing read in either image: no figure, and the reason
                assert figures["accuracy_vs_prompt"] is None
                assert figures["not_measured"]["accuracy_vs_prompt"] == (
                    "the prompt quotes no text" if not asked else
                    "no text read" if run == "pytorch-fp32" else "no text read in either image")
        a, b = normalize(texts["pytorch-fp32"]), normalize(texts["onnxruntime"])
        built = prompt["ocr"]["onnxruntime"]
        if not (a or b):
            assert built["agreement_with_reference"] is None
            assert built["not_measured"]["agreement_with_reference"] == "no text read in either image"
        else:
            assert built["agreement_with_reference"] == pytest.approx(1 - edit_distance(a, b) / max(len(a), len(b)))
    assert [p["index"] for p in check["prompts"] if p["quoted_text"]] == [0, 1, 3]


CHECK_SCRIPT = """<script>
window.__errors = [];
window.addEventListener('error',
  e => window.__errors.push(String(e.message || (e.target && e.target.alt) || 'error')), true);
window.addEventListener('load', () => {
  const images = [...document.images];
  const out = document.createElement('pre');
  out.id = 'forge-check';
  const verdict = document.querySelector('.verdict');
  const links = [...document.querySelectorAll('nav a')];
  out.textContent = JSON.stringify({images: images.length, errors: window.__errors,
    broken: images.filter(i => !(i.complete && i.naturalWidth > 0 && i.naturalHeight > 0)).map(i => i.alt),
    headline: verdict ? verdict.innerText : null,
    headline_bottom: verdict ? verdict.getBoundingClientRect().bottom : null,
    contents: links.length, dangling: links.filter(a => !document.getElementById(decodeURIComponent(a.hash.slice(1))))
      .map(a => a.getAttribute('href'))});
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
    headline, bottom = check.pop("headline"), check.pop("headline_bottom")
    contents = check.pop("contents")
    assert check == {"images": 2 * 4 * 3 + 3, "errors": [], "broken": [], "dangling": []}
    executions = {expected_execution(manifest) for manifest in audited["manifests"].values()}
    assert len(executions) == 1  # both recipes ran alike here: one sentence
    assert " ".join(headline.split()) == f"PASSED {executions.pop()}"  # as Chromium lays it out
    assert bottom < 400, "the headline is the first thing on the page"
    assert contents == len(re.findall(r"<h[234] id=", page)) > 0
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


def test_headline_and_each_section_say_where_it_ran_and_whether_the_engine_did(audited: dict) -> None:
    """Issue 15: a PASS measured on ONNX Runtime must say so, and that the engine never ran, first thing."""
    page = (audited["folder"] / "report.html").read_text()
    verdict = re.search(r'<p class="verdict pass" id="verdict">(.*?)</p>', page, re.S)
    assert verdict and page.index(verdict.group(0)) < page.index('id="contents"') < page.index('id="across-recipes"')
    executions = {recipe: expected_execution(manifest) for recipe, manifest in audited["manifests"].items()}
    assert text_of(verdict.group(1)) == f"PASSED {executions['a10-fp16']}" == f"PASSED {executions['a10-int8']}"
    for recipe, manifest in audited["manifests"].items():
        figures = audited["report"]["recipes"][recipe]
        assert figures["execution"]["runners"] == ["onnxruntime"]
        head = text_of(section(page, f"recipe-{recipe}"))
        assert head.startswith(f"{recipe} PASS PASSED {executions[recipe]}")
        for component, entry in manifest["components"].items():
            engine = entry["validation"]["engine_run"]
            told = "engine ran" if engine["ran"] else f"engine NOT run: {engine['skipped_because']}"
            assert f"validated on ONNX Runtime; {told}" in text_of(section(page, f"{recipe}-{component}"))
            assert figures["execution"]["engine_not_run"].get(component) == engine["skipped_because"]
        engine = manifest["pipeline_check"]["engine"]
        told = "engine ran" if engine["ran"] else f"engine NOT run: {engine['skipped_because']}"
        assert f"run on ONNX Runtime; {told}" in text_of(section(page, f"{recipe}-pipeline-check"))


def test_ocr_cells_say_no_text_read_where_nothing_was_read(audited: dict) -> None:
    """No accuracy 0 or agreement 1 for images in which OCR read nothing: the cell says "no text read"."""
    page = (audited["folder"] / "report.html").read_text()
    blanks = 0
    for recipe, figures in audited["report"]["recipes"].items():
        check = figures["pipeline_check"]
        for prompt in check["prompts"]:
            table = rows(section(page, f"{recipe}-prompt-{prompt['index']}"))
            ocr_rows = {row[0]: row for row in table if len(row) == 5 and row[0] in prompt["ocr"]}
            reference = prompt["ocr"]["pytorch-fp32"]
            for run, read in prompt["ocr"].items():
                _, text, characters, accuracy, agreement = ocr_rows[run]
                assert characters == str(read["characters"]) and (text == "(no text read)") == (not read["text"])
                blank = not read["characters"] and not reference["characters"]
                if not prompt["quoted_text"]:
                    assert accuracy == "the prompt quotes no text"
                elif blank:
                    assert accuracy == ("no text read" if run == "pytorch-fp32" else "no text read in either image")
                else:
                    assert accuracy.split()[0] == f"{read['accuracy_vs_prompt']:.3g}"
                if run != "pytorch-fp32":
                    blanks += blank
                    assert agreement == ("no text read in either image" if blank
                                         else f"{read['agreement_with_reference']:.3g}")
        row = next(r for r in audited["report"]["cross_recipe"]["pipeline"] if r["recipe"] == recipe)
        images = [read for prompt in check["prompts"] for read in prompt["ocr"].values()]
        assert row["ocr_images"] == len(images)
        assert row["ocr_images_with_text"] == sum(bool(read["characters"]) for read in images)
        cells = next(r for r in rows(section(page, "end-to-end-pipeline-check-and-rendered-text")) if r[0] == recipe)
        for value, cell in ((row["min_ocr_agreement"], cells[7]), (row["min_text_accuracy"], cells[8])):
            if row["ocr_images_with_text"]:
                assert value is not None and cell == f"{value:.3g}"
            else:
                assert value is None and cell == f"no text read (in any of the {len(images)} images)"
    assert blanks > 0, "the tiny random model renders no legible text: some prompt must show the no-text case"


def test_every_chart_has_labelled_y_ticks(audited: dict) -> None:
    """Each chart's every y axis carries at least two tick labels that read as ascending numbers."""
    charts = sorted((audited["folder"] / "charts").glob("*.svg"))
    assert len(charts) == 3
    for chart in charts:
        axes = y_tick_labels(chart.read_bytes())
        assert len(axes) == (3 if chart.name == "cross_recipe.svg" else 1), chart.name
        for labels in axes:
            values = [float(label) for label in labels]
            assert len(values) >= 3 and values == sorted(set(values)), (chart.name, labels)


def test_log_axes_over_a_decade_or_two_still_get_tick_labels() -> None:
    """Narrow log ranges, where matplotlib's own labels thin to one or two (or none): within a decade, a sliver of
    one, a decade and a half; every y axis gets at least three labels."""
    from stages.audit import charts

    components = [{"recipe": recipe, "component": "transformer", "output": "sample", "min_cosine_similarity": 1 - gap,
                   "max_error": share * 0.01, "max_error_gate": 0.01, "rms_error": share * 0.001,
                   "rms_error_gate": 0.01}
                  for recipe, gap, share in (("a", 3e-7, 0.12), ("b", 5e-7, 0.16))]
    pipeline = [{"recipe": "a", "min_step_cosine": 1 - 1.02e-7}, {"recipe": "b", "min_step_cosine": 1 - 1.05e-7}]
    for svg in (charts.cross_recipe_chart(components, pipeline),
                charts.step_cosine_chart([("p", [1 - 3e-8, 1 - 4e-8])], None, "one decade"),
                charts.step_cosine_chart([("p", [1 - 3e-7, 1 - 9e-6])], None, "a decade and a half"),
                charts.blocks_chart([{"block": 0, "max_abs_diff": 0.011, "cosine": 1 - 2e-6, "runner": "onnxruntime"},
                                     {"block": 1, "max_abs_diff": 0.012, "cosine": 1 - 3e-6, "runner": "onnxruntime"}],
                                    "blocks")):
        axes = y_tick_labels(svg)
        assert axes and all(len(labels) >= 3 for labels in axes), axes
        assert all(float(label) > 0 for labels in axes for label in labels)
    assert [charts.tick_label(v) for v in (1e-7, 1.5e-7, 0.05, 1.0, 20.0, 2e5)] == ["1e-7", "1.5e-7", "0.05", "1", "20",
                                                                                   "2e5"]


def test_table_of_contents_links_resolve_to_every_section(audited: dict) -> None:
    page = (audited["folder"] / "report.html").read_text()
    nav = re.search(r'<nav class="contents" id="contents">(.*?)</nav>', page, re.S)
    assert nav
    links = re.findall(r'<a href="#([^"]+)">(.*?)</a>', nav.group(1))
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids)), "ids are unique"
    headings = re.findall(r'<h([234]) id="([^"]+)">(.*?)</h\1>', page, re.S)
    assert [anchor for anchor, _ in links] == [anchor for _, anchor, _ in headings]
    for (anchor, title), (_, _, heading) in zip(links, headings):
        assert anchor in ids and text_of(heading).startswith(text_of(title))
    titles = [text_of(title) for _, title in links]
    for recipe, figures in audited["report"]["recipes"].items():
        assert recipe in titles and f"{recipe} / pipeline check" in titles
        assert all(f"{recipe} / {component}" in titles for component in figures["components"])
        assert titles.count(f"prompt 0 ({figures['pipeline_check']['prompts'][0]['language']})") == len(RECIPES)


def test_difference_captions_count_grey_levels_in_good_grammar(audited: dict) -> None:
    page = (audited["folder"] / "report.html").read_text()
    captions = re.findall(r"<figcaption>\|difference\| x[0-9.]+ \((.*?)\)</figcaption>", page)
    largest = [prompt["differences"]["onnxruntime"]["max_pixel_diff"]
               for figures in audited["report"]["recipes"].values() for prompt in figures["pipeline_check"]["prompts"]]
    assert captions == ["identical: no difference" if n == 0 else f"max {n} grey level{'s' if n != 1 else ''}"
                        for n in largest]
    assert not re.search(r"\b1 grey levels", page)


def _figures(quoted: list[str], reads: dict[str, int], thresholds: dict) -> dict:
    """A recipe's figures as gate() and execution() see them: one prompt, OCR of `reads` characters per run."""
    ocr = {run: {"characters": count, "text": "x" * count, "not_measured": {}} for run, count in reads.items()}
    blank = not reads["pytorch-fp32"] and not reads["onnxruntime"]
    ocr["onnxruntime"].update(agreement_with_reference=None if blank else 0.5,
                              accuracy_vs_prompt=None if blank or not quoted else 0.25)
    if blank:
        ocr["onnxruntime"]["not_measured"] = {"agreement_with_reference": "no text read in either image",
                                              "accuracy_vs_prompt": "no text read in either image"}
    engine = {"ran": False, "skipped_because": "no GPU here"}
    return {"components": {"transformer": {"validation_passed": True, "engine_run": engine,
                                           "errors": [{"runner": "onnxruntime", "gated": True}]}},
            "pipeline_check": {"passed": True, "runners": ["onnxruntime"], "engine": engine,
                               "prompts": [{"index": 0, "quoted_text": quoted, "ocr": ocr}]},
            "audit_thresholds": thresholds, "target": {"gpu": "a10", "compute_capability": "8.6"}}


def test_an_ocr_gate_on_text_never_read_is_not_measured_not_passed() -> None:
    from stages.audit.run import gate

    both = {"min_ocr_agreement": 0.9, "min_text_accuracy": 0.5}
    lines = gate("r", _figures(["SIGN"], {"pytorch-fp32": 0, "onnxruntime": 0}, both))
    assert lines == ["r: prompt 0 onnxruntime: OCR agreement with the reference NOT MEASURED (no text read in either "
                     "image): min_ocr_agreement 0.9 unchecked",
                     "r: prompt 0 onnxruntime: text accuracy vs the prompt's quoted text NOT MEASURED (no text read in "
                     "either image): min_text_accuracy 0.5 unchecked"]
    assert gate("r", _figures(["SIGN"], {"pytorch-fp32": 4, "onnxruntime": 0}, both)) == [
        "r: prompt 0 onnxruntime: OCR agreement with the reference 0.500 < min_ocr_agreement 0.9",
        "r: prompt 0 onnxruntime: text accuracy vs the prompt's quoted text 0.250 < min_text_accuracy 0.5"]
    assert gate("r", _figures(["SIGN"], {"pytorch-fp32": 4, "onnxruntime": 4}, {"min_ocr_agreement": 0.5})) == []
    assert gate("r", _figures([], {"pytorch-fp32": 0, "onnxruntime": 0}, both)) == []  # no text asked, none read
    assert gate("r", _figures(["SIGN"], {"pytorch-fp32": 0, "onnxruntime": 0}, {})) == []  # reported, not gated


def test_execution_summary_says_which_parts_ran_the_engine() -> None:
    from stages.audit.run import execution

    figures = _figures([], {"pytorch-fp32": 0, "onnxruntime": 0}, {})
    summary = execution(figures)
    assert summary == {"runners": ["onnxruntime"], "engine_ran": [],
                       "engine_not_run": {"transformer": "no GPU here", "pipeline_check": "no GPU here"},
                       "summary": "on ONNX Runtime — engine NOT run (no GPU here; the engine is built for a10, "
                                  "compute capability 8.6)"}
    figures["components"]["transformer"]["engine_run"] = {"ran": True}
    figures["components"]["transformer"]["errors"].append({"runner": "tensorrt-engine", "gated": True})
    assert execution(figures)["summary"] == (
        "on ONNX Runtime and the TensorRT engine — engine ran for transformer but NOT for pipeline_check (no GPU "
        "here; the engine is built for a10, compute capability 8.6)")
    figures["pipeline_check"]["engine"] = {"ran": True}
    assert execution(figures)["engine_not_run"] == {} and "engine ran (" in execution(figures)["summary"]


def test_recipe_thresholds_gate_the_audit(audited: dict) -> None:
    """`audit.min_text_accuracy` and `min_ocr_agreement`: where OCR reads no text in either image (the tiny model
    renders none) on a prompt that quotes text, the gates are NOT MEASURED, which fails the audit rather than
    passing a gate nobody checked; the prompt that quotes no text is not gated. The report says why."""
    artifacts, db = audited["artifacts"], audited["db"]
    result = run_doit(["audit", "recipes=a10-fp16", "audit.min_text_accuracy=0.5", "audit.min_ocr_agreement=0.9"],
                      artifacts, db, check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    folder = (REPO / re.search(r"^audit report: (\S+)", result.stderr, re.M).group(1)).parent  # its view's name
    report = json.loads((folder / "report.json").read_text())
    (name, figures), = report["recipes"].items()
    assert name.startswith("a10-fp16") and folder.name == name
    unread = [(prompt["index"], key) for prompt in figures["pipeline_check"]["prompts"] if prompt["quoted_text"]
              for key in ("agreement_with_reference", "accuracy_vs_prompt")
              if prompt["ocr"]["onnxruntime"][key] is None]
    assert unread and report["passed"] is False and figures["passed"] is False
    assert len(report["failures"]) == len(unread)
    assert all("NOT MEASURED (no text read in either image)" in line and line.endswith(" unchecked")
               for line in report["failures"])
    assert (f"audit FAILED: {name}: prompt 0 onnxruntime: OCR agreement with the reference NOT MEASURED (no text "
            f"read in either image): min_ocr_agreement 0.9 unchecked (+{len(unread) - 1} more); see ") in (
        result.stdout + result.stderr)  # doit: stdout
    assert f"audit: {name}: FAILED on ONNX Runtime" in result.stderr
    assert figures["audit_thresholds"] == {"min_ocr_agreement": 0.9, "min_text_accuracy": 0.5}
    page = (folder / "report.html").read_text()
    assert text_of(re.search(r'<p class="verdict fail" id="verdict">(.*?)</p>', page, re.S).group(1)).startswith(
        "FAILED on ONNX Runtime — engine")
    assert "min_text_accuracy 0.5 unchecked" in page and " 0.000 " not in text_of(page)
    bad = run_doit(["audit", "recipes=a10-fp16", "audit.min_ocr_agreement=1.5"], artifacts, db, check=False)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "audit.min_ocr_agreement: Input should be less than or equal to 1" in bad.stderr


@pytest.mark.parametrize("value, message", [
    ("nope", "recipes=: no recipe named 'nope'; allowed: comma-separated recipe names (a10-fp16, a10-fp16-lightning, "),
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
    for component in ("transformer", "vae_decoder"):
        axes = y_tick_labels((root / "audit" / "a10-fp16" / components[component]["charts"]["blocks"]).read_bytes())
        assert len(axes) == 2 and all(len(labels) >= 3 for labels in axes), axes
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
