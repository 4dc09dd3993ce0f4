"""LoRA branches as graph inputs: `y = x W^T + b + ((x D) * s) U` beside chosen linears, D, U and s fed at run time.

One graph (and so one engine) then serves the base model and any LoRA of rank up to R: `D` [in, R] is the LoRA's
`A^T` and `U` [R, out] its `B^T` (scaled), zero-padded to R, and `s` [R] holds each rank slot's scale. With
`s = 0` the branch adds exactly zero after the base linear's own output, so the graph computes the base model bit
for bit; several LoRAs bound at once take consecutive rank slots, each with its own scale. The base weights are
not touched (they stay references to the checkpoint); the branch's nodes are named under the linear's module path,
so block cuts, text-branch freezing and engine parts treat them as part of that linear.

ONNX mechanics only: which linears to branch is the family's and the recipe's business.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

SCALE_INPUT = "lora_scale"
PREFIX = "lora."


def down_input(module: str) -> str:
    return f"{PREFIX}{module}.down"


def up_input(module: str) -> str:
    return f"{PREFIX}{module}.up"


def is_lora_input(name: str) -> bool:
    return name == SCALE_INPUT or name.startswith(PREFIX)


@dataclass(frozen=True)
class Branch:
    module: str  # diffusers module path, e.g. transformer_blocks.0.attn.to_q
    in_features: int
    out_features: int

    def flops_per_token(self, rank: int) -> int:
        return 2 * rank * (self.in_features + self.out_features)

    def input_bytes(self, rank: int) -> int:
        return 2 * rank * (self.in_features + self.out_features)  # fp16 down + up


def add_branches(model: Any, modules: Sequence[str], rank: int) -> list[Branch]:
    """Give each linear (by module path) a LoRA branch of rank `rank`, fed by new graph inputs; in place.

    A linear is found by its weight (an initializer or, while weights are hidden, a graph input) named
    `<...>.<module>.weight`, read through Transpose/Cast by one MatMul or Gemm; the branch's sum replaces the
    linear's output (after its bias Add) for every consumer."""
    from onnx import TensorProto, helper

    graph = model.graph
    weights, consumers = _weights_and_consumers(graph)
    graph.input.append(helper.make_tensor_value_info(SCALE_INPUT, TensorProto.FLOAT, [rank]))
    branches = []
    for module in modules:
        weight = _one_weight(weights, module)
        out_features, in_features = weights[weight]
        linear = _reader(weight, consumers)
        x = linear.input[0]
        y = linear.output[0]
        after = consumers.get(y, [])
        if linear.op_type == "MatMul" and len(after) == 1 and after[0].op_type == "Add" and any(
                _ends_with_bias(name, module) for name in after[0].input):
            y = after[0].output[0]
        scope = linear.name.rsplit("/", 1)[0] + "/lora"
        down, up = down_input(module), up_input(module)
        graph.input.append(helper.make_tensor_value_info(down, TensorProto.FLOAT16, [in_features, rank]))
        graph.input.append(helper.make_tensor_value_info(up, TensorProto.FLOAT16, [rank, out_features]))
        t = {name: f"{scope}/{name}" for name in ("down_f", "up_f", "h", "hs", "delta", "sum")}
        nodes = [
            helper.make_node("Cast", [down], [t["down_f"]], name=f"{scope}/Cast_down", to=TensorProto.FLOAT),
            helper.make_node("Cast", [up], [t["up_f"]], name=f"{scope}/Cast_up", to=TensorProto.FLOAT),
            helper.make_node("MatMul", [x, t["down_f"]], [t["h"]], name=f"{scope}/MatMul_down"),
            helper.make_node("Mul", [t["h"], SCALE_INPUT], [t["hs"]], name=f"{scope}/Mul_scale"),
            helper.make_node("MatMul", [t["hs"], t["up_f"]], [t["delta"]], name=f"{scope}/MatMul_up"),
        ]
        if any(output.name == y for output in graph.output):
            raise ValueError(f"{module}: a graph output is the linear itself; cannot branch it")
        total = helper.make_node("Add", [y, t["delta"]], [t["sum"]], name=f"{scope}/Add")
        for reader in consumers.get(y, []):  # new nodes never read a linear's output, so the map stays right
            reader.input[:] = [t["sum"] if name == y else name for name in reader.input]
        graph.node.extend([*nodes, total])
        branches.append(Branch(module, in_features, out_features))
    _toposort(model)
    return branches


