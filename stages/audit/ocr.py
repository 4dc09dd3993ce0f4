"""Text-rendering fidelity: read rendered text back with OCR and score it by characters.

Qwen-Image is used for its text rendering (Chinese and English signs, posters, calligraphy), and that is what
quantization is reported to damage first (FP8 blurring long Chinese text). Latent cosines and PSNR do not say
whether a sign is still legible, so the audit reads both images of every pipeline-check prompt with
PP-OCRv4 (rapidocr-onnxruntime 1.4.4: Chinese/English detection and recognition models inside its wheel, run on
ONNX Runtime, offline) and scores:

* accuracy against the prompt: for each quoted segment (``"..."``, ``“...”``, ``「...」``, ``『...』``, ``‘...’``)
  the edit distance to its best-matching stretch of the text read, ``1 - sum(distance) / sum(length)``
  (at least 0). Other text in the image costs nothing; a missing, wrong or extra character inside the
  segment costs one each;
* agreement between two images: ``1 - levenshtein(a, b) / max(len(a), len(b))`` of everything read in each.

A score needs text to score: `score_prompt` records ``None`` and a reason in ``not_measured`` where OCR read
nothing in either image of a comparison (the reference and the run), instead of the accuracy 0 or agreement 1
the string metrics give for empty text. A model that renders no legible text (the tiny random-weight one)
says nothing about whether a build damaged text, and must not read as a measured 0 or a measured match.
Where the reference holds text and a run holds none, 0 is measured (the build lost the text).

Text is compared after NFKC normalisation and case folding, keeping letters and digits only (CJK characters
are letters): OCR does not reliably see spaces or punctuation, and a sign does not become less legible when
the recogniser drops a space. Everything here but `read_text` is pure Python.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import language

OCR_PACKAGE = "rapidocr-onnxruntime"
NO_QUOTED_TEXT = "the prompt quotes no text"
NO_TEXT_READ = "no text read"
NO_TEXT_IN_EITHER = "no text read in either image"


def quoted_text(prompt: str) -> list[str]:
    """The segments a prompt asks to render, in order; segments with no letter or digit are dropped."""
    return [segment for segment in language.quoted_text(prompt) if normalize(segment)]


def normalize(text: str) -> str:
    """NFKC, case-folded, letters and digits only: what a reader of the sign would compare."""
    return "".join(ch for ch in unicodedata.normalize("NFKC", text).casefold() if ch.isalnum())


def levenshtein(a: str, b: str) -> int:
    """Insertions, deletions and substitutions, one each."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def substring_distance(pattern: str, text: str) -> int:
    """Edit distance from `pattern` to its best-matching stretch of `text` (free text before and after it)."""
    previous = [0] * (len(text) + 1)
    for i, cp in enumerate(pattern, 1):
        current = [i]
        for j, ct in enumerate(text, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (cp != ct)))
        previous = current
    return min(previous)


def text_accuracy(segments: list[str], read: str) -> float | None:
    """Character accuracy of the quoted segments found in the text read; None when nothing was asked for."""
    wanted = [normalize(segment) for segment in segments]
    wanted = [segment for segment in wanted if segment]
    if not wanted:
        return None
    found = normalize(read)
    errors = sum(substring_distance(segment, found) for segment in wanted)
    return max(0.0, 1.0 - errors / sum(len(segment) for segment in wanted))


def agreement(a: str, b: str) -> float:
    """Character agreement of two texts read; 1.0 when both are empty (no text in either)."""
    a, b = normalize(a), normalize(b)
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else 1.0 - levenshtein(a, b) / longest


@dataclass(frozen=True)
class Reading:
    """What OCR read in one image: lines top to bottom with their recognition confidence."""

    lines: tuple[tuple[str, float], ...]

    @property
    def text(self) -> str:
        return " ".join(line for line, _ in self.lines)

    def as_json(self) -> dict[str, Any]:
        return {"text": self.text, "lines": [{"text": t, "confidence": c} for t, c in self.lines]}


@functools.lru_cache(maxsize=1)
def _engine() -> Any:
    """One RapidOCR per process: loading the three ONNX models takes about a second."""
    import logging

    from rapidocr_onnxruntime import RapidOCR

    logging.getLogger("RapidOCR").setLevel(logging.WARNING)
    return RapidOCR()


_LOCK = threading.Lock()


def engine_id() -> str:
    """The OCR engine by package version: cached readings are reused only by the same engine."""
    from importlib.metadata import version

    return f"{OCR_PACKAGE}=={version(OCR_PACKAGE)}"


def read_text(image: Any, cache_dir: Path | None = None) -> Reading:
    """OCR one uint8 HxWx3 RGB image. With `cache_dir`, readings are kept by the pixels' digest and the engine
    version, so re-running an audit does not re-read unchanged images."""
    import numpy as np

    array = np.ascontiguousarray(np.asarray(image, dtype=np.uint8))
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"read_text: needs an HxWx3 uint8 RGB image, got shape {array.shape}")
    cached = None
    if cache_dir is not None:
        digest = hashlib.sha256(repr(array.shape).encode() + array.tobytes() + engine_id().encode()).hexdigest()
        cached = cache_dir / f"{digest}.json"
        try:
            return Reading(tuple((t, c) for t, c in json.loads(cached.read_text())["lines"]))
        except (OSError, ValueError, KeyError, TypeError):
            pass
    with _LOCK:
        result, _ = _engine()(np.ascontiguousarray(array[:, :, ::-1]))  # RapidOCR takes arrays as BGR
    reading = Reading(tuple((str(text), round(float(score), 4)) for _, text, score in (result or [])))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temporary = cached.with_suffix(f".{threading.get_ident()}.tmp")
        temporary.write_text(json.dumps({"engine": engine_id(), "lines": reading.lines}, ensure_ascii=False))
        temporary.replace(cached)
    return reading


def score_prompt(prompt: str, images: dict[str, Any], reference: str,
                 cache_dir: Path | None = None) -> dict[str, Any]:
    """OCR every image of one prompt: text read, accuracy against the quoted text, agreement with `reference`.

    `images` maps a run name (the reference first, then each graph run) to its uint8 RGB image. A figure that
    cannot be measured is None, with its reason under ``not_measured`` (NO_QUOTED_TEXT, NO_TEXT_READ for the
    reference, NO_TEXT_IN_EITHER for a run), so neither the page nor a gate can take it for a measurement.
    """
    segments = quoted_text(prompt)
    readings = {name: read_text(image, cache_dir) for name, image in images.items()}
    counts = {name: len(normalize(reading.text)) for name, reading in readings.items()}
    runs = {}
    for name, reading in readings.items():
        blank = counts[name] == 0 and counts[reference] == 0
        empty = NO_TEXT_READ if name == reference else NO_TEXT_IN_EITHER
        missing: dict[str, str] = {}
        accuracy = None
        if not segments:
            missing["accuracy_vs_prompt"] = NO_QUOTED_TEXT
        elif blank:
            missing["accuracy_vs_prompt"] = empty
        else:
            accuracy = text_accuracy(segments, reading.text)
        runs[name] = {**reading.as_json(), "characters": counts[name], "accuracy_vs_prompt": accuracy}
        if name != reference:
            runs[name]["agreement_with_reference"] = None if blank else agreement(readings[reference].text,
                                                                                    reading.text)
            if blank:
                missing["agreement_with_reference"] = NO_TEXT_IN_EITHER
        runs[name]["not_measured"] = missing
    return {"quoted_text": segments, "runs": runs}
