"""Quantize stage: explicit Q/DQ through ModelOpt's ONNX quantizer on CPU (TensorRT 11 / RTX are strongly typed).

Modes and what each produces (ModelOpt 0.47, base install, `calibration_eps=["cpu"]`):

- ``int8``: W8A8. Per-channel INT8 weights, per-tensor INT8 activations calibrated with ``max`` or ``entropy``.
- ``int8_weight_only``: W8A16. INT8 weights behind DequantizeLinear only (no activation Q/DQ), made by ModelOpt's
  INT4 RTN path with every GEMM listed in ``layers_8bit`` (per-channel INT8). No calibration data is needed.
- ``fp8``: FP8 E4M3 weights and activations, ``max`` calibration only (ModelOpt calibrates as INT8 and rescales).

Why the extra graph work around the quantizer:

- ONNX Runtime's QDQ quantizer shares one Q/DQ pair between all consumers of a tensor (``DedicatedQDQPair`` is off),
  so a node in ``nodes_to_exclude`` still reads a dequantized tensor when another consumer is quantized (seen here:
  ``txt_norm1``/``txt_norm2`` LayerNorms). :func:`detach_excluded` rewires excluded nodes to the unquantized tensor,
  then :func:`qdq_violations` proves no frozen or excluded node reads a DequantizeLinear output; otherwise we fail.
- The additive attention mask holds float32-min sentinels: ``entropy`` cannot histogram them ("Too many bins") and
  a scale of 3.4e38/127 overflows fp16. Nodes consuming such tensors are excluded (reason ``mask_sentinel``).
- Calibration must cover several image sizes, and the RoPE tables are indexed by image token on axis 0: ModelOpt's
  ``calibration_data`` dict is split along axis 0 of every input, which would cut those tables apart. Feeds therefore
  go in through a ``CalibrationDataReader`` (:func:`feed_reader`), one complete engine feed per calibration step.

Capability rules for these modes live in :mod:`stages.capabilities` (checked before any work).
"""

from __future__ import annotations

import json
import re
import struct
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages.capabilities import CALIBRATION_METHODS, QUANTIZATION_MODES, quantization_mode
from stages.errors import ForgeError, fail

MODEL_FILE = "model.onnx"
RANGES_FILE = "calibration.json"
CACHE_FILE = "calibration.cache"
MODES = QUANTIZATION_MODES
HIGH_PRECISIONS = ("fp32", "fp16", "bf16")
GEMM_OPS = ("MatMul", "Gemm", "Conv")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
SENTINEL = 1e30  # |x| at or above this is a mask sentinel (float32 min is -3.4e38), never a real activation
MASK_CARRIERS = {"Where", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Expand", "Transpose", "Concat", "Slice",
                 "Gather", "Identity", "Tile", "Flatten"}
FP8_TYPES = {17, 18, 19, 20}  # onnx FLOAT8E4M3FN, FLOAT8E4M3FNUZ, FLOAT8E5M2, FLOAT8E5M2FNUZ
ONNX_INT8, ONNX_BFLOAT16, ONNX_FLOAT8E4M3FN = 3, 16, 17
QMAX = {"int8": 127.0, "fp8": 448.0}
# ModelOpt 0.47 FP8: int8 scale (amax/127) times 448/127, so the calibrated amax lands on 127*127/448 = 36.0 in FP8.
AMAX_PER_SCALE = {"int8": 127.0, "fp8": 127.0 * 127.0 / 448.0}
EXCLUSION_KEYS = {"frozen_text_branch": "surgery.frozen_nodes", "recipe_pattern": "precision.exclude",
                  "mask_sentinel": "mask_sentinel"}

Feed = Mapping[str, np.ndarray]


mode_for = quantization_mode


# ----------------------------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------------------------


