"""Engines split by block ranges: consecutive parts of the very graph an engine is built from, one engine each.

Why: TensorRT's builder holds about 3x the weight bytes it builds (the fp16 release transformer: ~116 GB of RAM);
a part holding blocks i..j needs only its own weights' worth, so a 16 GB machine builds any size in parts.

Parts are cut where block-wise validation cuts (stages.graphs.blockwise segments): part 0 is the prologue and the
first blocks, the last part the last blocks and the epilogue. What crosses a cut as an engine input or output are
the activation streams (tens of MB). Tensors computed from the graph's inputs alone without weights (shape values,
masks, rotary tables) are computed again inside each part that reads them, so no part has shape-tensor inputs
(which TensorRT would need profile values for) and the chained parts compute exactly what the whole graph does.
"""

from __future__ import annotations

import ast
import hashlib
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import fail
from stages.graphs.blockwise import initializer_bytes, link_external_data, partition

MAX_RECOMPUTED_NODES = 256  # a weight-free chain longer than this is handed over instead of computed again


@dataclass(frozen=True)
class PartPlan:
    """One part: its blocks, the graph nodes it runs (by position) and the tensors it takes and hands on."""

    index: int
    count: int
    blocks: tuple[int, ...]
    nodes: tuple[int, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"part {self.index}"


def block_ranges(blocks: Sequence[int], count: int) -> list[tuple[int, ...]]:
    """`count` consecutive ranges whose sizes differ by at most one; the larger ones last, since part 0 also holds
    the prologue (the text encoder's token embedding)."""
    if not 1 <= count <= len(blocks):
        raise ValueError(f"{count} parts for {len(blocks)} blocks; allowed: 1 to {len(blocks)}")
    base, extra = divmod(len(blocks), count)
    ranges, start = [], 0
    for index in range(count):
        size = base + (1 if index >= count - extra else 0)
        ranges.append(tuple(blocks[start:start + size]))
        start += size
    return ranges


def plan_parts(model: Any, block_pattern: str, count: int) -> list[PartPlan]:
    """Cut `model` (weights not loaded) into `count` parts of consecutive blocks."""
    cut = partition(model, block_pattern)
    blocks = [s.block for s in cut.segments if s.block is not None]
    if count > len(blocks):
        raise fail("engine", "build.parts", f"{count} parts for a graph of {len(blocks)} blocks; allowed: 1 to {len(blocks)}")
    ranges = block_ranges(blocks, count)
    part_of_block = {block: index for index, blocks_in in enumerate(ranges) for block in blocks_in}
    members: list[set[int]] = [set() for _ in ranges]
    seen_block = False
    for segment in cut.segments:
        if segment.block is not None:
            seen_block = True
            members[part_of_block[segment.block]].update(segment.members)
        else:
            members[-1 if seen_block else 0].update(segment.members)
    graph = _GraphIndex(model)
    needs = [graph.needs(own) for own in members]
    later_inputs = [set().union(*(n[1] for n in needs[index + 1:])) for index in range(count)]
    outputs = {o.name for o in model.graph.output}
    plans = []
    for index, (own, (recomputed, inputs)) in enumerate(zip(members, needs)):
        produced = {o for position in own for o in model.graph.node[position].output if o}
        handed = sorted(t for t in produced if t in later_inputs[index] or t in outputs)
        nodes = tuple(sorted(own | recomputed))
        read = {i for position in nodes for i in model.graph.node[position].input}
        taken = (*(i.name for i in model.graph.input if i.name in read), *sorted(inputs))
        plans.append(PartPlan(index, count, ranges[index], nodes, taken, tuple(handed)))
    return plans


class _GraphIndex:
    """Producers, initializers and declared types of one graph, for deciding what each part takes or recomputes."""

    def __init__(self, model: Any) -> None:
        graph = model.graph
        self.nodes = list(graph.node)
        self.producer = {o: position for position, node in enumerate(self.nodes) for o in node.output if o}
        self.weights = {i.name for i in graph.initializer if len(i.dims) >= 2}
        self.available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}

    def needs(self, own: set[int]) -> tuple[set[int], set[str]]:
        """(nodes to compute again, tensors to take as inputs) for a part running the nodes `own`."""
        available = self.available | {o for p in own for o in self.nodes[p].output}
        recomputed: set[int] = set()
        inputs: set[str] = set()
        for position in sorted(own):
            for name in self.nodes[position].input:
                if name in available or name in inputs:
                    continue
                chain = self._weightless_chain(name, available | inputs, own | recomputed)
                if chain is None:
                    inputs.add(name)
                    continue
                nodes, taken = chain
                recomputed |= nodes
                inputs |= taken
                available |= {o for p in nodes for o in self.nodes[p].output}
        return recomputed, inputs

    def _weightless_chain(self, name: str, available: set[str], present: set[int]
                          ) -> tuple[set[int], set[str]] | None:
        """(nodes computing `name` from available tensors and small constants, tensors it takes), or None when it
        reads weights or is long (the part takes `name` as an input instead). A Shape of a tensor that is not cheap
        to compute takes that tensor: the part hands on activations, never shape values."""
        found: set[int] = set()
        taken: set[str] = set()
        stack = [name]
        while stack:
            tensor = stack.pop()
            if tensor in available or tensor in taken:
                continue
            position = self.producer.get(tensor)
            if position is None or len(found) > MAX_RECOMPUTED_NODES:
                return None
            if position in present or position in found:
                continue
            node = self.nodes[position]
            if any(i in self.weights for i in node.input):
                return None
            found.add(position)
            if node.op_type == "Shape" and node.input[0] not in available:
                inner = self._weightless_chain(node.input[0], available | taken, present | found)
                if inner is None:
                    taken.add(node.input[0])
                else:
                    found |= inner[0]
                    taken |= inner[1]
                continue
            stack.extend(node.input)
        return found, taken


