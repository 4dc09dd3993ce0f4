"""What each GPU and backend can honour, checked before any work so no engine silently runs slower or wronger.

Sources: bf16 needs Ampere (8.0+); FP8 needs 8.9+; FP4 needs 12.0+; each backend module (stages/targets/backends/)
states its own compute capabilities and INT8 rule.
"""

from __future__ import annotations

from pathlib import Path

from stages.errors import fail
from stages.targets.backends import BACKENDS
from stages.targets.gpus import GPUS, format_cc, gpus_with

__all__ = ["GPUS", "format_cc"]

PRECISION_MIN_CC: dict[str, tuple[int, int]] = {
    "fp32": (0, 0),
    "fp16": (0, 0),
    "bf16": (8, 0),
    "fp8": (8, 9),
    "fp4": (12, 0),
}
FP8_MIN_CC = PRECISION_MIN_CC["fp8"]
FP4_MIN_CC = PRECISION_MIN_CC["fp4"]

QUANTIZATION_MODES = ("int8", "int8_weight_only", "fp8")
# ModelOpt 0.47's ONNX quantizer: entropy histograms are offered for int8 activations only.
CALIBRATION_METHODS = {"int8": ("max", "entropy"), "fp8": ("max",), "int8_weight_only": ("max",)}


def precisions_for(cc: tuple[int, int]) -> list[str]:
    return [name for name, minimum in PRECISION_MIN_CC.items() if cc >= minimum]


def quantization_mode(dtype: str, weight_only: bool) -> str:
    return "int8_weight_only" if dtype == "int8" and weight_only else dtype


def check_calibration_method(path: Path | str | None, key: str, dtype: str, weight_only: bool, method: str) -> None:
    mode = quantization_mode(dtype, weight_only)
    methods = CALIBRATION_METHODS.get(mode, ())
    if method not in methods:
        raise fail(path, key, f"{method!r} is not offered for {mode}; allowed: {', '.join(methods) or 'none'}")


def backend_refusal(backend: str, gpu: str, cc: tuple[int, int]) -> str | None:
    """Why this backend cannot build for this GPU (or is not installed), naming what would; None if it can."""
    spec = BACKENDS[backend]
    if cc not in spec.compute_capabilities:
        other = [name for name, b in BACKENDS.items() if cc in b.compute_capabilities]
        return (f"{backend} cannot build for {gpu} (compute capability {format_cc(cc)}); it supports "
                f"{', '.join(format_cc(c) for c in sorted(spec.compute_capabilities))}"
                + (f"; use backend {' or '.join(other)}" if other else ""))
    if not spec.installed():
        return f"{backend} needs the Python package `{spec.module}`, which is not installed"
    return None


def dtype_refusal(gpu: str, cc: tuple[int, int], dtype: str) -> str | None:
    allowed = precisions_for(cc)
    if dtype in allowed:
        return None
    return f"{dtype} is not supported by {gpu} (compute capability {format_cc(cc)}); allowed: {', '.join(allowed)}"


def quantization_refusal(backend: str, gpu: str, cc: tuple[int, int], dtype: str, weight_only: bool = False) -> str | None:
    """One line saying why this backend/GPU cannot honour the precision plan and what would, or None if it can.

    A W8A8 graph still *builds* for TensorRT-RTX sm86 (probe), which is why an undocumented combination is
    refused here rather than left to the builder.
    """
    if dtype not in ("int8", "fp8", "fp4"):
        return None
    targets = BACKENDS[backend].compute_capabilities
    if dtype == "fp4":
        if cc < FP4_MIN_CC:
            here = "fp8" if cc >= FP8_MIN_CC else _int8_here(backend, cc)
            return (f"fp4 needs compute capability 12.0+ and {gpu} is {format_cc(cc)}; use {here} on {gpu}, "
                    f"or fp4-class GPUs ({gpus_with(FP4_MIN_CC, targets)}) once fp4 is supported")
        return "fp4 (NVFP4) is not produced by ModelOpt 0.47's ONNX quantizer (int8, int4, fp8); use fp8"
    if dtype == "fp8":
        if weight_only:
            return "fp8 weight-only is not produced by ModelOpt 0.47's ONNX quantizer; use fp8 (weights and activations)"
        if cc < FP8_MIN_CC:
            return (f"fp8 needs compute capability 8.9+ and {gpu} is {format_cc(cc)}; use {_int8_here(backend, cc)} on "
                    f"{gpu}, or fp8 on {gpus_with(FP8_MIN_CC, targets)}")
        return None
    return BACKENDS[backend].int8_refusal(gpu, cc, weight_only)


def _int8_here(backend: str, cc: tuple[int, int]) -> str:
    """The INT8 form this backend honours on this compute capability, else fp16."""
    for weight_only, name in ((False, "int8"), (True, "int8 weight-only")):
        if BACKENDS[backend].int8_refusal("", cc, weight_only) is None:
            return f"{name} or fp16"
    return "fp16"


def check_quantization(path: Path | str | None, key: str, backend: str, gpu: str, cc: tuple[int, int],
                       dtype: str, weight_only: bool = False) -> None:
    """Raise the refusal as a ForgeError naming the recipe file and key."""
    reason = quantization_refusal(backend, gpu, cc, dtype, weight_only)
    if reason:
        raise fail(path, key, reason)
