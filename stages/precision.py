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

from stages import artifacts
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

        from stages.surgery import save_model

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


def from_recipe(loaded: LoadedRecipe, component: str | None) -> ConvertPrecision:
    assert component is not None
    surgery_dir = artifacts.stage_dir(loaded.name, component, "surgery")
    frozen = artifacts.read_json(surgery_dir / artifacts.RECORD_NAME)["report"]["frozen_nodes"]
    settings = loaded.recipe.components[component].precision
    return ConvertPrecision(component, surgery_dir / MODEL_FILE, settings.dtype, settings.high_precision,
                            tuple(frozen), tuple(settings.exclude))
