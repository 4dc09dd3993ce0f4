"""TensorRT-RTX: builds ahead of time on a CPU-only machine for 7.5/8.0/8.6/8.9/12.0 (not 9.0).

Sources: TensorRT-RTX 1.7 support matrix (INT8 only as "INT8 WoQ GEMM" on 8.6/8.9/12.0); timing-cache
operations are no-ops since 1.2.
"""

from __future__ import annotations

from stages.targets.backends.base import Backend
from stages.targets.gpus import format_cc, gpus_with

COMPUTE_CAPABILITIES = frozenset({(7, 5), (8, 0), (8, 6), (8, 9), (12, 0)})
INT8_WEIGHT_ONLY_CCS = {(8, 6), (8, 9), (12, 0), (12, 1)}


def int8_refusal(gpu: str, cc: tuple[int, int], weight_only: bool) -> str | None:
    if not weight_only:
        fp8 = f"fp8 on {gpu}" if cc >= (8, 9) else f"fp8 on 8.9+ ({gpus_with((8, 9), COMPUTE_CAPABILITIES)})"
        return ("tensorrt-rtx supports INT8 only as weight-only GEMM quantization (support matrix: INT8 WoQ GEMM); "
                f"a W8A8 Q/DQ graph builds but what it runs as is undocumented; use int8 weight-only, {fp8}, "
                "or backend tensorrt for INT8 weights and activations")
    if cc not in INT8_WEIGHT_ONLY_CCS:
        return (f"tensorrt-rtx lists INT8 weight-only GEMM for compute capability "
                f"{', '.join(format_cc(c) for c in sorted(INT8_WEIGHT_ONLY_CCS))}, not {format_cc(cc)} ({gpu}); use fp16"
                + (" or backend tensorrt with int8" if cc >= (7, 5) else ""))
    return None


BACKEND = Backend(name="tensorrt-rtx", package="tensorrt-rtx-cu13", module="tensorrt_rtx",
                  compute_capabilities=COMPUTE_CAPABILITIES, int8_refusal=int8_refusal, timing_cache_works=False,
                  timing_cache_note="timing-cache operations are no-ops in TensorRT-RTX (deprecated since 1.2)", rtx=True)
