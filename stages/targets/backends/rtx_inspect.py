"""What TensorRT-RTX made of a graph: build-time layer information, which needs no GPU.

Polygraphy does not forward the builder's verbose log, which is where the per-layer information (datatypes of
every GEMM's inputs and constants) appears; that is the only precision evidence available without a GPU. Used
by tests and scripts (scripts/probe_int8_rtx.py) to check what a Q/DQ plan builds into.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stages.errors import ForgeError

def rtx_build_report(onnx_path: Path | str, compute_capability: tuple[int, int],
                     shapes: Mapping[str, Sequence[tuple[int, ...]]]) -> dict[str, Any]:
    """Build with tensorrt_rtx directly (strongly typed, DETAILED profiling) and keep what the builder said.

    Polygraphy does not forward the builder's verbose log, which is where the per-layer information (datatypes
    of every GEMM's inputs and constants) appears; that is the only precision evidence available without a GPU.
    """
    import tensorrt_rtx as trt

    logger = _CapturingLogger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        raise ForgeError(f"{onnx_path}: {[parser.get_error(i).desc() for i in range(parser.num_errors)]}")
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(getattr(trt.ComputeCapability, f"SM{compute_capability[0]}{compute_capability[1]}"), 0)
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    for name, (low, opt, high) in shapes.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    return {"built": engine is not None, "engine_bytes": engine.nbytes if engine is not None else 0,
            "errors": logger.at("ERROR"), "warnings": logger.at("WARNING"), "gemms": gemm_layers(logger.lines)}


class _CapturingLogger:
    def __new__(cls, trt: Any) -> Any:
        class Logger(trt.ILogger):
            def __init__(self) -> None:
                trt.ILogger.__init__(self)
                self.lines: list[tuple[str, str]] = []

            def log(self, severity: Any, message: str) -> None:
                self.lines.append((str(severity).rsplit(".", 1)[-1], message))

            def at(self, level: str) -> list[str]:
                return [m for s, m in self.lines if s == level or (level == "ERROR" and s == "INTERNAL_ERROR")]

        return Logger()


_LAYER = re.compile(r"Name: (?P<name>[^,]+), LayerType: (?P<type>\w+), Inputs: \[(?P<inputs>.*?)\], "
                    r"Constants: \[(?P<constants>.*?)\], Outputs: \[(?P<outputs>.*?)\], TacticName: (?P<tactic>[^,]*),"
                    r".*?Metadata: (?P<meta>.*?)(?=Name: |$)", re.S)
_DTYPE = re.compile(r"Datatype: (\w+)")


def gemm_layers(lines: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """Engine layers doing matrix products (gemm, runtime-fused FC), with the datatypes feeding them."""
    text = "\n".join(message for _, message in lines if "LayerType:" in message)
    layers = []
    for match in _LAYER.finditer(text):  # one log message may list every layer
        if match["type"] not in ("gemm", "runtime_fusion") or ("Fc" not in match["name"] and match["type"] != "gemm"):
            continue
        layers.append({"name": match["name"], "type": match["type"], "tactic": match["tactic"].strip(),
                       "inputs": sorted(set(_DTYPE.findall(match["inputs"]))),
                       "constants": sorted(set(_DTYPE.findall(match["constants"]))),
                       "outputs": sorted(set(_DTYPE.findall(match["outputs"]))),
                       "onnx_nodes": re.findall(r"\[ONNX Layer: ([^\]]+)\]", match["meta"])})
    return layers
