"""bf16 GEMMs in a graph: the frozen text branch's storage (precision.frozen_storage: bf16), and how ONNX Runtime's
CPU provider, which has no bf16 compute kernels, runs them.

Why bf16 for the frozen text branch: it is half of each transformer block's weights. Kept fp32, TensorRT stores
those weights in fp32 (the fp16 release engine is 61.0 GB, not 40.9). bf16 is the checkpoint's own dtype and has
fp32's range, so the branch still cannot overflow the way fp16 could, and its weights are stored as the checkpoint
holds them. Only the GEMMs that read a weight change: their inputs are cast to bf16, they compute in bf16 (TensorRT
accumulates in fp32) and their output is cast back to fp32, where the rest of the branch (norms, attention,
residuals) keeps computing. A weight enters through the same Transpose/Cast chain as before plus a Cast to bf16;
TensorRT folds the chain into one bf16 constant, so nothing of the checkpoint is rewritten.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from stages.graphs.qdq import ONNX_BFLOAT16 as BFLOAT16
from stages.graphs.qdq import node_producers

GEMMS = ("MatMul", "Gemm")
WEIGHT_PATH_OPS = ("Cast", "Transpose", "Reshape", "Identity")
# ops ORT CPU runs for every element type (they move or index values, compute nothing)
ANY_TYPE_OPS = (*WEIGHT_PATH_OPS, "Shape", "Size", "Concat", "Slice", "Squeeze", "Unsqueeze", "Gather", "Expand",
                "Flatten", "Split")
FLOAT = 1


def reads_weight(tensor: str, producers: dict[str, Any], initializers: set[str]) -> bool:
    """Whether a tensor is a checkpoint weight seen through layout/dtype nodes only (a constant TensorRT folds)."""
    while tensor not in initializers:
        node = producers.get(tensor)
        if node is None or node.op_type not in WEIGHT_PATH_OPS:
            return False
        tensor = node.input[0]
    return True


def _cast(name: str, source: str, target: str, to: int) -> Any:
    from onnx import helper

    return helper.make_node("Cast", [source], [target], name=name, to=to)


def gemms_to_bf16(model: Any, nodes: Iterable[str]) -> list[str]:
    """Rewrite the named fp32 GEMMs that read a weight to compute in bf16 (in place); returns the names rewritten.

    Every float input gets a Cast to bf16 (the weight's folds away at build time), the GEMM's output is renamed and
    a Cast back to fp32 produces the original name, so consumers and value names outside stay as they were."""
    wanted = set(nodes)
    producers = node_producers(model)
    initializers = {init.name for init in model.graph.initializer}
    chosen = [position for position, node in enumerate(model.graph.node)
              if node.name in wanted and node.op_type in GEMMS
              and any(reads_weight(t, producers, initializers) for t in node.input[:2])]
    names = [model.graph.node[position].name for position in chosen]
    _wrap(model, set(chosen), "bf16", inside=BFLOAT16, outside=FLOAT)
    return names


def _wrap(model: Any, positions: set[int], tag: str, inside: int, outside: int) -> None:
    """Cast every input of the nodes at `positions` to `inside` and their first output back to `outside`, under
    the output's original name (in place)."""
    out: list[Any] = []
    for position, node in enumerate(model.graph.node):
        if position not in positions:
            out.append(node)
            continue
        for index, tensor in enumerate(node.input):
            if tensor:
                cast = f"{node.name}/{tag}_in{index}"
                out.append(_cast(cast, tensor, f"{cast}:0", inside))
                node.input[index] = f"{cast}:0"
        result = node.output[0]
        node.output[0] = f"{node.name}/{tag}:0"
        out += [node, _cast(f"{node.name}/{tag}_out", node.output[0], result, outside)]
    del model.graph.node[:]
    model.graph.node.extend(out)


def bf16_compute_nodes(model: Any) -> list[str]:
    """Names of the nodes that compute on a bf16 input (not casts, layout or indexing): what ORT CPU has no
    kernel for."""
    return [model.graph.node[position].name for position in _bf16_compute_positions(model)]


def _bf16_compute_positions(model: Any) -> list[int]:
    types = _tensor_types(model)
    return [position for position, node in enumerate(model.graph.node)
            if node.op_type not in ANY_TYPE_OPS and any(types.get(t) == BFLOAT16 for t in node.input)]


def as_fp32_between_bf16_roundings(model: Any) -> int:
    """What ORT CPU runs for a graph with bf16 GEMMs (in place): each bf16 node computes in fp32 on its bf16 inputs
    (exact in fp32) and its output is rounded to bf16 again, which is a bf16 GEMM with fp32 accumulation, as
    TensorRT computes it, up to summation order. Returns how many nodes were wrapped."""
    positions = set(_bf16_compute_positions(model))
    _wrap(model, positions, "as_fp32", inside=FLOAT, outside=BFLOAT16)
    model.graph.ClearField("value_info")
    return len(positions)


def _tensor_types(model: Any) -> dict[str, int]:
    """Element type of every tensor the graph declares or a Cast fixes (enough to find bf16 operands)."""
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in (*model.graph.input, *model.graph.value_info, *model.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for node in model.graph.node:
        if node.op_type == "Cast":
            types[node.output[0]] = next(a.i for a in node.attribute if a.name == "to")
    return types