def _declared(graph: Any) -> dict[str, Any]:
    """Every typed tensor of the graph (inputs, inferred intermediates, outputs) by name."""
    return {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}


def extract(model: Any, plan: PartPlan) -> Any:
    """The part's graph (weights stay where the model's external data says): its nodes in graph order, the
    initializers they read, typed inputs and outputs."""
    import onnx

    graph = model.graph
    declared = _declared(graph)
    missing = [name for name in (*plan.inputs, *plan.outputs) if name not in declared]
    if missing:
        raise fail("engine", "parts", f"no declared type for {missing[:3]} crossing the cut after {plan.name} "
                   "(the precision graph lacks shape inference)")
    nodes = [graph.node[position] for position in plan.nodes]
    read = {i for node in nodes for i in node.input}
    part = onnx.helper.make_graph(
        nodes, f"{graph.name}_part{plan.index}",
        [declared[name] for name in plan.inputs], [declared[name] for name in plan.outputs],
        [i for i in graph.initializer if i.name in read],
        value_info=[v for v in graph.value_info if v.name in read and v.name not in plan.inputs])
    result = onnx.helper.make_model(part, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    result.functions.extend(model.functions)
    return result


def graph_digest(model: Any) -> str:
    """sha256 of a part graph's structure (weights by reference): what validation checks it runs."""
    return hashlib.sha256(model.SerializeToString()).hexdigest()


def write_part(onnx_path: Path, plan: PartPlan, work: Path, model: Any | None = None) -> tuple[Path, str]:
    """The part's graph as `work/part_<i>.onnx` beside hardlinks of the graph's external data; (path, digest)."""
    import onnx

    model = model if model is not None else onnx.load(str(onnx_path), load_external_data=False)
    link_external_data(model, onnx_path.parent, work)
    sub = extract(model, plan)
    path = work / f"part_{plan.index:03d}.onnx"
    onnx.save_model(sub, str(path))
    return path, graph_digest(sub)


# --- profiles of the tensors crossing a cut ----------------------------------------------------------------------------

_OPERATORS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
              ast.Div: operator.floordiv, ast.Mod: operator.mod}


