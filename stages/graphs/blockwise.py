"""Block-wise runs of a built graph: the very graph an engine is built from, cut at its repeated blocks.

At release size a transformer is 41 GB of weights; running it whole needs them all in memory. Cut into
segments (prologue, block 0 .. block N-1, epilogue) by the module path in node names, each segment is a
subgraph of the same ONNX (same nodes, same initializers, external data referenced in place), run one at a
time with ONNX Runtime, its outputs chained into the next. The last segment's output is the whole graph's
output; each block's outputs are the per-layer view an accuracy audit needs.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import fail

# `blockwise: auto` turns on above this many checkpoint weight bytes per component: whole-graph runs peaked at ~5x
# (validation: 7.8 GB for a 1.5 GB text encoder) to 13.5x (precision) the weight bytes, and non-engine tasks must
# stay under 6 GB at every checkpoint size; the tiny model (a few MB) still runs whole.
AUTO_BYTES = 384 * 1024**2


def wanted(choice: str | bool, family: Any, component: str, checkpoint: Path) -> bool:
    """`true`/`false` as the recipe says; `auto`: when the component's weights would not comfortably fit in memory."""
    if choice != "auto" or family.components[component].block_pattern is None:
        return choice is True
    return family.weight_bytes(checkpoint, component) > AUTO_BYTES


@dataclass(frozen=True)
class Segment:
    name: str  # "prologue", "block 3", "epilogue"
    block: int | None  # the block index, None for prologue and epilogue
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    nodes: int
    members: tuple[int, ...] = ()  # positions of its nodes in the graph's node list


@dataclass
class Partition:
    segments: list[Segment]
    graph_outputs: tuple[str, ...]
    last_use: dict[str, int] = field(default_factory=dict)  # tensor -> index of the last segment reading it


def partition(model: Any, block_pattern: str, max_weight_bytes: int | None = None) -> Partition:
    """Assign every node to a segment: named block nodes to their block, others as early as their inputs allow
    (module-named nodes after the last block, and anything only they read, to the epilogue).

    With `max_weight_bytes`, a segment holding more weight bytes than that is cut further into consecutive
    pieces (`block 3 (2/4)`), each with at most that many bytes or one weight-reading node: tools that copy
    every weight of what they are given (ModelOpt's quantizer) then hold a piece of a block, not a block."""
    pattern = re.compile(block_pattern)
    graph = model.graph
    nodes = list(graph.node)
    blocks = sorted({int(m.group(1)) for n in nodes if (m := pattern.search(n.name))})
    if not blocks:
        raise fail("validate", "blockwise", f"no node name matches the block pattern {block_pattern!r}")
    index_of = {block: position + 1 for position, block in enumerate(blocks)}
    epilogue = len(blocks) + 1
    producer: dict[str, int] = {}
    segment_of: list[int] = []
    for position, node in enumerate(nodes):
        match = pattern.search(node.name)
        earliest = max((segment_of[producer[i]] for i in node.input if i in producer), default=0)
        if match:
            segment = index_of[int(match.group(1))]
            if segment < earliest:
                raise fail("validate", "blockwise", f"node {node.name} of block {match.group(1)} reads a later segment")
        else:
            segment = earliest
        segment_of.append(segment)
        for output in node.output:
            producer[output] = position
    consumers: dict[str, list[int]] = {}
    for position, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(position)
    outputs = {o.name for o in graph.output}
    for position in reversed(range(len(nodes))):
        node = nodes[position]
        if segment_of[position] == epilogue - 1 and not pattern.search(node.name):
            readers = [segment_of[c] for o in node.output for c in consumers.get(o, [])]
            if all(r == epilogue for r in readers):
                segment_of[position] = epilogue
    initializers = {i.name for i in graph.initializer}
    _place_constant_chains(nodes, segment_of, consumers, outputs, initializers)
    names = ["prologue", *(f"block {b}" for b in blocks), "epilogue"]
    block_of: list[int | None] = [None, *blocks, None]
    if max_weight_bytes is not None:
        segment_of, names, block_of = _subdivide(nodes, segment_of, names, block_of, consumers,
                                                 {t.name: initializer_bytes(t) for t in graph.initializer},
                                                 max_weight_bytes)
    return _segments(nodes, segment_of, names, block_of, producer, consumers, outputs, initializers)


def _subdivide(nodes: list[Any], segment_of: list[int], names: list[str], block_of: list[int | None],
               consumers: dict[str, list[int]], weight_bytes: dict[str, int], limit: int
               ) -> tuple[list[int], list[str], list[int | None]]:
    """Cut segments heavier than `limit` into consecutive pieces by weight bytes. A node computed from weights alone
    (a Transpose or Cast of a weight) goes with its first reader, so every weight-reading node still sees its
    weight as a weight; a node reading more than `limit` bytes is a piece of its own."""
    chain_bytes = dict(weight_bytes)
    is_chain = [False] * len(nodes)
    for position in weight_only_nodes(nodes, set(weight_bytes)):
        is_chain[position] = True
        size = sum(chain_bytes.get(i, 0) for i in nodes[position].input)
        chain_bytes.update({o: size for o in nodes[position].output})
    piece_of = [0] * len(nodes)
    new_names: list[str] = []
    new_blocks: list[int | None] = []
    new_segment = [0] * len(nodes)
    for segment, name in enumerate(names):
        members = [p for p, s in enumerate(segment_of) if s == segment]
        if not members:
            continue
        loads = {p: sum(chain_bytes.get(i, 0) for i in nodes[p].input) for p in members if not is_chain[p]}
        piece, held = 0, 0
        for position in members:
            if is_chain[position]:
                continue
            if held and held + loads[position] > limit:
                piece, held = piece + 1, 0
            held += loads[position]
            piece_of[position] = piece
        for position in reversed(members):
            if is_chain[position]:
                readers = [piece_of[c] for o in nodes[position].output for c in consumers.get(o, [])
                           if segment_of[c] == segment]
                piece_of[position] = min(readers, default=0)
        pieces = piece + 1
        first = len(new_names)
        for number in range(pieces):
            new_names.append(name if pieces == 1 else f"{name} ({number + 1}/{pieces})")
            new_blocks.append(block_of[segment])
        for position in members:
            new_segment[position] = first + piece_of[position]
    return new_segment, new_names, new_blocks