def feed_reader(feeds: Sequence[Feed]) -> Any:
    """An ORT `CalibrationDataReader` giving one complete engine feed per calibration step.

    Shapes may differ between steps (image sizes, batch). Defined lazily so that the capability rules above
    can be imported by the task graph without importing ONNX Runtime.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = [dict(feed) for feed in feeds]
            self._iter = iter(self.feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._iter, None)

        def get_first(self) -> dict[str, np.ndarray]:
            return self.feeds[0]

        def rewind(self) -> None:
            self._iter = iter(self.feeds)

        def __len__(self) -> int:
            return len(self.feeds)

    if not feeds:
        raise ValueError("calibration needs at least one feed")
    return FeedReader()


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizePrecision:
    """Quantize an fp32 ONNX graph; frozen and excluded nodes stay unquantized, at `high_precision`.

    `high_precision` is ModelOpt's `high_precision_dtype`: the dtype of everything that is not quantized (frozen
    text branch, excluded nodes, norms, softmax...). ModelOpt's quantizer cannot take an AutoCast graph as input
    (its output fails ONNX type checking), so a quantized engine has one high precision, not fp32 islands in fp16.
    """

    component: str
    source: Path
    mode: str
    calibration_method: str
    high_precision: str
    frozen_nodes: tuple[str, ...]
    exclude_patterns: tuple[str, ...]
    calibration_feeds: Callable[[], Sequence[Feed]] | Sequence[Feed] = field(default=(), compare=False, repr=False)
    calibration_cache: Path | None = None

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import onnx

        from stages.onnx_io import save_model

        self.check_settings()
        graph = onnx.load(str(self.source), load_external_data=False)
        exclusions = self.exclusions(graph)
        feeds = self._feeds()
        print(f"[quantize] {self.mode} ({self.calibration_method}, {len(feeds)} feeds), high precision "
              f"{self.high_precision}, {len(exclusions)} nodes excluded", file=sys.stderr)
        model = run_modelopt(self, sorted(exclusions), feeds)
        # ModelOpt re-imports a cache only if it holds every activation scale it places, detached ones included.
        cache = write_calibration_cache(calibration_ranges(model, self.mode), out_dir / CACHE_FILE) \
            if self.mode == "int8" else None
        detached = detach_excluded(model, set(exclusions))
        self.verify(model, exclusions)
        save_model(model, out_dir / MODEL_FILE)
        ranges = calibration_ranges(model, self.mode)
        ranges.update({"method": self.calibration_method, "samples": len(feeds)})
        (out_dir / RANGES_FILE).write_text(json.dumps(ranges, indent=2) + "\n")
        return self.report(model, exclusions, detached, ranges, cache, len(feeds))

    def check_settings(self) -> None:
        """Fail before any work on a mode, method or dtype this stage does not offer."""
        if self.mode not in MODES:
            raise fail(self.source, "precision.dtype", f"{self.mode!r} cannot be quantized here; allowed: {', '.join(MODES)}")
        methods = CALIBRATION_METHODS[self.mode]
        if self.calibration_method not in methods:
            raise fail(self.source, "precision.calibration.method",
                       f"{self.calibration_method!r} is not offered for {self.mode}; allowed: {', '.join(methods)}")
        if self.high_precision not in HIGH_PRECISIONS:
            raise fail(self.source, "precision.high_precision",
                       f"{self.high_precision!r}; allowed: {', '.join(HIGH_PRECISIONS)}")
        if self.calibration_cache and self.mode != "int8":
            raise fail(self.source, "precision.calibration.cache", f"a calibration cache is only read for int8, not {self.mode}")

    def exclusions(self, graph: Any) -> dict[str, str]:
        """Node name -> why it stays unquantized: frozen text branch, recipe pattern or mask sentinel."""
        names = [node.name for node in graph.graph.node]
        missing = sorted(set(self.frozen_nodes) - set(names))
        if missing:
            raise fail(self.source, "surgery.frozen_nodes", f"{len(missing)} frozen nodes are not in the graph: {missing[:3]}")
        reasons = {name: "frozen_text_branch" for name in self.frozen_nodes}
        patterns = [re.compile(p) for p in self.exclude_patterns]
        for name in names:
            if name not in reasons and any(p.search(name) for p in patterns):
                reasons[name] = "recipe_pattern"
        for name in mask_sentinel_consumers(graph):
            reasons.setdefault(name, "mask_sentinel")
        return reasons

    def verify(self, model: Any, exclusions: Mapping[str, str]) -> None:
        """Fail loudly if a frozen/excluded node reads a dequantized tensor or a weight is not the requested type."""
        violations = qdq_violations(model, exclusions)
        if violations:
            node, tensor = violations[0]
            raise fail(self.source, EXCLUSION_KEYS[exclusions[node]],
                       f"{len(violations)} inputs of excluded nodes come from DequantizeLinear, e.g. {node} reads "
                       f"{tensor}; allowed: unquantized inputs only")
        wanted = ONNX_FLOAT8E4M3FN if self.mode == "fp8" else ONNX_INT8
        wrong = [n for n, t in dequantized_types(model).items() if t != wanted]
        if wrong:
            raise fail(self.source, "precision.dtype", f"{len(wrong)} DequantizeLinear nodes are not {self.mode}: {wrong[:3]}")
        if not quantized_nodes(model):
            raise fail(self.source, "precision.dtype", f"the quantizer placed no Q/DQ for {self.mode}")

    def report(self, model: Any, exclusions: Mapping[str, str], detached: list[dict[str, str]],
               ranges: dict[str, Any], cache: str | None, samples: int) -> dict[str, Any]:
        import modelopt

        quantized = quantized_nodes(model)
        skipped = quantizer_skipped(model, exclusions)
        by_reason = Counter(exclusions.values())
        return {
            "component": self.component,
            "model_file": MODEL_FILE,
            "mode": self.mode,
            "weights": "fp8" if self.mode == "fp8" else "int8",
            "activations": {"int8": "int8", "fp8": "fp8", "int8_weight_only": self.high_precision}[self.mode],
            "high_precision": self.high_precision,
            "quantizer": f"modelopt.onnx.quantization {modelopt.__version__}",
            "calibration": {"method": self.calibration_method, "samples": samples, "ranges_file": RANGES_FILE,
                            "cache_file": cache, "activation_tensors": len(ranges["activations"]),
                            "reused_cache": str(self.calibration_cache) if self.calibration_cache else None},
            "quantized_nodes": dict(sorted(Counter(quantized.values()).items())),
            "quantized_gemms": sorted(n for n, op in quantized.items() if op in GEMM_OPS),
            "excluded": {
                "frozen_text_branch": by_reason["frozen_text_branch"],
                "recipe_patterns": {p: sum(1 for n, r in exclusions.items() if r == "recipe_pattern" and re.search(p, n))
                                    for p in self.exclude_patterns},
                "mask_sentinel": sorted(n for n, r in exclusions.items() if r == "mask_sentinel"),
                "quantizer_choice": skipped,
            },
            "detached_shared_qdq": detached,
            "onnxruntime_cpu": onnxruntime_cpu_note(model),
        }

    def _feeds(self) -> list[Feed]:
        feeds = self.calibration_feeds() if callable(self.calibration_feeds) else self.calibration_feeds
        if self.mode != "int8_weight_only" and not feeds:
            raise fail(self.source, "precision.calibration", f"{self.mode} needs calibration feeds; got none")
        return list(feeds)


# ----------------------------------------------------------------------------------------------------------------
# Running ModelOpt
# ----------------------------------------------------------------------------------------------------------------


def run_modelopt(stage: QuantizePrecision, excluded: list[str], feeds: Sequence[Feed]) -> Any:
    """Quantize in a scratch directory (ModelOpt writes intermediate files beside its input and output)."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="forge-quantize-") as scratch:
        work = Path(scratch)
        source = _link_source(stage.source, work)
        output = work / "quantized.onnx"
        patterns = [f"^{re.escape(name)}$" for name in excluded]
        if stage.mode == "int8_weight_only":
            _quantize_weight_only(source, output, patterns, excluded)
        else:
            _quantize_qdq(stage, source, output, patterns, feeds)
        model = onnx.load(str(output))
    if stage.mode == "int8_weight_only" and stage.high_precision != "fp32":
        from modelopt.onnx.autocast import convert_to_f16

        model = convert_to_f16(model, low_precision_type=stage.high_precision, keep_io_types=True)
    return model


