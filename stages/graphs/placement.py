"""Where ModelOpt puts activation Q/DQ in a whole graph, decided once on its structure, for quantizing it in pieces.

ModelOpt (0.47) places a calibrated mode's activation Q/DQ by looking at each node's neighbourhood: residual Adds,
fusible partitions, the inputs a partition leaves unquantized. Handed a piece of a block, it sees a graph that ends
at the cut and places other Q/DQ (on the tiny transformer, whole blocks differed from the whole graph on 8 of 72
quantized inputs, 96 KiB pieces on 16). So block-wise calibrated quantization asks ModelOpt's own placement
functions about the whole graph first, on its structure alone: no weight is read, the checkpoint-layout Transpose/Cast chains are
folded as shapes. Each piece is then quantized with its :class:`Share`: the nodes to quantize and
the inputs to leave unquantized; an input whose producer lies in an earlier piece is bypassed after the piece is
quantized (:func:`stages.graphs.qdq.bypass_inputs`), since ModelOpt only removes Q/DQ it can see both ends of.

What stays different from the whole graph: a tensor read across a cut gets one Q/DQ pair per piece that quantizes
it, and a reader in another piece does not share it (ONNX Runtime's quantizer shares one pair between all readers,
so in the whole graph, for example, a LayerNorm reads the Q/DQ its neighbouring residual Add asked for).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

FP8_OP_TYPES = ("Gemm", "MatMul", "Conv", "Add")  # what ModelOpt's fp8 mode quantizes
STRUCTURE_ONLY = "structure-only"  # external-data location of the shape-only tensors folding leaves


@dataclass(frozen=True)
class NodeRef:
    """A node as ModelOpt's `remove_partial_input_qdq` looks at it: its name and op type."""

    name: str
    op: str


@dataclass(frozen=True)
class Share:
    """A piece's part of a :class:`Placement`: its nodes to quantize, its no-quantize inputs with both ends inside
    (for ModelOpt), and the (consumer, tensor) inputs whose producer lies in an earlier piece, to bypass once
    ModelOpt has quantized the piece."""

    nodes: list[str]
    within: list[tuple[NodeRef, NodeRef, str]]
    across: list[tuple[str, str]]
    gemv_checked: bool = False


@dataclass(frozen=True)
class Placement:
    """The whole graph's activation Q/DQ plan: nodes to quantize, and (producer, consumer, tensor) inputs not to."""

    nodes: frozenset[str]
    no_quantize: tuple[tuple[NodeRef, NodeRef, str], ...]
    # ModelOpt's GEMV / small-GEMM exclusions are already subtracted (made by shape inference on the whole graph):
    # a piece's quantizer need not make them again by running the piece with every MatMul output held as a graph
    # output, which at 768x1024 holds several 1 GB attention-score tensors at once (9.8 GB at release width)
    gemv_checked: bool = False

    def share(self, names: Iterable[str]) -> Share:
        """The share of the piece holding the nodes `names`."""
        inside = set(names)
        return Share(sorted(self.nodes & inside),
                     [entry for entry in self.no_quantize if entry[0].name in inside and entry[1].name in inside],
                     [(dst.name, tensor) for src, dst, tensor in self.no_quantize
                      if dst.name in inside and src.name not in inside],
                     self.gemv_checked)


