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
        plan = component.precision
        if plan.quantized:
            check_quantization(path, f"components.{name}.precision.dtype", target.backend, target.gpu, cc,
                               plan.dtype, plan.weight_only)
            if plan.calibration is not None:
                check_calibration_method(path, f"components.{name}.precision.calibration.method", plan.dtype,
                                         plan.weight_only, plan.calibration.method)
        checks = [("high_precision", plan.high_precision)] if plan.quantized else [
            ("dtype", plan.dtype), ("high_precision", plan.high_precision)]
        for key, dtype in checks:
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


# Quantized precisions: which backend/GPU honours which Q/DQ plan, and which calibration each plan takes.

QUANTIZATION_MODES = ("int8", "int8_weight_only", "fp8")
# ModelOpt 0.47's ONNX quantizer: entropy histograms are offered for int8 activations only.
CALIBRATION_METHODS = {"int8": ("max", "entropy"), "fp8": ("max",), "int8_weight_only": ("max",)}


def quantization_mode(dtype: str, weight_only: bool) -> str:
    return "int8_weight_only" if dtype == "int8" and weight_only else dtype


def check_calibration_method(path: Path | str | None, key: str, dtype: str, weight_only: bool, method: str) -> None:
    mode = quantization_mode(dtype, weight_only)
    methods = CALIBRATION_METHODS.get(mode, ())
    if method not in methods:
        raise fail(path, key, f"{method!r} is not offered for {mode}; allowed: {', '.join(methods) or 'none'}")


RTX_INT8_WOQ_CCS = {(8, 6), (8, 9), (12, 0), (12, 1)}  # TensorRT-RTX support matrix, column "INT8 WoQ GEMM"
FP8_MIN_CC = (8, 9)
FP4_MIN_CC = (12, 0)


def _gpus_with(minimum: tuple[int, int], backend: str) -> str:
    names = [g for g, c in GPUS.items() if c >= minimum and c in BACKEND_COMPUTE_CAPABILITIES[backend]]
    return ", ".join(names) or "none known"


def quantization_refusal(backend: str, gpu: str, cc: tuple[int, int], dtype: str, weight_only: bool = False) -> str | None:
    """One line saying why this backend/GPU cannot honour the precision plan and what would, or None if it can.

    Sources: TensorRT-RTX support matrix (INT8 only as "INT8 WoQ GEMM" on 8.6/8.9/12.0; FP8 on 8.9+; FP4 GEMM on
    12.0); TensorRT 10.11/11 "Working with Quantized Types" (INT8, FP8, FP4 quantize weights and activations;
    weight-only quantization is INT4). A W8A8 graph still *builds* for TensorRT-RTX sm86 (probe), which is why an
    undocumented combination is refused here rather than left to the builder.
    """
    if dtype not in ("int8", "fp8", "fp4"):
        return None
    if dtype == "fp4":
        if cc < FP4_MIN_CC:
            here = "fp8" if cc >= FP8_MIN_CC else _int8_here(backend, cc)
            return (f"fp4 needs compute capability 12.0+ and {gpu} is {format_cc(cc)}; use {here} on {gpu}, "
                    f"or fp4-class GPUs ({_gpus_with(FP4_MIN_CC, backend)}) once fp4 is supported")
        return "fp4 (NVFP4) is not produced by ModelOpt 0.47's ONNX quantizer (int8, int4, fp8); use fp8"
    if dtype == "fp8":
        if weight_only:
            return "fp8 weight-only is not produced by ModelOpt 0.47's ONNX quantizer; use fp8 (weights and activations)"
        if cc < FP8_MIN_CC:
            return (f"fp8 needs compute capability 8.9+ and {gpu} is {format_cc(cc)}; use {_int8_here(backend, cc)} on "
                    f"{gpu}, or fp8 on {_gpus_with(FP8_MIN_CC, backend)}")
        return None
    return _int8_refusal(backend, gpu, cc, weight_only)


def _int8_here(backend: str, cc: tuple[int, int]) -> str:
    """The INT8 form this backend honours on this compute capability, else fp16."""
    for weight_only, name in ((False, "int8"), (True, "int8 weight-only")):
        if _int8_refusal(backend, "", cc, weight_only) is None:
            return f"{name} or fp16"
    return "fp16"


def _int8_refusal(backend: str, gpu: str, cc: tuple[int, int], weight_only: bool) -> str | None:
    if backend == "tensorrt-rtx" and not weight_only:
        fp8 = f"fp8 on {gpu}" if cc >= FP8_MIN_CC else f"fp8 on 8.9+ ({_gpus_with(FP8_MIN_CC, backend)})"
        return ("tensorrt-rtx supports INT8 only as weight-only GEMM quantization (support matrix: INT8 WoQ GEMM); "
                f"a W8A8 Q/DQ graph builds but what it runs as is undocumented; use int8 weight-only, {fp8}, "
                "or backend tensorrt for INT8 weights and activations")
    if backend == "tensorrt-rtx" and cc not in RTX_INT8_WOQ_CCS:
        return (f"tensorrt-rtx lists INT8 weight-only GEMM for compute capability "
                f"{', '.join(format_cc(c) for c in sorted(RTX_INT8_WOQ_CCS))}, not {format_cc(cc)} ({gpu}); use fp16"
                + (" or backend tensorrt with int8" if cc >= (7, 5) else ""))
    if backend == "tensorrt" and weight_only:
        return ("TensorRT 11 documents weight-only quantization for INT4 only; INT8 weights without activation Q/DQ "
                "would be dequantized and multiplied in high precision; use int8 (weights and activations) with "
                "backend tensorrt, or backend tensorrt-rtx for int8 weight-only")
    return None


def check_quantization(path: Path | str | None, key: str, backend: str, gpu: str, cc: tuple[int, int],
                       dtype: str, weight_only: bool = False) -> None:
    """Raise the refusal as a ForgeError naming the recipe file and key."""
    reason = quantization_refusal(backend, gpu, cc, dtype, weight_only)
    if reason:
        raise fail(path, key, reason)