def _link_source(source: Path, work: Path) -> Path:
    """Symlink the model (and its external data) so nothing is written next to the upstream artifact."""
    for path in [source, *source.parent.glob(f"{source.name}.data")]:
        (work / path.name).symlink_to(path.resolve())
    return work / source.name


def _quantize_qdq(stage: QuantizePrecision, source: Path, output: Path, patterns: list[str], feeds: Sequence[Feed]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(
        str(source),
        quantize_mode=stage.mode,
        calibration_method=stage.calibration_method,
        calibration_data_reader=feed_reader(feeds),
        calibration_cache_path=str(stage.calibration_cache) if stage.calibration_cache else None,
        calibration_eps=["cpu"],
        nodes_to_exclude=patterns,
        high_precision_dtype=stage.high_precision,
        output_path=str(output),
        log_level="WARNING",
    )


def _quantize_weight_only(source: Path, output: Path, patterns: list[str], excluded: list[str]) -> None:
    """INT8 weight-only = ModelOpt's INT4 RTN DQ-only path with every GEMM promoted to per-channel 8 bit."""
    import onnx

    from modelopt.onnx.quantization import quantize

    graph = onnx.load(str(source), load_external_data=False).graph
    skip = set(excluded)
    gemms = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in skip]
    quantize(
        str(source),
        quantize_mode="int4",
        calibration_method="rtn_dq",
        calibration_eps=["cpu"],
        nodes_to_exclude=patterns,
        layers_8bit=",".join(gemms),
        output_path=str(output),
        log_level="WARNING",
    )


