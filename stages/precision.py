"""Precision stage: decide precision in the graph (TensorRT 11 / TensorRT-RTX are strongly typed).

fp16/bf16 go through ModelOpt AutoCast with the frozen text branch and the recipe's patterns excluded, so
those nodes stay at `high_precision`. INT8/FP8 will slot in here as another converter taking the same
exclusions (explicit Q/DQ through ModelOpt's ONNX quantizer).
"""

from __future__ import annotations

import logging
import re
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.inputs import StageInputs
from stages.errors import fail
from stages.recipe import LoadedRecipe

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

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import onnx

        from stages.onnx_io import save_model

        excluded = self.excluded_nodes()
        if self.dtype == "fp32":
            model = onnx.load(str(self.source))
        else:
            model = self._autocast(excluded)
        dtypes = node_output_dtypes(model)
        leaked = [name for name in excluded if dtypes.get(name) not in (None, self.high_precision)]
        if leaked:
            raise fail(self.source, "precision.exclude", f"{len(leaked)} excluded nodes left {self.high_precision}: {leaked[:3]}")
        save_model(model, out_dir / MODEL_FILE)
        return {
            "component": self.component,
            "model_file": MODEL_FILE,
            "dtype": self.dtype,
            "high_precision": self.high_precision,
            "converter": "modelopt.onnx.autocast" if self.dtype != "fp32" else None,
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

    def _autocast(self, excluded: list[str]) -> Any:
        from modelopt.onnx.autocast import configure_logging, convert_to_mixed_precision

        configure_logging(logging.WARNING)
        print(f"[precision] AutoCast to {self.dtype}, {len(excluded)} nodes kept {self.high_precision}", file=sys.stderr)
        from polygraphy.backend.onnx import infer_shapes

        model = convert_to_mixed_precision(
            onnx_path=str(self.source),
            low_precision_type=self.dtype,
            nodes_to_exclude=[f"^{re.escape(name)}$" for name in excluded],
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


@dataclass(frozen=True)
class QuantizeWithComparisons:
    """The quantized graph plus the graphs its cost is measured against: the fp16 plan and freezing switched off.

    Validation runs all of them, so the accuracy cost of quantizing and of (not) freezing the text branch are
    numbers in the manifest; only the primary graph is built into an engine and gated.
    """

    primary: Any
    fp16_plan: ConvertPrecision
    freezing_off: Any | None

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        report = self.primary(out_dir)
        graphs = {"fp16_graph": self.fp16_plan}
        if self.freezing_off is not None:
            graphs["freezing_off"] = self.freezing_off
        report["comparison_graphs"] = {}
        for name, stage in graphs.items():
            folder = out_dir / "comparisons" / name
            folder.mkdir(parents=True)
            print(f"[precision] comparison graph: {name}", file=sys.stderr)
            stage(folder)
            report["comparison_graphs"][name] = f"comparisons/{name}/{MODEL_FILE}"
        return report


def from_recipe(loaded: LoadedRecipe, component: str | None,
                inputs: StageInputs) -> ConvertPrecision | QuantizeWithComparisons:
    assert component is not None
    surgery_dir = inputs.dir("surgery", component)
    frozen = tuple(inputs.report("surgery", component)["frozen_nodes"])
    plan = loaded.recipe.components[component].precision
    source = surgery_dir / MODEL_FILE
    if not plan.quantized:
        return ConvertPrecision(component, source, plan.dtype, plan.high_precision, frozen, tuple(plan.exclude))
    return _quantized_plan(loaded, component, source, frozen, inputs)


def _quantized_plan(loaded: LoadedRecipe, component: str, source: Path, frozen: tuple[str, ...],
                    inputs: StageInputs) -> QuantizeWithComparisons:
    from stages.calibration import load_feeds
    from stages.quantize import QuantizePrecision, mode_for

    plan = loaded.recipe.components[component].precision
    feeds: Any = ()
    if plan.needs_calibration:
        folder = inputs.dir("calibration", component)
        feeds = lambda: load_feeds(folder)  # noqa: E731 - loaded only when the quantizer runs
    method = plan.calibration.method if plan.calibration else "max"

    def quantizer(frozen_nodes: tuple[str, ...]) -> Any:
        return QuantizePrecision(component, source, mode_for(plan.dtype, plan.weight_only), method,
                                 plan.high_precision, frozen_nodes, tuple(plan.exclude), calibration_feeds=feeds)

    return QuantizeWithComparisons(
        primary=quantizer(frozen),
        fp16_plan=ConvertPrecision(component, source, "fp16", "fp32", frozen, tuple(plan.exclude)),
        freezing_off=quantizer(()) if frozen else None,
    )