def _evaluate(expression: str, values: Mapping[str, int]) -> int:
    """A symbolic dimension such as `img_tokens + 256` or `2*batch` at concrete symbol values."""

    def walk(node: ast.AST) -> int:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in values:
            return values[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
            return _OPERATORS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(expression)

    return walk(ast.parse(expression, mode="eval"))


def input_profiles(model: Any, plan: PartPlan, graph_shapes: Mapping[str, Sequence[Sequence[int]]]
                   ) -> dict[str, list[tuple[int, ...]]]:
    """(min, opt, max) shapes of every input of the part: the profile's for graph inputs, and for tensors handed
    over from an earlier part their declared dimensions evaluated at the graph inputs' min, opt and max."""
    graph = model.graph
    symbols: list[dict[str, int]] = [{}, {}, {}]
    for value in graph.input:
        shapes = graph_shapes.get(value.name)
        if shapes is None:
            continue
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if dim.dim_param:
                for level in range(3):
                    symbols[level].setdefault(dim.dim_param, int(shapes[level][axis]))
    declared = _declared(graph)
    profiles, undetermined = {}, []
    for name in plan.inputs:
        if name in graph_shapes:
            profiles[name] = [tuple(int(d) for d in shape) for shape in graph_shapes[name]]
            continue
        dims = declared[name].type.tensor_type.shape.dim
        try:
            profiles[name] = [tuple(_dimension(dim, symbols[level]) for dim in dims) for level in range(3)]
        except ValueError:
            undetermined.append(name)
    if undetermined:
        levels = [_concrete_shapes(model, {n: s[level] for n, s in graph_shapes.items()}, undetermined)
                  for level in range(3)]
        for name in undetermined:
            if any(name not in shapes for shapes in levels):
                raise fail("engine", "parts", f"{name} (handed to {plan.name}) has a shape that the profile does not "
                           f"determine (declared {[d.dim_param or d.dim_value for d in declared[name].type.tensor_type.shape.dim]}, "
                           f"known: {', '.join(sorted(symbols[0]))})")
            profiles[name] = [shapes[name] for shapes in levels]
    return profiles


def _concrete_shapes(model: Any, shapes: Mapping[str, Sequence[int]], names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Shapes of `names` with every graph input at a concrete shape, by ONNX shape inference with data propagation:
    a shape the declared dimensions leave open (`unk__79` after a pass re-inferred shapes) is still determined."""
    import onnx

    concrete = onnx.ModelProto()
    concrete.CopyFrom(model)
    concrete.graph.ClearField("value_info")
    for value in concrete.graph.input:
        if value.name in shapes:
            for dim, size in zip(value.type.tensor_type.shape.dim, shapes[value.name]):
                dim.Clear()
                dim.dim_value = int(size)
    found = _fixed_shapes(onnx.shape_inference.infer_shapes(concrete, data_prop=True), names)
    if set(names) - set(found):
        found = {**_symbolic_shapes(concrete, names), **found}
    return found


def _fixed_shapes(model: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    found = {}
    for value in (*model.graph.value_info, *model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if value.name in names and dims and all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
            found[value.name] = tuple(int(d.dim_value) for d in dims)
    return found


def _symbolic_shapes(model: Any, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """ONNX Runtime's symbolic shape inference, for what ONNX's leaves open: a mask built with `Range` from a
    shape loses the batch in ONNX's data propagation (the release text encoder's residual stream, `unk__74`).
    Weights stored outside the graph enter as typed inputs: their shapes are all it needs, no bytes are read."""
    import onnx
    from onnx import helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    light = onnx.ModelProto()
    light.CopyFrom(model)
    inline = [t for t in light.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    light.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL)
    light.graph.ClearField("initializer")
    light.graph.initializer.extend(inline)
    try:
        inferred = SymbolicShapeInference.infer_shapes(light, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - an op it does not know: the caller names the tensor it could not place
        return {}
    return _fixed_shapes(inferred, names) if inferred is not None else {}


def _dimension(dim: Any, values: Mapping[str, int]) -> int:
    if dim.HasField("dim_value"):
        return int(dim.dim_value)
    if not dim.dim_param or not re.fullmatch(r"[\w\s+\-*/%()]+", dim.dim_param):
        raise ValueError(repr(dim.dim_param or "?"))
    try:
        return _evaluate(dim.dim_param, values)
    except (ValueError, SyntaxError, ZeroDivisionError):
        raise ValueError(repr(dim.dim_param)) from None


def weight_share(model: Any, plan: PartPlan) -> float:
    """The part's fraction of the graph's initializer bytes (its share of a weight-streaming budget)."""
    read = {i for position in plan.nodes for i in model.graph.node[position].input}
    sizes = {t.name: initializer_bytes(t) for t in model.graph.initializer}
    total = sum(sizes.values())
    return sum(size for name, size in sizes.items() if name in read) / total if total else 1.0


def io_contract(model: Any, plan: PartPlan, profiles: Mapping[str, Sequence[Sequence[int]]]) -> dict[str, Any]:
    """The part's runtime contract: each input (a graph input, or a tensor an earlier part hands on) and each
    output with its dtype, declared shape and, for inputs, the profile's min/opt/max."""
    import onnx

    graph = model.graph
    declared = _declared(graph)
    graph_inputs = {i.name for i in graph.input}
    graph_outputs = {o.name for o in graph.output}

    def describe(name: str) -> dict[str, Any]:
        kind = declared[name].type.tensor_type
        return {"name": name, "dtype": onnx.TensorProto.DataType.Name(kind.elem_type).lower(),
                "shape": [d.dim_param or d.dim_value for d in kind.shape.dim]}

    inputs = [{**describe(name), "from": "graph input" if name in graph_inputs else "an earlier part",
               "profile": {"min": list(profiles[name][0]), "opt": list(profiles[name][1]), "max": list(profiles[name][2])}}
              for name in plan.inputs]
    outputs = [{**describe(name), "to": "graph output" if name in graph_outputs else "later parts"}
               for name in plan.outputs]
    return {"inputs": inputs, "outputs": outputs}