# ----------------------------------------------------------------------------------------------------------------
# Graph facts
# ----------------------------------------------------------------------------------------------------------------


def _producers(model: Any) -> dict[str, Any]:
    return {out: node for node in model.graph.node for out in node.output}


def _initializers(model: Any) -> dict[str, Any]:
    return {init.name: init for init in model.graph.initializer}


def mask_sentinel_consumers(model: Any) -> list[str]:
    """Nodes reading a tensor that carries float32-min sentinels (additive attention masks), found statically."""
    from onnx import numpy_helper

    small = [i for i in model.graph.initializer if i.data_location != i.EXTERNAL and int(np.prod(i.dims)) <= 4096]
    tainted = {i.name for i in small if _has_sentinel(numpy_helper.to_array(i))}  # sentinels are small constants
    for node in model.graph.node:
        values = [a.t for a in node.attribute if a.name == "value" and a.type == a.TENSOR]
        if node.op_type == "Constant" and values and _has_sentinel(numpy_helper.to_array(values[0])):
            tainted.update(node.output)
    consumers: list[str] = []
    for node in model.graph.node:  # graph order is topological
        if not tainted.intersection(node.input):
            continue
        if node.op_type in MASK_CARRIERS:
            tainted.update(node.output)
        else:
            consumers.append(node.name)
    return consumers


def _has_sentinel(values: np.ndarray) -> bool:
    return values.dtype.kind == "f" and values.size > 0 and bool(np.nanmax(np.abs(values.astype(np.float64))) >= SENTINEL)


def qdq_violations(model: Any, protected: Iterable[str]) -> list[tuple[str, str]]:
    """(node, input) pairs where a protected node reads a DequantizeLinear output: a Q/DQ on its input."""
    names = set(protected)
    producers = _producers(model)
    return [(node.name, tensor) for node in model.graph.node if node.name in names
            for tensor in node.input if tensor in producers and producers[tensor].op_type == "DequantizeLinear"]


def detach_excluded(model: Any, excluded: set[str]) -> list[dict[str, str]]:
    """Point excluded nodes at the tensor a shared activation Q/DQ pair was made from; drop dead Q/DQ nodes."""
    producers = _producers(model)
    types = _tensor_types(model)
    detached = []
    for node in model.graph.node:
        if node.name not in excluded:
            continue
        for index, tensor in enumerate(node.input):
            source = _qdq_source(producers, tensor)
            if source is None or types.get(source, 0) != types.get(tensor, 0):
                continue  # not an activation Q/DQ pair, or a cast would be needed: left for qdq_violations
            node.input[index] = source
            detached.append({"node": node.name, "input": source})
    _drop_dead_qdq(model)
    return detached


def _qdq_source(producers: Mapping[str, Any], tensor: str) -> str | None:
    dq = producers.get(tensor)
    if dq is None or dq.op_type != "DequantizeLinear":
        return None
    q = producers.get(dq.input[0])
    return q.input[0] if q is not None and q.op_type == "QuantizeLinear" else None


def _tensor_types(model: Any) -> dict[str, int]:
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < 2**31 else model
    values = (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values}
    types.update({i.name: i.data_type for i in model.graph.initializer})
    return types


