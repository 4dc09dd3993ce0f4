"""The safetensors header, read once for every use: weights in place, the GPU fit check, the checkpoint check.

An 8-byte little-endian length, then that many bytes of JSON; only the first KBs of a shard are read. Stdlib only.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 << 20
METADATA = "__metadata__"


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(header length, header with `__metadata__`); ValueError saying what is wrong (truncated, not safetensors)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{size} bytes, too short for a safetensors file")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise ValueError(f"header length {length} does not fit a {size}-byte file (truncated or not safetensors)")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, ValueError):
            raise ValueError("header is not valid JSON (not a safetensors file)") from None
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    return length, header


def tensors(path: Path) -> dict[str, dict[str, Any]]:
    """{tensor name: {"dtype", "shape", "data_offsets"}} of one shard, metadata left out."""
    return {name: entry for name, entry in read_header(path)[1].items() if name != METADATA}