def linear_flops_per_token(model: Any) -> int:
    """FLOPs per token of every linear applied to a token stream (MatMul on a weight; Gemms on a per-call vector,
    such as the modulation's, are not per token): what a LoRA branch's cost is a share of."""
    weights, consumers = _weights_and_consumers(model.graph)
    total = 0
    for name, dims in weights.items():
        if len(dims) != 2 or not all(dims) or is_lora_input(name):
            continue
        try:
            reader = _reader(name, consumers)
        except ValueError:
            continue
        total += 2 * dims[0] * dims[1] if reader.op_type == "MatMul" else 0
    return total


def _weights_and_consumers(graph: Any) -> tuple[dict[str, list[int]], dict[str, list[Any]]]:
    """{name: dims} of every initializer and graph input (weights are inputs while hidden), {tensor: its readers}."""
    weights = {t.name: list(t.dims) for t in graph.initializer}
    weights.update({v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input})
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return weights, consumers


def _ends_with_bias(name: str, module: str) -> bool:
    return name.endswith(f".{module}.bias") or name == f"{module}.bias"


def _one_weight(weights: Mapping[str, list[int]], module: str) -> str:
    pattern = re.compile(rf"(^|\.){re.escape(module)}\.weight$")
    found = [name for name, dims in weights.items() if pattern.search(name) and len(dims) == 2]
    if len(found) != 1:
        raise ValueError(f"{module}: expected one 2-D weight named `{module}.weight` in the graph, found {found}")
    return found[0]


def _reader(weight: str, consumers: Mapping[str, list[Any]]) -> Any:
    """The MatMul/Gemm that reads this weight, through the Transpose/Cast nodes export and precision put on it."""
    name = weight
    for _ in range(4):
        readers = consumers.get(name, [])
        if len(readers) != 1:
            break
        node = readers[0]
        if node.op_type in ("MatMul", "Gemm") and list(node.input).index(name) == 1:
            if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
                break
            return node
        if node.op_type not in ("Transpose", "Cast"):
            break
        name = node.output[0]
    raise ValueError(f"{weight}: not read by one MatMul/Gemm (through Transpose/Cast); not a linear to branch")


def _toposort(model: Any) -> None:
    """Kahn's order over the node list (the new nodes were appended after their readers)."""
    graph = model.graph
    available = {v.name for v in graph.input} | {t.name for t in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                ordered.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            raise ValueError(f"graph has a cycle or a missing input at {rest[0].name}")
        pending = rest
    del graph.node[:]
    graph.node.extend(ordered)


def graph_branches(inputs: Iterable[tuple[str, Sequence[int]]]) -> tuple[int, list[Branch]]:
    """(rank, branches) a graph's declared inputs carry ((name, shape) pairs); (0, []) without LoRA inputs."""
    shapes = dict(inputs)
    if SCALE_INPUT not in shapes:
        return 0, []
    rank = int(shapes[SCALE_INPUT][0])
    branches = []
    for name, shape in shapes.items():
        if name.startswith(PREFIX) and name.endswith(".down"):
            module = name[len(PREFIX):-len(".down")]
            branches.append(Branch(module, int(shape[0]), int(shapes[up_input(module)][1])))
    return rank, branches


def named_feed(values: Mapping[str, Any], names: Iterable[str]) -> dict[str, Any]:
    """The values a graph (a segment, a part) names, LoRA inputs left unbound where absent: its runner makes them
    zeros; any other absent name is a KeyError."""
    return {name: values[name] for name in names if name in values or not is_lora_input(name)}


def unbound_feed(declared: Iterable[tuple[str, Sequence[Any]]]) -> dict[str, Any]:
    """Zeros for every LoRA input a graph declares: `s = 0`, the base model (broadcast views, no memory)."""
    import numpy as np

    feed = {}
    for name, shape in declared:
        if is_lora_input(name):
            dtype = np.float32 if name == SCALE_INPUT else np.float16
            feed[name] = np.broadcast_to(np.zeros((), dtype), tuple(int(d) for d in shape))
    return feed
