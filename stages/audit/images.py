"""Image panels of the audit: split the pipeline check's side-by-side PNGs, amplify differences, embed.

A difference of one or two grey levels (what fp16 does to the tiny model) is invisible at gain 1, so each
difference image is scaled so that its largest difference becomes full brightness; the gain is reported next
to it (and in report.json), so a bright panel with a gain of 255 still reads as "one grey level at most".
"""

from __future__ import annotations

import base64
import io
import numpy as np
from pathlib import Path


def read_png(path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB."""
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def split_panels(side_by_side: np.ndarray, panels: list[str]) -> dict[str, np.ndarray]:
    """The pipeline check's PNG holds one equal-width panel per run, left to right in `panels` order."""
    height, width = side_by_side.shape[:2]
    if not panels or width % len(panels):
        raise ValueError(f"side-by-side image of width {width} cannot hold {len(panels)} equal panels {panels}")
    step = width // len(panels)
    return {name: np.ascontiguousarray(side_by_side[:, i * step:(i + 1) * step]) for i, name in enumerate(panels)}


def amplified_difference(reference: np.ndarray, image: np.ndarray) -> tuple[np.ndarray, float, int]:
    """|reference - image| per channel, scaled so its maximum is 255: (difference image, gain, max difference)."""
    if reference.shape != image.shape:
        raise ValueError(f"difference of images of shapes {reference.shape} and {image.shape}")
    difference = np.abs(reference.astype(np.int16) - image.astype(np.int16))
    largest = int(difference.max())
    gain = 255.0 / max(largest, 1)
    scaled = np.minimum(255, np.round(difference * gain)).astype(np.uint8)
    return scaled, gain, largest


def png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def write_png(image: np.ndarray, path: Path) -> bytes:
    data = png_bytes(image)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return data

