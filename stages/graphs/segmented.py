"""Graph passes one block at a time: cut a graph at its repeated blocks, transform each piece, stitch them back.

Why: tools such as ModelOpt AutoCast and its quantizer scan the whole graph for every node they touch (time grows
with the square of the layer count: 13 s of 15 s at 8 transformer layers went to consumer lookups), and the
quantizer needs every weight in memory. Run on one segment (prologue, one block, epilogue) at a time, both
cost what one block costs, times the number of blocks.

Segments come from :func:`stages.graphs.blockwise.partition`; each is extracted with its boundary tensors as inputs and
outputs. Tools keep a segment's input and output types (``keep_io_types``), so a low-precision stream crossing
a cut leaves one block as ``Cast(to fp32)`` and enters the next as ``Cast(to fp16)``: :func:`fold_cast_roundtrips`
removes those pairs (fp16 -> fp32 -> fp16 is exact), leaving what a whole-graph pass would have written.
Tools name what they add after the tensor it belongs to, so two segments reading the same graph input may both
add, say, ``timestep_cast_to_fp16``: identical nodes are kept once, different ones renamed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stages.graphs.blockwise import Partition, Segment

SegmentPass = Callable[[int, Segment, Any], Any]  # (index, segment, weightless segment model) -> new model
IO_CAST_IDENTITY = "__io_cast_identity"  # AutoCast's Identity after a Cast from a graph input to a graph output
EXACT_ROUNDTRIPS = {(10, 1), (16, 1)}  # (narrow, wide) ONNX dtypes: fp16 -> fp32 -> fp16, bf16 -> fp32 -> bf16


def transform_segments(model: Any, part: Partition, transform: SegmentPass,
                       progress: Callable[[int, int], None] | None = None) -> Any:
    """Apply `transform` to every segment of `model` (weights not loaded) and return the stitched graph."""
    import onnx
    from onnx.utils import Extractor

    extractor = Extractor(model)
    pieces = []
    for index, segment in enumerate(part.segments):
        piece = extractor.extract_model(list(segment.inputs), list(segment.outputs))
        pieces.append(transform(index, segment, piece))
        if progress is not None:
            progress(index + 1, len(part.segments))
    stitched = onnx.shape_inference.infer_shapes(stitch(model, pieces))
    fold_cast_roundtrips(stitched)
    _drop_io_cast_identities(stitched)
    stitched.graph.ClearField("value_info")
    return onnx.shape_inference.infer_shapes(stitched)


def stitch(original: Any, pieces: list[Any]) -> Any:
    """One graph from the transformed segments: the original's inputs, outputs and opsets, the pieces' nodes."""
    import onnx

    model = onnx.ModelProto()
    model.CopyFrom(original)
    graph = model.graph
    for field in ("node", "initializer", "value_info"):
        graph.ClearField(field)
    producers: dict[str, bytes] = {}
    initializers: dict[str, Any] = {}
    node_names: set[str] = set()
    for number, piece in enumerate(pieces):
        renamed: dict[str, str] = {}
        for tensor in piece.graph.initializer:
            seen = initializers.get(tensor.name)
            if seen is not None and seen.SerializeToString() == tensor.SerializeToString():
                continue
            if seen is not None:
                renamed[tensor.name] = _fresh(tensor.name, number, initializers)
                tensor = _renamed_copy(tensor, renamed[tensor.name])
            initializers[tensor.name] = tensor
        for node in piece.graph.node:
            node = _rewired(node, renamed)
            signature = _signature(node)
            if node.output and all(producers.get(o) == signature for o in node.output):
                continue  # the same node, added by an earlier segment (a cast of a shared input)
            for position, output in enumerate(node.output):
                if output and output in producers:
                    renamed[output] = _fresh(output, number, producers)
                    node.output[position] = renamed[output]
                producers[node.output[position]] = signature
            if node.name in node_names:
                node.name = _fresh(node.name, number, node_names)
            node_names.add(node.name)
            graph.node.append(node)
        for opset in piece.opset_import:
            if all(o.domain != opset.domain for o in model.opset_import):
                model.opset_import.append(opset)
    graph.initializer.extend(initializers.values())
    return model


def fold_cast_roundtrips(model: Any) -> int:
    """Remove Cast(narrow -> wide) -> Cast(wide -> narrow) pairs: readers of the second read the first's input.

    The first cast stays while something else (an fp32 island, a graph output) still reads its output.
    Returns how many casts were removed."""
    graph = model.graph
    producer = {o: node for node in graph.node for o in node.output}
    dtypes = _known_dtypes(model, producer)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    outputs = {o.name for o in graph.output}
    removed: set[int] = set()
    for node in list(graph.node):
        first = producer.get(node.input[0]) if node.op_type == "Cast" and node.input else None
        if first is None or first.op_type != "Cast" or node.output[0] in outputs:
            continue
        narrow, wide = dtypes.get(first.input[0]), _cast_to(first)
        if (narrow, wide) not in EXACT_ROUNDTRIPS or _cast_to(node) != narrow:
            continue
        for reader in consumers.get(node.output[0], []):
            reader.input[:] = [first.input[0] if i == node.output[0] else i for i in reader.input]
            consumers.setdefault(first.input[0], []).append(reader)
        consumers[first.output[0]] = [c for c in consumers.get(first.output[0], []) if c is not node]
        removed.add(id(node))
        if not consumers[first.output[0]] and first.output[0] not in outputs:
            removed.add(id(first))
    kept = [node for node in graph.node if id(node) not in removed]
    del graph.node[:]
    graph.node.extend(kept)
    return len(removed)


def _drop_io_cast_identities(model: Any) -> None:
    """AutoCast puts an Identity after a Cast from a segment input to a segment output; inside the stitched graph
    that tensor is neither, so the Cast writes the Identity's output again and the Identity goes."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    dropped = [node for node in graph.node if node.op_type == "Identity" and node.name.endswith(IO_CAST_IDENTITY)
               and node.output[0] not in outputs]
    renamed = {node.input[0]: node.output[0] for node in dropped}
    kept = [node for node in graph.node if all(node is not gone for gone in dropped)]
    for node in kept:
        node.output[:] = [renamed.get(o, o) for o in node.output]
        node.input[:] = [renamed.get(i, i) for i in node.input]
    del graph.node[:]
    graph.node.extend(kept)


def _known_dtypes(model: Any, producer: dict[str, Any]) -> dict[str, int]:
    types = {v.name: v.type.tensor_type.elem_type for v in (*model.graph.input, *model.graph.value_info)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    types.update({o: _cast_to(n) for o, n in producer.items() if n.op_type == "Cast"})
    return types


def _cast_to(node: Any) -> int | None:
    return next((a.i for a in node.attribute if a.name == "to"), None)


def _signature(node: Any) -> bytes:
    import onnx

    unnamed = onnx.NodeProto()
    unnamed.CopyFrom(node)
    unnamed.name = ""
    return unnamed.SerializeToString()


def _rewired(node: Any, renamed: dict[str, str]) -> Any:
    import onnx

    copy = onnx.NodeProto()
    copy.CopyFrom(node)
    copy.input[:] = [renamed.get(i, i) for i in copy.input]
    return copy


def _renamed_copy(tensor: Any, name: str) -> Any:
    import onnx

    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _fresh(name: str, number: int, taken: Any) -> str:
    candidate, suffix = f"{name}__segment{number}", 1
    while candidate in taken:
        candidate, suffix = f"{name}__segment{number}_{suffix}", suffix + 1
    return candidate
