"""Facts about Q/DQ graphs the quantize stage writes and checks, and the calibration-range artifact's format.

Pure functions over ONNX protos: which nodes are quantized, which excluded node still reads a dequantized
tensor, which tensors carry the attention mask's float32-min sentinels, the per-tensor ranges ModelOpt chose,
and the TensorRT-style calibration cache written from them.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stages.errors import ForgeError

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

# ----------------------------------------------------------------------------------------------------------------
# Graph facts
# ----------------------------------------------------------------------------------------------------------------


def node_producers(model: Any) -> dict[str, Any]:
    """The node producing each tensor, by tensor name."""
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
    producers = node_producers(model)
    return [(node.name, tensor) for node in model.graph.node if node.name in names
            for tensor in node.input if tensor in producers and producers[tensor].op_type == "DequantizeLinear"]


def detach_excluded(model: Any, excluded: set[str]) -> list[dict[str, str]]:
    """Point excluded nodes at the tensor a shared activation Q/DQ pair was made from; drop dead Q/DQ nodes."""
    producers = node_producers(model)
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


def bypass_inputs(model: Any, inputs: Iterable[tuple[str, str]]) -> int:
    """Point each (consumer, tensor) input that reads `tensor` through an activation Q/DQ pair (and the Casts a
    piece's high-precision conversion puts at its inputs) at the pair's own input; drop dead Q/DQ nodes. Returns
    how many inputs were rewired."""
    wanted: dict[str, set[str]] = {}
    for consumer, tensor in inputs:
        wanted.setdefault(consumer, set()).add(tensor)
    producers = node_producers(model)
    rewired = 0
    for node in model.graph.node:
        for index, tensor in enumerate(node.input):
            source = _qdq_source(producers, tensor) if node.name in wanted else None
            if source is not None and _through_casts(producers, source) in wanted[node.name]:
                node.input[index] = source
                rewired += 1
    _drop_dead_qdq(model)
    return rewired


def _through_casts(producers: Mapping[str, Any], tensor: str) -> str:
    while (node := producers.get(tensor)) is not None and node.op_type == "Cast":
        tensor = node.input[0]
    return tensor


def unquantized_outputs(model: Any) -> int:
    """Make every graph output carry its unquantized value again; returns how many were changed.

    ONNX Runtime's quantizer, meeting a graph output it quantizes, renames the producer's tensor and gives the
    output's name to the DequantizeLinear. For a segment quantized on its own (stages.graphs.segmented) that output
    crosses into the next block, which must see the value every other reader sees: the producer gets the name
    back and the readers inside the segment read `<name>_DequantizeLinear_Output`, the name the next segment's
    own Q/DQ of that tensor gets, so the two pairs are one after stitching."""
    producers = node_producers(model)
    changed = 0
    for output in [o.name for o in model.graph.output]:
        raw = _qdq_source(producers, output)
        if raw is None or raw == output:
            continue
        dequantized = f"{output}_DequantizeLinear_Output"
        for node in model.graph.node:
            node.input[:] = [dequantized if i == output else output if i == raw else i for i in node.input]
            node.output[:] = [dequantized if o == output else output if o == raw else o for o in node.output]
        changed += 1
    return changed


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
    producers = node_producers(model)
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
    producers, inits = node_producers(model), _initializers(model)
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
    producers, inits = node_producers(model), _initializers(model)
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
