"""The text-fidelity metric on images rendered here: known Chinese and English strings must read back exactly
with the real PP-OCRv4 models (rapidocr-onnxruntime), and blurred or altered text must score lower.

Text is drawn with Noto Sans CJK (Debian's fonts-noto-cjk, which .ci/run installs).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from stages.audit import ocr

FONT_FILE = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
STRINGS = ("Qwen Coffee 通义咖啡", "VISIT THE ALPS", "春风得意", "二〇二五年春")


@pytest.fixture(scope="module")
def font() -> ImageFont.FreeTypeFont:
    assert FONT_FILE.is_file(), f"{FONT_FILE} missing: apt-get install fonts-noto-cjk (see .ci/run)"
    for index in range(10):
        face = ImageFont.truetype(str(FONT_FILE), 48, index=index)
        if face.getname()[0].endswith(" SC"):  # simplified-Chinese glyph forms
            return face
    raise AssertionError(f"{FONT_FILE} has no simplified-Chinese face")


def render(text: str, font: ImageFont.FreeTypeFont, blur: float = 0.0) -> np.ndarray:
    """Black text on a light poster-like background, optionally blurred (what a lossy engine might do)."""
    image = Image.new("RGB", (640, 160), (236, 228, 210))
    ImageDraw.Draw(image).text((24, 44), text, font=font, fill=(20, 20, 30))
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    return np.asarray(image)


def distance(a: str, b: str) -> int:
    """Plain recursive-table Levenshtein, written independently of stages.audit.ocr."""
    table = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            table[i][j] = min(table[i - 1][j] + 1, table[i][j - 1] + 1, table[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
    return table[-1][-1]


def test_quoted_text_in_every_quote_style() -> None:
    prompt = ('a sign "Qwen Coffee 通义咖啡", a scroll “春风得意”, a label 「東京」, 『二〇二五』 '
              "and ‘OK’, empty \"  \"")
    assert ocr.quoted_text(prompt) == ["Qwen Coffee 通义咖啡", "春风得意", "東京", "二〇二五", "OK"]
    assert ocr.quoted_text("一只橘猫坐在窗台上，窗外是下雪的城市夜景。") == []


def test_string_metrics_on_known_values() -> None:
    assert ocr.normalize("VISIT  the-Alps！") == "visitthealps"
    assert ocr.normalize("Ｑｗｅｎ，通义。") == "qwen通义"  # full-width letters fold (NFKC), CJK punctuation drops
    assert ocr.levenshtein("kitten", "sitting") == 3 == distance("kitten", "sitting")
    assert ocr.substring_distance("春风得意", "书法春风得志二〇") == 1
    assert ocr.text_accuracy(["春风得意"], "书法 春风得志") == 0.75
    assert ocr.text_accuracy(["VISIT THE ALPS", "通义"], "visit the alps 通义") == 1.0
    assert ocr.text_accuracy(["ALPS"], "") == 0.0
    assert ocr.text_accuracy([], "anything") is None
    assert ocr.agreement("", "") == 1.0 and ocr.agreement("abc", "") == 0.0
    assert ocr.agreement("Qwen Coffee", "Qwen Cofee") == pytest.approx(1 - 1 / 10)


@pytest.mark.parametrize("text", STRINGS)
def test_rendered_text_reads_back_exactly(text: str, font: ImageFont.FreeTypeFont) -> None:
    reading = ocr.read_text(render(text, font))
    assert ocr.normalize(reading.text) == ocr.normalize(text), reading
    assert ocr.text_accuracy([text], reading.text) == 1.0
    assert all(0.5 <= confidence <= 1 for _, confidence in reading.lines)


def test_blurred_and_altered_text_score_lower(font: ImageFont.FreeTypeFont) -> None:
    for text in ("Qwen Coffee 通义咖啡", "春风得意"):
        clean, blurred = ocr.read_text(render(text, font)), ocr.read_text(render(text, font, blur=4.0))
        assert ocr.text_accuracy([text], blurred.text) < ocr.text_accuracy([text], clean.text) == 1.0
        assert ocr.agreement(clean.text, blurred.text) < 1.0
    altered = ocr.read_text(render("春风得志", font))  # one character of four changed
    assert ocr.text_accuracy(["春风得意"], altered.text) == pytest.approx(0.75)
    altered = ocr.read_text(render("VISIT THE ALPZ", font))
    expected = 1 - distance(ocr.normalize(altered.text), "visitthealps") / len("visitthealps")
    assert ocr.text_accuracy(["VISIT THE ALPS"], altered.text) == pytest.approx(expected)
    assert expected < 1.0


def test_score_prompt_compares_built_with_reference_and_prompt(font: ImageFont.FreeTypeFont, tmp_path: Path) -> None:
    prompt = '书法作品：宣纸上用毛笔写着“春风得意”四个大字'
    images = {"pytorch-fp32": render("春风得意", font), "onnxruntime": render("春风得志", font),
              "tensorrt-engine": render("春风得意", font, blur=5.0)}
    scored = ocr.score_prompt(prompt, images, "pytorch-fp32", cache_dir=tmp_path)
    assert scored["quoted_text"] == ["春风得意"]
    reference, altered, blurred = (scored["runs"][name] for name in images)
    assert reference["accuracy_vs_prompt"] == 1.0 and reference["characters"] == 4
    assert "agreement_with_reference" not in reference
    assert altered["accuracy_vs_prompt"] == pytest.approx(0.75)  # one character of four wrong
    assert altered["agreement_with_reference"] == pytest.approx(0.75)
    assert blurred["accuracy_vs_prompt"] < altered["accuracy_vs_prompt"]
    expected = 1 - distance(ocr.normalize(reference["text"]), ocr.normalize(blurred["text"])) / 4
    assert blurred["agreement_with_reference"] == pytest.approx(expected)
    cached = sorted(tmp_path.glob("*.json"))
    assert len(cached) == 3 and json.loads(cached[0].read_text())["engine"] == ocr.engine_id()
    again = ocr.score_prompt(prompt, images, "pytorch-fp32", cache_dir=tmp_path)
    assert again == scored  # read back from the cache, same figures


def test_score_prompt_measures_nothing_where_no_text_was_read(font: ImageFont.FreeTypeFont, tmp_path: Path) -> None:
    """No accuracy 0 or agreement 1 for blank images: None and the reason. A run that lost the reference's text
    is measured (0), since there the reference shows what should have been read."""
    blank = np.full((160, 640, 3), 200, dtype=np.uint8)
    prompt = 'a sign reading "VISIT THE ALPS"'
    nothing = ocr.score_prompt(prompt, {"pytorch-fp32": blank, "onnxruntime": blank.copy()}, "pytorch-fp32", tmp_path)
    reference, built = nothing["runs"]["pytorch-fp32"], nothing["runs"]["onnxruntime"]
    assert reference["characters"] == built["characters"] == 0
    assert reference["accuracy_vs_prompt"] is None
    assert reference["not_measured"] == {"accuracy_vs_prompt": "no text read"}
    assert built["accuracy_vs_prompt"] is None and built["agreement_with_reference"] is None
    assert built["not_measured"] == {"accuracy_vs_prompt": "no text read in either image",
                                     "agreement_with_reference": "no text read in either image"}
    lost = ocr.score_prompt(prompt, {"pytorch-fp32": render("VISIT THE ALPS", font), "onnxruntime": blank},
                            "pytorch-fp32", tmp_path)["runs"]["onnxruntime"]
    assert lost["accuracy_vs_prompt"] == 0.0 and lost["agreement_with_reference"] == 0.0 and lost["not_measured"] == {}
    unquoted = ocr.score_prompt("a snowy city at night", {"pytorch-fp32": blank, "onnxruntime": blank}, "pytorch-fp32",
                                tmp_path)["runs"]["onnxruntime"]
    assert unquoted["not_measured"]["accuracy_vs_prompt"] == "the prompt quotes no text"


def test_read_text_refuses_what_is_not_an_rgb_image() -> None:
    with pytest.raises(ValueError, match="HxWx3"):
        ocr.read_text(np.zeros((32, 32), dtype=np.uint8))
