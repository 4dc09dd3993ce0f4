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
from stages.graphs import bf16, lora
from stages.graphs.qdq import ONNX_BFLOAT16, QDQ_OPS, has_fp8
from stages.targets.backends import BACKENDS


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
    """The exact ONNX an engine is built from, on ONNX Runtime's CPU provider (Q/DQ graphs run as written).

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
        feed = {**lora.unbound_feed((i.name, i.shape) for i in inputs if i.name not in feed), **feed}
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
    """A TensorRT(-RTX) engine through Polygraphy's TrtRunner; needs a GPU of the engine's compute capability.

    Polygraphy keeps the device buffers between calls. `weight_streaming_budget` (bytes) is set on the engine
    before its context exists; with `runtime_cache`, TensorRT-RTX's kernels compiled at run time are read from and
    written back to that file, so a second process starts warm. Unverified on hardware here (no SM 8.x/12.x GPU).
    """

    def __init__(self, engine_path: Path, backend: str, name: str = RunnerName.ENGINE.value,
                 weight_streaming_budget: int | None = None, runtime_cache: Path | None = None) -> None:
        self.engine_path = Path(engine_path)
        self.backend = backend
        self.name = name
        self.weight_streaming_budget = weight_streaming_budget
        self.runtime_cache = runtime_cache
        self._stack: Any = None
        self._runner: Any = None
        self._cache: Any = None
        self._declared: dict[str, Any] | None = None  # the engine's input shapes
        self._zeros: dict[str, Any] = {}  # contiguous zeros for LoRA inputs a feed left unbound, made once each

    def __enter__(self) -> EngineRunner:
        import contextlib

        self._stack = contextlib.ExitStack()
        polygraphy_trt = self._stack.enter_context(BACKENDS[self.backend].polygraphy())
        engine = polygraphy_trt.EngineFromBytes(self.engine_path.read_bytes())()
        if self.weight_streaming_budget is not None:
            engine.weight_streaming_budget_v2 = min(self.weight_streaming_budget, engine.streamable_weights_size)
        context: Any = engine
        if self.runtime_cache is not None:
            config = engine.create_runtime_config()
            self._cache = config.create_runtime_cache()
            if self.runtime_cache.is_file():
                self._cache.deserialize(self.runtime_cache.read_bytes())
            config.set_runtime_cache(self._cache)
            context = engine.create_execution_context(config)
        self._runner = self._stack.enter_context(polygraphy_trt.TrtRunner(context, name=self.name))
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._stack.close()
        if self._cache is not None and self.runtime_cache is not None:
            self.runtime_cache.write_bytes(bytes(self._cache.serialize()))

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        import numpy as np

        if self._declared is None:
            self._declared = {n: m.shape for n, m in self._runner.get_input_metadata().items()}
        missing = [(n, shape) for n, shape in self._declared.items() if n not in feed and n not in self._zeros]
        self._zeros.update({n: np.ascontiguousarray(v) for n, v in lora.unbound_feed(missing).items()})
        feed = {**{n: self._zeros[n] for n in self._declared if n not in feed and n in self._zeros}, **feed}
        return {name: _as_float32(value) for name, value in self._runner.infer(feed).items()}


class ChainedRunner:
    """The parts of one graph (or their engines) run one after another, as a component split into block-range
    engines runs (stages.graphs.parts): each takes the graph inputs and earlier parts' outputs it names."""

    def __init__(self, runners: Sequence[Runner], inputs: Sequence[Sequence[str]], outputs: Sequence[str],
                 name: str) -> None:
        self.runners, self.inputs, self.outputs, self.name = list(runners), [tuple(i) for i in inputs], tuple(outputs), name
        self._stack: Any = None

    def __enter__(self) -> ChainedRunner:
        import contextlib

        self._stack = contextlib.ExitStack()
        for runner in self.runners:
            self._stack.enter_context(runner)
        return self

    def __exit__(self, kind: Any, error: Any, trace: Any) -> None:
        self._stack.close()

    def infer(self, feed: Mapping[str, Any]) -> dict[str, Any]:
        values = dict(feed)
        for runner, names in zip(self.runners, self.inputs):
            values.update(runner.infer(lora.named_feed(values, names)))
        return {name: values[name] for name in self.outputs}


def engine_runner(paths: Sequence[Path], backend: str, contracts: Sequence[Mapping[str, Any]] = (),
                  budgets: Sequence[int | None] = (), runtime_cache: Path | None = None) -> Runner:
    """A component's engine, or the parts of a split one chained by the contracts their engine stage recorded;
    `budgets`: each engine's weight-streaming budget in bytes (None: all resident); `runtime_cache`: one file per
    engine, `<name>.<n>` for parts."""
    budgets = list(budgets) or [None] * len(paths)
    if not contracts:
        return EngineRunner(paths[0], backend, weight_streaming_budget=budgets[0], runtime_cache=runtime_cache)
    engine = RunnerName.ENGINE.value
    caches = [None if runtime_cache is None else runtime_cache.with_name(f"{runtime_cache.name}.{n}")
              for n in range(len(paths))]
    return ChainedRunner([EngineRunner(path, backend, name=f"{engine} part {n}", weight_streaming_budget=budget,
                                       runtime_cache=cache)
                          for n, (path, budget, cache) in enumerate(zip(paths, budgets, caches))],
                         [[i["name"] for i in c["inputs"]] for c in contracts],
                         [o["name"] for c in contracts for o in c["outputs"] if o["to"] == "graph output"], engine)


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


