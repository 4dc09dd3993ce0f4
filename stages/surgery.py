"""Surgery stage: the recipe's graph passes, in recipe order, each reporting what it changed.

`freeze_text_branch` does not change arithmetic here; it decides which nodes later stages must leave in
high precision and never quantize, and records them (the precision stage reads this stage's report).

Passes never see weights: the graph is loaded without external data and every weight becomes a graph input
while they run (stages.graphs.weights.hide_weights), so folding cannot materialise a transposed or upcast copy of a
weight and nothing serialises more than the small graph; afterwards the weights are the export's references
again, their shards hard-linked into this entry (no weight bytes written).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import log
from stages.errors import fail
from stages.families import DEFAULT_FAMILY, component_module
from stages.graphs.onnx_io import save_model
from stages.graphs.weights import hide_weights, link_upstream_files, restore_weights
from stages.inputs import StageInputs

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

LOG = log.get("surgery")

MODEL_FILE = "model.onnx"
SYMBOL = re.compile(r"[A-Za-z_]\w*")  # names inside a dim expression such as `2*batch`
FOLD_SIZE_THRESHOLD = 16 * 1024**2  # bytes: constants folded from trace-time tables stay small


@dataclass(frozen=True)
class GraphSurgery:
    component: str
    source: Path
    passes: tuple[str, ...]
    text_length: int
    family: str = DEFAULT_FAMILY
    lora_targets: tuple[str, ...] = ()  # block linears that get a LoRA branch (stages.graphs.lora), with this rank
    lora_rank: int = 0

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import onnx

        model = onnx.load(str(self.source), load_external_data=False)
        hidden = hide_weights(model)
        reports = []
        frozen: list[str] = []
        lora = self._add_lora_branches(model) if self.lora_targets else None
        for name in self.passes:
            before = len(model.graph.node)
            LOG.debug(f"{name} ({before} nodes)")
            model, details = PASSES[name](self, model)
            reports.append({"pass": name, "nodes_before": before, "nodes_after": len(model.graph.node), **details})
            frozen = details.get("frozen_nodes", frozen)
        changed = restore_weights(model, hidden)
        if changed:
            raise fail(self.source, "surgery", f"a pass changed the dtype of weights {changed[:3]}")
        link_upstream_files(model, self.source.parent, out_dir)
        save_model(model, out_dir / MODEL_FILE)
        return {"component": self.component, "model_file": MODEL_FILE, "passes": reports, "frozen_nodes": frozen,
                "nodes": len(model.graph.node), "lora": lora}

    def _add_lora_branches(self, model: Any) -> dict[str, Any]:
        """Before the recipe's passes, so freezing and shape inference see the branches as part of their linears."""
        from stages.graphs.lora import add_branches, linear_flops_per_token

        names = [t.name for t in model.graph.initializer] + [v.name for v in model.graph.input]
        modules, absent = component_module(self.component, self.family).lora_modules(names, list(self.lora_targets))
        if not modules:
            raise fail(self.source, "lora", f"found no linears {list(self.lora_targets)} to branch")
        base = linear_flops_per_token(model)
        try:
            branches = add_branches(model, modules, self.lora_rank)
        except ValueError as error:
            raise fail(self.source, "lora", str(error)) from None
        LOG.debug(f"LoRA branches of rank {self.lora_rank} on {len(branches)} linears")
        return {"max_rank": self.lora_rank, "targets": list(self.lora_targets), "branches": len(branches),
                "pruned": absent,
                "flops_per_token": sum(b.flops_per_token(self.lora_rank) for b in branches),
                "base_linear_flops_per_token": base,
                "input_bytes": sum(b.input_bytes(self.lora_rank) for b in branches)}


