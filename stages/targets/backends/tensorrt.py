"""Full TensorRT 11 (strongly typed): every data-center and RTX compute capability, 9.0 included.

Not installable from PyPI here (the package downloads from NVIDIA's own index). Source: TensorRT 11 "Working
with Quantized Types": INT8, FP8, FP4 quantize weights and activations; weight-only quantization is INT4.
"""

from __future__ import annotations

from stages.targets.backends.base import Backend

COMPUTE_CAPABILITIES = frozenset({(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)})


def int8_refusal(gpu: str, cc: tuple[int, int], weight_only: bool) -> str | None:
    if weight_only:
        return ("TensorRT 11 documents weight-only quantization for INT4 only; INT8 weights without activation Q/DQ "
                "would be dequantized and multiplied in high precision; use int8 (weights and activations) with "
                "backend tensorrt, or backend tensorrt-rtx for int8 weight-only")
    return None


BACKEND = Backend(name="tensorrt", package="tensorrt", module="tensorrt", compute_capabilities=COMPUTE_CAPABILITIES,
                  int8_refusal=int8_refusal, timing_cache_works=True,
                  timing_cache_note="loaded from and saved to artifacts/cache/timing/", rtx=False)