QDQ_AS_FLOAT = ("Q/DQ as float arithmetic (graph optimizations off; the int32-accumulated result TensorRT computes, "
                "independent of the CPU's int8 instructions)")
WEIGHT_ONLY_AS_FLOAT = ("weight-only Q/DQ as float arithmetic (graph optimizations off; DequantizeLinear's float "
                        "weights in a float GEMM, as the engine's weight-only GEMM, no int8 activations)")
FP8_AS_WRITTEN = "FP8 Q/DQ as written (graph optimizations off; real FP8 rounding, GEMMs in float)"
DEFAULT_OPTIMIZATIONS = "default graph optimizations"
BF16_AS_FP32 = ("bf16 nodes computed in fp32 on their bf16 inputs, outputs rounded to bf16 (ORT CPU has no bf16 "
                "kernels; a bf16 GEMM with fp32 accumulation, as TensorRT runs it)")
NO_OPTIMIZATIONS = "graph optimizations off (every node as written)"


def onnxruntime_cpu_note(model: Any) -> dict[str, Any]:
    """What ONNX Runtime on CPU can do with this graph, so validation says how it ran (or why it cannot).

    Every graph with Q/DQ runs with graph optimizations off: ORT's QDQ fusions swap the written arithmetic for
    fused kernels whose numbers depend on the CPU or on ORT's own choices, not on what the engine computes."""
    bf16_scales = {i.name for i in model.graph.initializer if i.data_type == ONNX_BFLOAT16}  # bf16 weights are fine
    if any(node.op_type in QDQ_OPS and len(node.input) > 1 and node.input[1] in bf16_scales for node in model.graph.node):
        return {"runs": False, "why": "ORT CPU has no bfloat16 QuantizeLinear/DequantizeLinear kernels; "
                                      "validate a fp16 or fp32 high-precision build instead"}
    if has_fp8(model):
        return {"runs": True, "graph_optimization": "disabled", "execution": FP8_AS_WRITTEN,
                "why": "ORT's QDQ fusions turn FP8 Q/DQ into MatMulIntegerToFloat, which rejects float8 inputs; "
                       "with optimizations off every QuantizeLinear/DequantizeLinear runs as written (real FP8 "
                       "rounding, not a simulation)"}
    ops = {node.op_type for node in model.graph.node}
    if "QuantizeLinear" in ops:
        return {"runs": True, "graph_optimization": "disabled", "execution": QDQ_AS_FLOAT,
                "why": "ORT's QDQ fusions turn Q/DQ MatMul/Conv into fused int8 kernels (MatMulIntegerToFloat, "
                       "QLinearConv) whose results depend on the CPU: without VNNI, AVX2's U8S8 VPMADDUBSW "
                       "saturates its int16 pair sums (ORT's quantization docs; see scripts/probe_ort_int8_isa.py); "
                       "with optimizations off QuantizeLinear/DequantizeLinear run as written and the GEMMs in "
                       "float, which is exact int32 accumulation up to float rounding on every CPU"}
    if "DequantizeLinear" in ops:
        return {"runs": True, "graph_optimization": "disabled", "execution": WEIGHT_ONLY_AS_FLOAT,
                "why": "weight-only INT8: ORT fuses DequantizeLinear+MatMul into MatMulNBits, which at its default "
                       "accuracy level also quantizes the activations to int8 on the fly (a W8A8 approximation "
                       "the engine's weight-only GEMM does not make, run by CPU-specific int8 kernels); with "
                       "optimizations off DequantizeLinear runs as written and the GEMMs take its float weights"}
    return {"runs": True, "graph_optimization": "default", "execution": DEFAULT_OPTIMIZATIONS,
            "bf16": bool(bf16.bf16_compute_nodes(model))}


def _execution(note: dict[str, Any], optimize: bool) -> str:
    if note["graph_optimization"] == "disabled":
        return note["execution"]
    return (DEFAULT_OPTIMIZATIONS if optimize else NO_OPTIMIZATIONS) + (f"; {BF16_AS_FP32}" if note.get("bf16") else "")


def onnxruntime_execution(path: Path | str, optimize: bool = True) -> str:
    """How `onnxruntime_session` runs this graph, in words for the validation report."""
    import onnx

    note = onnxruntime_cpu_note(onnx.load(str(path), load_external_data=False))
    return _execution(note, optimize) if note["runs"] else note["why"]


def onnxruntime_session(path: Path | str, optimize: bool = True) -> Any:
    """A CPU InferenceSession that can run this quantized graph; raises ForgeError where ORT CPU cannot."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(path), load_external_data=False)
    note = onnxruntime_cpu_note(model)
    if not note["runs"]:
        raise fail(path, "validate", note["why"])
    options = ort.SessionOptions()
    # ORT's CPU arena keeps what a session grew to after the session is gone: 1-2 GB more per release-width block
    # run (7.3 GB for two block-wise cases, 3.9 GB without it); freed tensors go straight back instead.
    options.enable_cpu_mem_arena = False
    # threads sleep between ops instead of spinning: two tasks on two cores (doit -n 2) otherwise take each other's
    # cores (two concurrent tiny builds: 10% less CPU and time)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not _execution(note, optimize).startswith(DEFAULT_OPTIMIZATIONS):
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if note.get("bf16"):
        bf16.as_fp32_between_bf16_roundings(model)
        # the rewritten graph is only in memory; its external data stays where the file's is
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(Path(path).parent))
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