def _drop_dead_qdq(model: Any) -> None:
    """Remove Q/DQ nodes nobody reads any more, and the scale/zero-point initializers only they used."""
    outputs = {o.name for o in model.graph.output}
    orphans: set[str] = set()
    while True:
        used = {tensor for node in model.graph.node for tensor in node.input} | outputs
        dead = [n for n in model.graph.node if n.op_type in QDQ_OPS and not used.intersection(n.output)]
        if not dead:
            break
        for node in dead:
            orphans.update(node.input)
            model.graph.node.remove(node)
    used = {tensor for node in model.graph.node for tensor in node.input}
    for init in [i for i in model.graph.initializer if i.name in orphans and i.name not in used]:
        model.graph.initializer.remove(init)


def quantized_nodes(model: Any) -> dict[str, str]:
    """Node name -> op type for every non-Q/DQ node with at least one input coming out of a DequantizeLinear."""
    producers = _producers(model)
    return {node.name: node.op_type for node in model.graph.node if node.op_type not in QDQ_OPS
            and any(t in producers and producers[t].op_type == "DequantizeLinear" for t in node.input)}


def quantizer_skipped(model: Any, exclusions: Mapping[str, str]) -> dict[str, list[str]]:
    """GEMM-like nodes nobody excluded that ModelOpt still left unquantized (GEMV/small-GEMM/MHA heuristics, no weight)."""
    quantized = quantized_nodes(model)
    skipped: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in GEMM_OPS and node.name not in quantized and node.name not in exclusions:
            skipped.setdefault(node.op_type, []).append(node.name)
    return skipped


def dequantized_types(model: Any) -> dict[str, int]:
    """DequantizeLinear node -> element type it dequantizes (from its input initializer or Q's zero point)."""
    producers, inits = _producers(model), _initializers(model)
    types = {}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        source = node.input[0]
        if source in inits:
            types[node.name] = inits[source].data_type
        elif source in producers and len(producers[source].input) > 2 and producers[source].input[2] in inits:
            types[node.name] = inits[producers[source].input[2]].data_type
        elif len(node.input) > 2 and node.input[2] in inits:
            types[node.name] = inits[node.input[2]].data_type
    return types


def has_fp8(model: Any) -> bool:
    return any(i.data_type in FP8_TYPES for i in model.graph.initializer)


# ----------------------------------------------------------------------------------------------------------------
# Calibration ranges (the calibration artifact)
# ----------------------------------------------------------------------------------------------------------------


def calibration_ranges(model: Any, mode: str) -> dict[str, Any]:
    """Per activation tensor: the scale in the graph and the amax it encodes; per weight: per-channel amax range.

    Read back from the Q/DQ scale initializers, so the file describes exactly what the engine will use.
    """
    from onnx import numpy_helper

    kind = "fp8" if mode == "fp8" else "int8"
    producers, inits = _producers(model), _initializers(model)
    activations: dict[str, Any] = {}
    weights: dict[str, Any] = {}
    for node in model.graph.node:
        if node.op_type not in QDQ_OPS or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float64)
        source = node.input[0]
        if node.op_type == "QuantizeLinear" and source not in inits and scale.size == 1:
            _add_activation(activations, node, float(scale.reshape(())), kind)
        elif node.op_type == "DequantizeLinear" and source in producers and producers[source].op_type == "QuantizeLinear":
            weight = producers[source].input[0]
            if weight in inits:
                weights[weight] = _weight_entry(node, scale, kind)
        elif node.op_type == "DequantizeLinear" and source in inits:
            weights[source] = _weight_entry(node, scale, "int8" if inits[source].data_type == ONNX_INT8 else kind)
    return {"mode": mode, "qtype": kind, "qmax": QMAX[kind], "amax_per_scale": AMAX_PER_SCALE[kind],
            "convention": _CONVENTION[kind], "activations": activations, "weights": weights}


_CONVENTION = {
    "int8": "symmetric: scale = amax / 127, values beyond amax saturate at 127",
    "fp8": "ModelOpt 0.47: scale = (amax / 127) * 448 / 127, so amax maps to 36.0 and values saturate at "
           "scale * 448 (12.4x amax)",
}