def fold_constants(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    from polygraphy.backend.onnx import fold_constants as polygraphy_fold

    return polygraphy_fold(model, error_ok=False, size_threshold=FOLD_SIZE_THRESHOLD), {}


def infer_shapes(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    from polygraphy.backend.onnx import infer_shapes as polygraphy_infer

    model = polygraphy_infer(model, error_ok=False)
    return model, {"tensors_with_shapes": len(model.graph.value_info)}


def cleanup(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return gs.export_onnx(graph), {}


def fix_text_padding(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    """Pin the text axis of every text input to the recipe's length, then prove no text tensor stays symbolic."""
    from polygraphy.backend.onnx import infer_shapes as polygraphy_infer

    spec = component_module(stage.component, stage.family)
    length = spec.text_axis_length(stage.text_length)
    inputs = {value.name: value for value in model.graph.input}
    pinned = {}
    for name, axis in spec.TEXT_AXES.items():
        if name not in inputs:
            continue
        dim = inputs[name].type.tensor_type.shape.dim[axis]
        if dim.HasField("dim_value") and dim.dim_value != length:
            raise fail(stage.source, f"input {name}", f"text axis is {dim.dim_value}, recipe text_length needs {length}")
        if not dim.HasField("dim_value"):
            pinned[name] = dim.dim_param
            dim.dim_value = length
    model = polygraphy_infer(model, error_ok=False)
    symbolic = _symbolic_text_tensors(model, text_patterns(stage.component, stage.family))
    if symbolic:
        raise fail(stage.source, "fix_text_padding", f"text tensors still have symbolic length: {symbolic[:5]}")
    return model, {"text_axis_length": length, "pinned_inputs": pinned, "symbolic_text_tensors": 0}


def _symbolic_text_tensors(model: Any, patterns: list[re.Pattern[str]]) -> list[str]:
    """Text tensors with a symbolic axis that is not one of the graph's declared dynamic axes (batch, ...).

    With no patterns the whole component is text (the text encoder), so every tensor is checked.
    """
    declared = {d.dim_param for value in model.graph.input for d in value.type.tensor_type.shape.dim if d.dim_param}
    producers = {out: node.name for node in model.graph.node for out in node.output}
    bad = []
    for value in model.graph.value_info:
        if patterns and not any(p.search(producers.get(value.name, "")) for p in patterns):
            continue
        if any(not set(SYMBOL.findall(d.dim_param)) <= declared for d in value.type.tensor_type.shape.dim):
            bad.append(value.name)
    return bad


def text_patterns(component: str, family: str = DEFAULT_FAMILY) -> list[re.Pattern[str]]:
    return [re.compile(p) for p in component_module(component, family).TEXT_BRANCH_PATTERNS]


def freeze_text_branch(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    patterns = text_patterns(stage.component, stage.family)
    frozen = [node.name for node in model.graph.node if any(p.search(node.name) for p in patterns)]
    if not frozen:
        raise fail(stage.source, "freeze_text_branch", "found no text-branch nodes (are node names module paths?)")
    by_module: dict[str, int] = {}
    for name in frozen:
        module = name.rsplit("/", 1)[0]
        by_module[module] = by_module.get(module, 0) + 1
    return model, {"frozen_nodes": frozen, "frozen_count": len(frozen), "frozen_modules": by_module}


def drop_softmax_nan_guard(stage: GraphSurgery, model: Any) -> tuple[Any, dict[str, Any]]:
    """Remove `Where(IsNaN(p), 0, p)` after a Softmax: torch's SDPA export zeroes rows whose scores are all -inf.

    The forge's attention masks are finite (float32-min sentinels) and every query sees the unmasked image tokens,
    so no row is all -inf and the guard is the identity in fp32. It is not free: on ONNX Runtime CPU its `Where`
    allocates two temporaries the size of the attention probabilities (~2.1 GB at 768x1024), which kept calibrated
    quantization of a release block above 8 GB (docs/scale.md). The one difference: in a low-precision engine a
    row whose scores overflowed becomes NaN instead of zeros. Opt-in (`surgery.passes`)."""
    from onnx import numpy_helper

    graph = model.graph
    producer = {output: node for node in graph.node for output in node.output}
    constants = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    outputs = {value.name for value in graph.output}

    def is_zero(name: str) -> bool:
        tensor = constants.get(name)
        node = producer.get(name)
        if tensor is None and node is not None and node.op_type == "Constant":
            tensor = next((a.t for a in node.attribute if a.name == "value"), None)
        return tensor is not None and not numpy_helper.to_array(tensor).any()

    guards = {}
    for node in graph.node:
        if node.op_type != "Where" or len(node.input) != 3 or node.output[0] in outputs:
            continue
        condition, zero, value = node.input
        isnan, softmax = producer.get(condition), producer.get(value)
        if (isnan is not None and isnan.op_type == "IsNaN" and isnan.input[0] == value and readers[condition] == 1
                and softmax is not None and softmax.op_type == "Softmax" and is_zero(zero)):
            guards[node.output[0]] = (node, isnan, value)
    for node in graph.node:
        node.input[:] = [guards[name][2] if name in guards else name for name in node.input]
    dropped = {id(n) for where, isnan, _ in guards.values() for n in (where, isnan)}
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return model, {"guards_dropped": len(guards)}


PASSES: dict[str, Callable[[GraphSurgery, Any], tuple[Any, dict[str, Any]]]] = {
    "fold_constants": fold_constants,
    "infer_shapes": infer_shapes,
    "cleanup": cleanup,
    "fix_text_padding": fix_text_padding,
    "freeze_text_branch": freeze_text_branch,
    "drop_softmax_nan_guard": drop_softmax_nan_guard,
}


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> GraphSurgery:
    assert component is not None
    source = inputs.dir("export", component) / MODEL_FILE
    section = loaded.recipe.components[component]
    return GraphSurgery(component, source, tuple(section.surgery.passes), loaded.recipe.text_length,
                        loaded.recipe.family, loaded.lora_targets(component),
                        section.lora.max_rank if section.lora else 0)
