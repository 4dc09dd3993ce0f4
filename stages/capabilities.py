"""What each GPU and backend can honour, checked before any work so no engine silently runs slower or wronger.

Sources: TensorRT-RTX builds for compute capabilities 7.5/8.0/8.6/8.9/12.0 (not 9.0); bf16 needs Ampere (8.0+);
FP8 needs 8.9+; FP4 needs 12.0+.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING

from stages.errors import fail

if TYPE_CHECKING:
    from stages.recipe import Recipe

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

BACKEND_COMPUTE_CAPABILITIES: dict[str, set[tuple[int, int]]] = {
    "tensorrt-rtx": {(7, 5), (8, 0), (8, 6), (8, 9), (12, 0)},
    "tensorrt": {(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)},
}

BACKEND_MODULES = {"tensorrt-rtx": "tensorrt_rtx", "tensorrt": "tensorrt"}

PRECISION_MIN_CC: dict[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (0, 0),
    "bf16": (8, 0),
    "fp8": (8, 9),
    "fp4": (12, 0),
}


def format_cc(cc: tuple[int, int]) -> str:
    return f"{cc[0]}.{cc[1]}"


def precisions_for(cc: tuple[int, int]) -> list[str]:
    return [name for name, minimum in PRECISION_MIN_CC.items() if cc >= minimum]


def check_recipe(path: Path, recipe: Recipe) -> None:
    """Refuse a target/backend/precision combination the hardware or TensorRT flavour cannot honour."""
    target = recipe.target
    cc = target.compute_capability
    supported = BACKEND_COMPUTE_CAPABILITIES[target.backend]
    if cc not in supported:
        other = [b for b, ccs in BACKEND_COMPUTE_CAPABILITIES.items() if cc in ccs]
        raise fail(
            path,
            "target.backend",
            f"{target.backend} cannot build for {target.gpu} (compute capability {format_cc(cc)}); "
            f"it supports {', '.join(format_cc(c) for c in sorted(supported))}"
            + (f"; use backend {' or '.join(other)}" if other else ""),
        )
    module = BACKEND_MODULES[target.backend]
    if importlib.util.find_spec(module) is None:
        raise fail(path, "target.backend", f"{target.backend} needs the Python package `{module}`, which is not installed")
    allowed = precisions_for(cc)
    for name, component in recipe.components.items():
        for key, dtype in (("dtype", component.precision.dtype), ("high_precision", component.precision.high_precision)):
            if dtype not in allowed:
                raise fail(
                    path,
                    f"components.{name}.precision.{key}",
                    f"{dtype} is not supported by {target.gpu} (compute capability {format_cc(cc)}); "
                    f"allowed: {', '.join(allowed)}",
                )


def activate_backend(backend: str) -> None:
    """Polygraphy picks tensorrt vs tensorrt_rtx once, when its TensorRT loaders are first imported."""
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1" if backend == "tensorrt-rtx" else "0"
