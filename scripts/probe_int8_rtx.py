"""Probe what TensorRT-RTX makes of each quantized form of the tiny Qwen-Image transformer, on CPU.

For every quantize mode (INT8 W8A8, INT8 weight-only, FP8) it quantizes the surgery graph with the forge's
quantize stage, builds for sm86/sm89/sm120 with tensorrt_rtx (strongly typed, DETAILED profiling) and reports
whether an engine came back, the builder's errors and warnings, and the datatypes feeding every GEMM layer, which
shows whether the Q/DQ survived (Int8/FP8 inputs or constants) or were dropped. It also runs each graph on ONNX
Runtime CPU against the fp32 graph. Evidence only: what kernel TensorRT-RTX picks is decided at JIT time on a GPU.

Usage (from the repository root, after `doit surgery`):
    FORGE_ARTIFACTS=/tmp/quant/artifacts .venv/bin/python scripts/probe_int8_rtx.py --recipe a10-fp16 \
        --high-precision fp16 --out /tmp/quant/probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.families.qwen_image import transformer as qwen_image  # noqa: E402
from stages.graphs.runners import onnxruntime_session  # noqa: E402
from stages.quantize import QuantizePrecision  # noqa: E402
from stages.recipe.schema import PixelRange, Profile, Range, ValidateSettings  # noqa: E402
from stages.targets.backends.rtx_inspect import rtx_build_report  # noqa: E402

TARGETS = [(8, 6), (8, 9), (12, 0)]
MODES = [("int8", "max"), ("int8_weight_only", "max"), ("fp8", "max")]


def feeds(config: dict[str, Any], text_length: int, seed: int, sizes: list[list[int]]) -> list[dict[str, np.ndarray]]:
    """N(0,1) latents and text embeddings at several sizes and timesteps, like the validate stage's cases."""
    settings = ValidateSettings(sizes=sizes, batch=2, timesteps=[1.0, 0.3], text_tokens=[37, 180], seed=seed,
                                tolerances={"sample": {"atol": 1, "rtol": 1, "cosine": 0.5}})
    return [case["feed"] for case in qwen_image.validation_cases(_ConfigOnly(config), settings, text_length)]


class _ConfigOnly:
    """validation_cases only reads `.config`; avoid loading weights for it."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = argparse.Namespace(**config)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def ort_check(source: Path, quantized: Path, cases: list[dict[str, np.ndarray]]) -> dict[str, Any]:
    import onnxruntime as ort

    try:
        session = onnxruntime_session(quantized)
    except Exception as error:  # noqa: BLE001 - the probe reports every failure
        return {"runs": False, "error": str(error)[:300]}
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    sims = [cosine(reference.run(None, f)[0], session.run(None, f)[0]) for f in cases]
    return {"runs": True, "min_cosine_vs_fp32": min(sims)}


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    kinds = Counter(f"in={'/'.join(g['inputs'])} const={'/'.join(g['constants'])}" for g in report["gemms"])
    return {"built": report["built"], "engine_bytes": report["engine_bytes"], "errors": report["errors"],
            "warnings": report["warnings"], "gemm_datatypes": dict(kinds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="a10-fp16")
    parser.add_argument("--high-precision", default="fp16", choices=["fp32", "fp16", "bf16"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    view = Path(os.environ.get("FORGE_ARTIFACTS") or Path(__file__).resolve().parent.parent / "artifacts") / args.recipe
    surgery = view / "transformer" / "surgery"
    source = surgery / "model.onnx"
    frozen = tuple(json.loads((surgery / "record.json").read_text())["report"]["frozen_nodes"])
    config = json.loads((view / "checkpoint" / "transformer" / "config.json").read_text())
    text_length = 256
    calibration = feeds(config, text_length, 0, [[256, 256], [384, 512]])
    evaluation = feeds(config, text_length, 7, [[256, 384], [512, 256]])
    profile = Profile(batch=Range(min=1, opt=1, max=2), height=PixelRange(min=256, opt=512, max=512),
                      width=PixelRange(min=256, opt=512, max=512))
    shapes = qwen_image.profile_shapes(profile, text_length, config)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        for mode, method in MODES:
            out = Path(scratch) / mode
            out.mkdir()
            stage = QuantizePrecision("transformer", source, mode, method, args.high_precision, frozen, (), calibration)
            report = stage(out)
            row = {"mode": mode, "high_precision": args.high_precision, "quantized_nodes": report["quantized_nodes"],
                   "onnxruntime_cpu": ort_check(source, out / "model.onnx", evaluation), "builds": {}}
            for cc in TARGETS:
                row["builds"][f"sm{cc[0]}{cc[1]}"] = summarize(rtx_build_report(out / "model.onnx", cc, shapes))
            results.append(row)
            print(json.dumps(row, indent=1), flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
