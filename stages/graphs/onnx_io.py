"""Saving ONNX models the same way everywhere: deterministic node order, external data past protobuf's limit.

Tools such as ModelOpt AutoCast build graphs by iterating Python sets, so the same inputs give the same graph
in a different node order from one process to the next. Outputs enter downstream store keys by content, so
the forge writes graphs in one canonical topological order: identical graphs, identical bytes.
"""

from __future__ import annotations

import heapq
from pathlib import Path
from typing import Any

PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2


def canonical_order(graph: Any) -> None:
    """Reorder `graph.node` topologically, breaking ties by node name (then op, inputs, outputs), in place."""
    nodes = list(graph.node)
    producers: dict[str, int] = {}
    for index, node in enumerate(nodes):
        for output in node.output:
            producers[output] = index
    waiting = [0] * len(nodes)
    consumers: dict[int, list[int]] = {}
    for index, node in enumerate(nodes):
        for source in {producers[i] for i in node.input if i in producers and producers[i] != index}:
            waiting[index] += 1
            consumers.setdefault(source, []).append(index)

    def rank(index: int) -> tuple[Any, ...]:
        node = nodes[index]
        return (node.name, node.op_type, tuple(node.input), tuple(node.output), index)

    ready = [rank(i) for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)[-1]
        order.append(index)
        for consumer in consumers.get(index, []):
            waiting[consumer] -= 1
            if waiting[consumer] == 0:
                heapq.heappush(ready, rank(consumer))
    if len(order) != len(nodes):
        return  # a cycle (not a valid ONNX graph): leave the order as the tool wrote it
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    value_info = sorted(graph.value_info, key=lambda v: v.name)
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def save_model(model: Any, path: Path) -> None:
    """Canonical node order; external data (beside the file) when the model would pass protobuf's 2 GB limit."""
    import onnx

    canonical_order(model.graph)
    try:
        external = model.ByteSize() > PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - protobuf raises EncodeError (not ValueError) past 2 GB
        external = True
    onnx.save_model(model, str(path), save_as_external_data=external, location=f"{path.name}.data")
