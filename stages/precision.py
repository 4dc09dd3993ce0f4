"""Precision stage: decide precision in the graph (TensorRT 11 / TensorRT-RTX are strongly typed).

fp16/bf16 go through ModelOpt AutoCast with the frozen text branch and the recipe's patterns excluded, so
those nodes stay at `high_precision`.

Weights are never converted or written here. AutoCast runs on the graph with every weight hidden as a graph
input of its own dtype (stages.graphs.weights.hide_weights) and `keep_io_types`, so it inserts Cast nodes where a
low-precision node reads a weight instead of rewriting its bytes; the weights stay the checkpoint's tensors
referenced in place (bf16 for the release: bf16 -> fp16 is exact within fp16's range, bf16 -> fp32 always), and
TensorRT folds those Casts into the engine's weights at build time. fp32 islands (the frozen text branch) read
the same bf16 weights through a Cast to fp32, so they compute in fp32 on exactly the checkpoint's values.
AutoCast's data-range rule (`data_max`) is off: it needs an fp32 reference run of the whole model with every
intermediate tensor as an output, which does not fit in memory at release size; exclusions are explicit.
With `precision.blockwise`, AutoCast runs one block at a time (stages.graphs.segmented): its cleanup scans the whole
graph per node, so whole-graph time grows with the square of the layer count. INT8/FP8 go through
stages.quantize with the same exclusions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import log
from stages.errors import fail
from stages.graphs import bf16, blockwise
from stages.graphs.blockwise import partition
from stages.graphs.onnx_io import save_model
from stages.graphs.segmented import transform_segments
from stages.graphs.weights import hide_weights, link_upstream_files, restore_weights
from stages.inputs import StageInputs

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

LOG = log.get("precision")

MODEL_FILE = "model.onnx"
ONNX_DTYPES = {1: "fp32", 10: "fp16", 16: "bf16"}


@dataclass(frozen=True)
class ConvertPrecision:
    component: str
    source: Path
    dtype: str
    high_precision: str
    frozen_nodes: tuple[str, ...]
    exclude_patterns: tuple[str, ...]
    block_pattern: str | None = None  # set: AutoCast one block at a time
    frozen_storage: str = "high_precision"  # bf16: the frozen branch's weight GEMMs compute in bf16 (graphs.bf16)

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import onnx

        excluded = self.excluded_nodes()
        model = onnx.load(str(self.source), load_external_data=False)
        if self.dtype != "fp32" and self.block_pattern:
            model = self._autocast_by_block(model, excluded)
        elif self.dtype != "fp32":
            model = self._autocast_weightless(model, excluded)
        in_bf16 = set(bf16.gemms_to_bf16(model, self.frozen_nodes)) if self.frozen_storage == "bf16" else set()
        dtypes = node_output_dtypes(model)
        leaked = [name for name in excluded
                  if dtypes.get(name) not in (None, "bf16" if name in in_bf16 else self.high_precision)]
        if leaked:
            raise fail(self.source, "precision.exclude", f"{len(leaked)} excluded nodes left {self.high_precision}: {leaked[:3]}")
        link_upstream_files(model, self.source.parent, out_dir)
        save_model(model, out_dir / MODEL_FILE)
        return {
            "component": self.component,
            "model_file": MODEL_FILE,
            "dtype": self.dtype,
            "high_precision": self.high_precision,
            "frozen_storage": self.frozen_storage,
            "bf16_gemms": len(in_bf16),
            "converter": "modelopt.onnx.autocast" if self.dtype != "fp32" else None,
            "blockwise": bool(self.block_pattern) and self.dtype != "fp32",
            "node_precisions": dict(Counter(dtypes.values())),
            "excluded": {"frozen_text_branch": len(self.frozen_nodes), "recipe_patterns": list(self.exclude_patterns),
                         "matched_by_patterns": len(excluded) - len(self.frozen_nodes)},
            "excluded_nodes": excluded,
        }

    def excluded_nodes(self) -> list[str]:
        import onnx

        patterns = [re.compile(p) for p in self.exclude_patterns]
        names = [node.name for node in onnx.load(str(self.source), load_external_data=False).graph.node]
        by_pattern = [n for n in names if n not in set(self.frozen_nodes) and any(p.search(n) for p in patterns)]
        return [*self.frozen_nodes, *by_pattern]

    def _autocast_weightless(self, model: Any, excluded: list[str]) -> Any:
        """AutoCast with every weight hidden as a graph input, then the same references put back."""
        hidden = hide_weights(model)
        names = {node.name for node in model.graph.node}
        model = self._autocast(model, [name for name in excluded if name in names])
        changed = restore_weights(model, hidden)
        if changed:
            raise fail(self.source, "precision", f"AutoCast changed the dtype of weight inputs {changed[:3]}")
        return model

    def _autocast_by_block(self, model: Any, excluded: list[str]) -> Any:
        assert self.block_pattern is not None
        part = partition(model, self.block_pattern)
        steps = log.Steps(LOG, f"AutoCast {self.component}, segments", len(part.segments))
        return transform_segments(model, part, lambda index, segment, piece: self._autocast_weightless(piece, excluded),
                                  progress=steps.update)

    def _autocast(self, weightless: Any, excluded: list[str]) -> Any:
        """AutoCast a graph whose weights are inputs (AutoCast reads a path: a small temporary file)."""
        import tempfile

        import numpy as np
        import onnx
        from modelopt.onnx.autocast import configure_logging, convert_to_mixed_precision
        from polygraphy.backend.onnx import infer_shapes

        configure_logging(log.tool_level())
        LOG.debug(f"AutoCast to {self.dtype}, {len(excluded)} nodes kept {self.high_precision}")
        with tempfile.TemporaryDirectory(prefix="forge-autocast-") as scratch:
            path = Path(scratch) / MODEL_FILE
            onnx.save_model(weightless, str(path))
            model = convert_to_mixed_precision(
                onnx_path=str(path),
                low_precision_type=self.dtype,
                nodes_to_exclude=[f"^{re.escape(name)}$" for name in excluded],
                data_max=np.inf,
                keep_io_types=True,
            )
        # AutoCast leaves value_info with one shared "unk" dim_param, which ONNX Runtime trusts for buffer reuse.
        model.graph.ClearField("value_info")
        return infer_shapes(model, error_ok=False)


def node_output_dtypes(model: Any) -> dict[str, str]:
    """Precision of each node = dtype of its first floating-point output (after shape inference)."""
    import onnx

    inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < 2**31 else model
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.output)}
    dtypes = {}
    for node in inferred.graph.node:
        for output in node.output:
            if ONNX_DTYPES.get(types.get(output, 0)):
                dtypes[node.name] = ONNX_DTYPES[types[output]]
                break
    return dtypes


def surgery_inputs(loaded: LoadedRecipe, component: str,
                   inputs: StageInputs) -> tuple[Path, tuple[str, ...], str | None]:
    """(the surgery graph, its frozen nodes, the block pattern when the plan runs block-wise)."""
    plan = loaded.recipe.components[component].precision
    pattern = loaded.family.components[component].block_pattern \
        if blockwise.wanted(plan.blockwise, loaded.family, component, inputs.weights) else None
    return (inputs.dir("surgery", component) / MODEL_FILE, tuple(inputs.report("surgery", component)["frozen_nodes"]),
            pattern)


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> ConvertPrecision:
    """fp16/bf16 plans (INT8/FP8 plans are configured by stages.quantize)."""
    assert component is not None
    plan = loaded.recipe.components[component].precision
    if plan.quantized:
        raise fail("precision", component, f"{plan.dtype} plans are run by stages.quantize")
    source, frozen, pattern = surgery_inputs(loaded, component, inputs)
    return ConvertPrecision(component, source, plan.dtype, plan.high_precision, frozen, tuple(plan.exclude), pattern,
                            plan.frozen_storage)