def _add_activation(activations: dict[str, Any], node: Any, scale: float, kind: str) -> None:
    """Key by the fp32 graph's tensor name, which ORT encodes in the scale name (`<tensor>_scale`, `_scale_1`
    after ModelOpt's fp16 pass duplicates shared scales); the Q input may be a cast of it."""
    match = re.fullmatch(r"(.+)_scale(?:_\d+)?", node.input[1])
    tensor = match.group(1) if match else node.input[0]
    entry = activations.setdefault(tensor, {"quantize_nodes": [], "quantize_input": node.input[0],
                                            "scale_initializer": node.input[1], "scale": scale,
                                            "amax": scale * AMAX_PER_SCALE[kind], "saturates_at": scale * QMAX[kind]})
    entry["quantize_nodes"].append(node.name)
    if not np.isclose(entry["scale"], scale, rtol=1e-6):
        raise ForgeError(f"tensor {tensor} has two activation scales: {entry['scale']} and {scale}")


def _weight_entry(node: Any, scale: np.ndarray, kind: str) -> dict[str, Any]:
    amax = scale.reshape(-1) * AMAX_PER_SCALE[kind]
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    return {"dequantize_node": node.name, "qtype": kind, "axis": int(axis) if scale.size > 1 else None,
            "channels": int(scale.size), "amax_min": float(amax.min()), "amax_max": float(amax.max())}


def write_calibration_cache(ranges: Mapping[str, Any], path: Path) -> str:
    """TensorRT-style cache (`tensor: big-endian float32 scale`), the format ModelOpt's `calibration_cache_path` reads.

    ModelOpt maps entry `<tensor>` onto the scale initializer `<tensor>_scale` of ORT's fp32 Q/DQ graph, before
    its own fp16/bf16 pass, so the keys are fp32 tensor names whichever high precision the graph ends in.
    """
    lines = ["TRT-forge-ModelOpt-int8-max-or-entropy"]
    for tensor, entry in sorted(ranges["activations"].items()):
        lines.append(f"{tensor}: {struct.pack('!f', entry['scale']).hex()}")
    path.write_text("\n".join(lines) + "\n")
    return path.name


def read_calibration_cache(path: Path) -> dict[str, float]:
    """Inverse of :func:`write_calibration_cache`: tensor -> scale."""
    entries = {}
    for line in path.read_text().splitlines()[1:]:
        tensor, value = line.rsplit(": ", 1)
        entries[tensor] = struct.unpack("!f", bytes.fromhex(value))[0]
    return entries


# ----------------------------------------------------------------------------------------------------------------
# Running the quantized graph on ONNX Runtime (CPU) for validation
# ----------------------------------------------------------------------------------------------------------------


def onnxruntime_cpu_note(model: Any) -> dict[str, Any]:
    """What ONNX Runtime on CPU can do with this graph, so validation says how it ran (or why it cannot)."""
    if any(i.data_type == ONNX_BFLOAT16 for i in model.graph.initializer):
        return {"runs": False, "why": "ORT CPU has no bfloat16 QuantizeLinear/DequantizeLinear kernels; "
                                      "validate a fp16 or fp32 high-precision build instead"}
    if has_fp8(model):
        return {"runs": True, "graph_optimization": "disabled",
                "why": "ORT's QDQ fusions turn FP8 Q/DQ into MatMulIntegerToFloat, which rejects float8 inputs; "
                       "with optimizations off every QuantizeLinear/DequantizeLinear runs as written (real FP8 "
                       "rounding, not a simulation)"}
    return {"runs": True, "graph_optimization": "default"}


def onnxruntime_session(path: Path | str) -> Any:
    """A CPU InferenceSession that can run this quantized graph; raises ForgeError where ORT CPU cannot."""
    import onnx
    import onnxruntime as ort

    note = onnxruntime_cpu_note(onnx.load(str(path), load_external_data=False))
    if not note["runs"]:
        raise fail(path, "validate", note["why"])
    options = ort.SessionOptions()
    if note["graph_optimization"] == "disabled":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


# ----------------------------------------------------------------------------------------------------------------
# What TensorRT-RTX made of it (build-time layer information; needs no GPU)
# ----------------------------------------------------------------------------------------------------------------


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
