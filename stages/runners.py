"""One Runner protocol for every way the forge executes a built graph: ONNX Runtime, or the engine itself.

Validation, the pipeline check and calibration all take a Runner, so a new backend brings its runner here
once. A runner is a context manager (activate / deactivate, like Polygraphy's BaseRunner) whose `infer` maps
a feed of numpy arrays to float32 outputs by name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from stages.errors import fail


class RunnerName(str, enum.Enum):
    """Names every report uses for who produced a set of outputs."""

    REFERENCE = "pytorch-fp32"
    ONNXRUNTIME = "onnxruntime"
    ENGINE = "tensorrt-engine"


class ComparisonGraph(str, enum.Enum):
    """Graphs a quantized precision plan also writes, so validation can measure what quantizing costs."""

    FP16_PLAN = "fp16_graph"
    FREEZING_OFF = "freezing_off"

    @property
    def runner(self) -> str:
        return f"{RunnerName.ONNXRUNTIME.value}:{self.value}"


class Runner(Protocol):
    name: str

    def __enter__(self) -> Runner: ...

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None: ...

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]: ...


def _as_float32(value: Any) -> Any:
    import numpy as np

    array = np.asarray(value)
    return array.astype(np.float32) if np.issubdtype(array.dtype, np.floating) else array


def check_static_shape(onnx_path: Path, name: str, declared: Sequence[Any], actual: Sequence[int]) -> None:
    """A fixed graph dimension the feed does not match is almost always a different text_length at export."""
    fixed = [(axis, dim) for axis, dim in enumerate(declared) if isinstance(dim, int)]
    if len(declared) != len(actual) or any(actual[axis] != dim for axis, dim in fixed):
        raise fail(onnx_path, name, f"the graph declares shape {list(declared)}, the feed has {list(actual)} "
                   "(was the graph built with another text_length than the check's?)")


class OnnxRuntimeRunner:
    """The exact ONNX an engine is built from, on ONNX Runtime's CPU provider (FP8 Q/DQ graphs included).

    Feeds are cast to the graph's declared input dtypes (fp16 graphs take fp32 feeds), fixed dimensions are
    checked with a message naming the likely cause, outputs come back as float32."""

    def __init__(self, onnx_path: Path, name: str = RunnerName.ONNXRUNTIME.value, optimize: bool = True) -> None:
        self.onnx_path = Path(onnx_path)
        self.name = name
        self.optimize = optimize  # off: every node runs as written (block-wise runs match whole-graph runs exactly)
        self._session: Any = None

    def __enter__(self) -> OnnxRuntimeRunner:
        self._session = onnxruntime_session(self.onnx_path, optimize=self.optimize)
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._session = None

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        types = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
                 "tensor(int32)": np.int32, "tensor(bool)": np.bool_}
        inputs = self._session.get_inputs()
        missing = sorted({i.name for i in inputs} - set(feed))
        if missing:
            raise fail(self.onnx_path, "inputs", f"the graph needs {missing}, which the feed function does not "
                       f"provide (it provides {sorted(feed)})")
        arrays = {}
        for declared in inputs:
            array = np.ascontiguousarray(feed[declared.name], dtype=types.get(declared.type))
            if declared.shape == [] and array.size == 1:
                array = array.reshape(())  # a scalar another graph declared as [1] (chained block-wise runs)
            check_static_shape(self.onnx_path, declared.name, declared.shape, array.shape)
            arrays[declared.name] = array
        names = [o.name for o in self._session.get_outputs()]
        return {name: _as_float32(value) for name, value in zip(names, self._session.run(names, arrays))}


class EngineRunner:
    """A TensorRT(-RTX) engine through Polygraphy's TrtRunner; needs a GPU of the engine's compute capability."""

    def __init__(self, engine_path: Path, backend: str, name: str = RunnerName.ENGINE.value) -> None:
        self.engine_path = Path(engine_path)
        self.backend = backend
        self.name = name
        self._stack: Any = None
        self._runner: Any = None

    def __enter__(self) -> EngineRunner:
        import contextlib

        from stages.backends import BACKENDS

        self._stack = contextlib.ExitStack()
        polygraphy_trt = self._stack.enter_context(BACKENDS[self.backend].polygraphy())
        engine = polygraphy_trt.EngineFromBytes(self.engine_path.read_bytes())
        self._runner = self._stack.enter_context(polygraphy_trt.TrtRunner(engine, name=self.name))
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._stack.close()

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        return {name: _as_float32(value) for name, value in self._runner.infer(dict(feed)).items()}


def run_all(runner: Runner, feeds: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Every feed through one runner, activated once."""
    with runner:
        return [runner.infer(feed) for feed in feeds]


def engine_unrunnable_reason(compute_capability: tuple[int, int]) -> str | None:
    """Why the engine cannot run here, or None when a GPU of its compute capability is present."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible on this machine; validated the engine's exact ONNX with ONNX Runtime instead"
    found = torch.cuda.get_device_capability()
    if tuple(found) != tuple(compute_capability):
        return (f"GPU {torch.cuda.get_device_name()} has compute capability {found[0]}.{found[1]}; the engine was "
                f"built for {compute_capability[0]}.{compute_capability[1]}; validated its exact ONNX with ONNX Runtime")
    return None


def onnxruntime_cpu_note(model: Any) -> dict[str, Any]:
    """What ONNX Runtime on CPU can do with this graph, so validation says how it ran (or why it cannot)."""
    from stages.qdq import ONNX_BFLOAT16, QDQ_OPS, has_fp8

    bf16 = {i.name for i in model.graph.initializer if i.data_type == ONNX_BFLOAT16}  # bf16 weights in place are fine
    if any(node.op_type in QDQ_OPS and len(node.input) > 1 and node.input[1] in bf16 for node in model.graph.node):
        return {"runs": False, "why": "ORT CPU has no bfloat16 QuantizeLinear/DequantizeLinear kernels; "
                                      "validate a fp16 or fp32 high-precision build instead"}
    if has_fp8(model):
        return {"runs": True, "graph_optimization": "disabled",
                "why": "ORT's QDQ fusions turn FP8 Q/DQ into MatMulIntegerToFloat, which rejects float8 inputs; "
                       "with optimizations off every QuantizeLinear/DequantizeLinear runs as written (real FP8 "
                       "rounding, not a simulation)"}
    return {"runs": True, "graph_optimization": "default"}


def onnxruntime_session(path: Path | str, optimize: bool = True) -> Any:
    """A CPU InferenceSession that can run this quantized graph; raises ForgeError where ORT CPU cannot."""
    import onnx
    import onnxruntime as ort

    note = onnxruntime_cpu_note(onnx.load(str(path), load_external_data=False))
    if not note["runs"]:
        raise fail(path, "validate", note["why"])
    options = ort.SessionOptions()
    if note["graph_optimization"] == "disabled" or not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