def whole_graph_placement(model: Any, mode: str, excluded: Sequence[str], protected: set[str],
                          shapes: Mapping[str, Sequence[int]]) -> Placement:
    """ModelOpt's placement for `model` (loaded without its weights), as its int8/fp8 `quantize` computes it.

    `protected` nodes keep their weight chains unfolded (as the stage's readable copy keeps them); `shapes` are the
    graph inputs' shapes in the first calibration feed, from which ModelOpt's GEMV and small-GEMM check is made by
    shape inference instead of by running the graph. ModelOpt's MHA check needs a run; each piece's quantizer still
    makes it (its exclusions are subtracted from the piece's share)."""
    import copy

    import onnx_graphsurgeon as gs

    from modelopt.onnx import utils as onnx_utils
    from modelopt.onnx.quantization import graph_utils
    from modelopt.onnx.quantization.int8 import _find_nodes_to_quantize
    from modelopt.onnx.quantization.ort_utils import configure_ort

    structure = copy.deepcopy(model)
    fold_weight_chains(structure, protected)
    structure = onnx_utils.infer_shapes(structure)
    graph = gs.import_onnx(structure)
    graph.toposort()
    _shape_only_values(graph)
    gemms = [node for node in graph.nodes if node.op in ("MatMul", "Gemm")]
    try:
        small, gemv_checked = graph_utils._exclude_matmuls_by_shape_inference(copy.deepcopy(structure), gemms,
                                                                              dict(shapes)), True
    except RuntimeError:
        small, gemv_checked = [], False  # shapes not inferable: each piece's quantizer excludes its own GEMVs
    exclude = graph_utils.find_nodes_to_exclude(graph, [*excluded, *small], None)
    exclude.extend(graph_utils.find_nodes_from_convs_to_exclude(graph, quantize_mode=mode))
    # int8's default is no op-type list: configure_ort then offers every type ONNX Runtime's QDQ quantizer knows
    _, quantizable = configure_ort(list({node.op for node in graph.nodes}), list(FP8_OP_TYPES) if mode == "fp8" else [],
                                   None, ["cpu"])
    nodes, no_quantize = _find_nodes_to_quantize(graph, quantizable, exclude)
    skip = set(exclude)
    return Placement(frozenset(node.name for node in nodes if node.name not in skip),
                     tuple((NodeRef(s.name, s.op), NodeRef(d.name, d.op), tensor) for s, d, tensor in no_quantize),
                     gemv_checked)


def _shape_only_values(graph: Any) -> None:
    """Give every weight a read-only zero-stride array of its shape: ModelOpt's checks read a constant's
    `.values` for its shape, which would otherwise load the data (there is none here)."""
    import numpy as np
    import onnx_graphsurgeon as gs

    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and isinstance(tensor._values, gs.ir.tensor.LazyValues):
            tensor.values = np.broadcast_to(np.zeros((), np.float32), tuple(tensor._values.shape))


def fold_weight_chains(model: Any, protected: set[str]) -> int:
    """Replace Transpose/Cast of an external-data weight by a tensor of the result's shape and dtype, without
    reading any data: the structure ModelOpt sees in the stage's readable copy, where those chains are folded.
    A weight a `protected` (frozen, excluded) node reads stays unfolded, as the readable copy keeps it hidden from
    folding. Returns how many nodes were folded."""
    import onnx

    weights = {t.name: t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    kept = {name for node in model.graph.node if node.name in protected for name in node.input}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    folded, remaining = 0, []
    for node in model.graph.node:
        source = weights.get(node.input[0]) if node.input else None
        if source is None or node.op_type not in ("Transpose", "Cast") or node.input[0] in kept:
            remaining.append(node)
            continue
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        dims, dtype = list(source.dims), source.data_type
        if node.op_type == "Transpose":
            perm = attributes.get("perm", list(reversed(range(len(dims)))))
            dims = [dims[p] for p in perm]
        else:
            dtype = attributes["to"]
        weights[node.output[0]] = shape_only(node.output[0], dims, dtype)
        model.graph.initializer.append(weights[node.output[0]])
        readers[node.input[0]] -= 1
        folded += 1
    del model.graph.node[:]
    model.graph.node.extend(remaining)
    unread = {name for name, count in readers.items() if count == 0}
    alive = [t for t in model.graph.initializer if t.name not in unread]
    del model.graph.initializer[:]
    model.graph.initializer.extend(alive)
    return folded


def shape_only(name: str, dims: Sequence[int], dtype: int) -> Any:
    """An external-data tensor with a shape and dtype and no data anywhere: for analyses that never read it."""
    import onnx

    tensor = onnx.TensorProto(name=name, dims=list(dims), data_type=dtype)
    tensor.data_location = onnx.TensorProto.EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", STRUCTURE_ONLY
    return tensor