def weight_only_nodes(nodes: list[Any], initializers: set[str]) -> list[int]:
    """Positions of the nodes computed from weights alone (a Transpose or Cast of a weight, a DequantizeLinear),
    in graph order."""
    constant: set[str] = set(initializers) | {""}
    chains = []
    for position, node in enumerate(nodes):
        if all(i in constant for i in node.input):
            constant.update(node.output)
            chains.append(position)
    return chains


def initializer_bytes(tensor: Any) -> int:
    """An initializer's bytes, from its external-data record when its data lives in a file."""
    for entry in tensor.external_data:
        if entry.key == "length":
            return int(entry.value)
    if tensor.raw_data:
        return len(tensor.raw_data)
    import onnx

    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _place_constant_chains(nodes: list[Any], segment_of: list[int], consumers: dict[str, list[int]],
                           graph_outputs: set[str], initializers: set[str]) -> None:
    """Nodes computed from weights alone (a DequantizeLinear, a Transpose of a weight) join their first reader's
    segment: left "as early as their inputs allow" they would all land in the prologue, which would then hold
    and hand over every block's weights."""
    for position in reversed(weight_only_nodes(nodes, initializers)):
        outputs = nodes[position].output
        readers = [segment_of[c] for o in outputs for c in consumers.get(o, [])]
        if readers and not any(o in graph_outputs for o in outputs):
            segment_of[position] = max(segment_of[position], min(readers))


def _segments(nodes: list[Any], segment_of: list[int], names: list[str], block_of: list[int | None],
              producer: dict[str, int], consumers: dict[str, list[int]], graph_outputs: set[str],
              initializers: set[str]) -> Partition:
    segments, last_use = [], {}
    for segment, name in enumerate(names):
        members = [p for p, s in enumerate(segment_of) if s == segment]
        if not members:
            continue
        member_set = set(members)
        inputs = sorted({i for p in members for i in nodes[p].input
                         if i and i not in initializers and producer.get(i) not in member_set})
        produced = [o for p in members for o in nodes[p].output if o]
        outputs = [o for o in produced if o in graph_outputs
                   or any(segment_of[c] > segment for c in consumers.get(o, []))]
        for name_in in inputs:
            last_use[name_in] = len(segments)
        segments.append(Segment(name, block_of[segment], tuple(inputs), tuple(outputs), len(members), tuple(members)))
    return Partition(segments, tuple(sorted(graph_outputs)), last_use)


def write_segments(onnx_path: Path, part: Partition, work: Path) -> list[Path]:
    """One ONNX file per segment in `work`, extracted from the graph (weights stay external, hardlinked)."""
    import onnx
    from onnx.utils import Extractor

    model = onnx.load(str(onnx_path), load_external_data=False)
    link_external_data(model, onnx_path.parent, work)
    extractor = Extractor(model)
    paths = []
    for number, segment in enumerate(part.segments):
        sub = extractor.extract_model(list(segment.inputs), list(segment.outputs))
        path = work / f"segment_{number:03d}.onnx"
        onnx.save_model(sub, str(path))
        paths.append(path)
    return paths


def link_external_data(model: Any, source: Path, work: Path) -> None:
    """External data files beside the segments: hardlinks (no bytes copied) or, across filesystems, copies."""
    locations = {entry.value for tensor in model.graph.initializer for entry in tensor.external_data
                 if entry.key == "location"}
    for location in locations:
        target = work / location
        if target.exists():
            continue  # linked for an earlier graph written to the same folder
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source / location, target)
        except OSError:
            shutil.copyfile(source / location, target)


def run_chained(segment_paths: Sequence[Path], part: Partition, feed: Mapping[str, Any],
                optimize: bool = True) -> Iterator[tuple[Segment, dict[str, Any]]]:
    """Run the segments in order, one session alive at a time; yields each segment and its outputs.

    Tensors are dropped as soon as no later segment reads them, so memory holds one segment's weights and
    the activations crossing the current cut."""
    from stages.graphs.lora import named_feed
    from stages.graphs.runners import OnnxRuntimeRunner

    values: dict[str, Any] = dict(feed)
    for number, (segment, path) in enumerate(zip(part.segments, segment_paths)):
        with OnnxRuntimeRunner(path, name=segment.name, optimize=optimize) as runner:
            outputs = runner.infer(named_feed(values, segment.inputs))
        values.update(outputs)
        for name in [n for n, last in part.last_use.items() if last == number and n not in part.graph_outputs]:
            values.pop(name, None)
        yield segment, outputs
