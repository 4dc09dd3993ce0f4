"""The GPUs recipes can target, by compute capability. Stdlib only: recipe checks and backends share it."""

from __future__ import annotations

from collections.abc import Iterable

GPUS: dict[str, tuple[int, int]] = {
    "t4": (7, 5),
    "a100": (8, 0),
    "a10": (8, 6),
    "rtx3090": (8, 6),
    "l4": (8, 9),
    "l40s": (8, 9),
    "rtx4090": (8, 9),
    "h100": (9, 0),
    "rtx5090": (12, 0),
}


# The link a GPU's weights stream over from host memory, and its theoretical bytes/s one way (PCIe x16: 3.0 = 15.75,
# 4.0 = 31.5, 5.0 = 63 GB/s; pinned copies reach ~80% of it): the floor of a streamed engine's cost per call.
HOST_LINKS: dict[str, tuple[str, float]] = {
    "t4": ("PCIe 3.0 x16", 15.75e9),
    "a100": ("PCIe 4.0 x16", 31.5e9),
    "a10": ("PCIe 4.0 x16", 31.5e9),
    "rtx3090": ("PCIe 4.0 x16", 31.5e9),
    "l4": ("PCIe 4.0 x16", 31.5e9),
    "l40s": ("PCIe 4.0 x16", 31.5e9),
    "rtx4090": ("PCIe 4.0 x16", 31.5e9),
    "h100": ("PCIe 5.0 x16", 63e9),
    "rtx5090": ("PCIe 5.0 x16", 63e9),
}


def format_cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def gpus_with(minimum: tuple[int, int], among: Iterable[tuple[int, int]]) -> str:
    """Known GPUs at or above `minimum` whose compute capability is in `among` (a backend's targets)."""
    allowed = set(among)
    names = [gpu for gpu, cc in GPUS.items() if cc >= minimum and cc in allowed]
    return ", ".join(names) or "none known"
