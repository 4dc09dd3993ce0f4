"""Export stage: the real diffusers model -> ONNX (torch dynamo exporter), one graph for the whole profile.

Node names are rewritten from the exporter's module scopes (`/transformer_blocks/3/attn/add_q_proj/MatMul_7`)
so later stages can select nodes by module path: the text branch to freeze, the patterns a recipe excludes.
"""

from __future__ import annotations

import ast
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from stages.inputs import StageInputs
from stages.recipe import LoadedRecipe

MODEL_FILE = "model.onnx"
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3 - 1024**2
KEPT_METADATA = ("pkg.torch.onnx.name_scopes",)


@dataclass(frozen=True)
class ExportOnnx:
    component: str
    checkpoint_dir: Path
    text_length: int
    opset: int

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        from stages.models import component_module

        spec = component_module(self.component)
        started = time.perf_counter()
        print(f"[export] loading {self.component} from {self.checkpoint_dir}", file=sys.stderr)
        model = spec.load(self.checkpoint_dir)
        parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"[export] tracing with torch.onnx (dynamo), opset {self.opset}", file=sys.stderr)
        program, inputs = export_program(spec, model, self.text_length, self.opset)
        renamed = name_nodes_by_module(program.model)
        external = parameter_bytes > EXTERNAL_DATA_THRESHOLD
        program.save(str(out_dir / MODEL_FILE), external_data=external)
        print(f"[export] wrote {MODEL_FILE} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
        extras = spec.export_extras(self.checkpoint_dir, out_dir, self.text_length) if hasattr(spec, "export_extras") else {}
        return {
            **extras,
            "component": self.component,
            "model_file": MODEL_FILE,
            "external_data": external,
            "parameter_bytes": parameter_bytes,
            "opset": self.opset,
            "text_length": self.text_length,
            "nodes": len(program.model.graph),
            "op_types": dict(Counter(node.op_type for node in program.model.graph).most_common()),
            "renamed_nodes": renamed,
            "inputs": {name: list(tensor.shape) for name, tensor in inputs.items()},
        }


def export_program(spec: ModuleType, model: Any, text_length: int, opset: int) -> tuple[Any, dict[str, Any]]:
    """The one way a component is traced: its model module's wrapper, example inputs and dynamic axes."""
    import torch

    inputs = spec.example_inputs(model, text_length)
    with spec.export_wrapper(model) as wrapper, torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            args=(),
            kwargs=inputs,
            input_names=list(inputs),
            output_names=spec.OUTPUT_NAMES,
            dynamic_shapes=spec.dynamic_shapes(),
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    return program, inputs


def name_nodes_by_module(model: Any) -> int:
    """Give each node `/<module path>/<op>_<n>` and drop bulky exporter metadata (stack traces, fx nodes)."""
    counts: Counter[str] = Counter()
    for node in model.graph.all_nodes() if hasattr(model.graph, "all_nodes") else model.graph:
        scopes = node.metadata_props.get("pkg.torch.onnx.name_scopes")
        module = ""
        if scopes:
            path = [scope for scope in ast.literal_eval(scopes)[:-1] if scope]
            module = path[-1].removeprefix("model").lstrip(".") if path else ""
        prefix = "/" + module.replace(".", "/") if module else ""
        base = f"{prefix}/{node.op_type}"
        node.name = f"{base}_{counts[base]}"
        counts[base] += 1
        for key in list(node.metadata_props):
            if key not in KEPT_METADATA:
                del node.metadata_props[key]
    return sum(counts.values())


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> ExportOnnx:

    assert component is not None
    settings = loaded.recipe.components[component].export
    return ExportOnnx(component, inputs.weights, loaded.recipe.text_length, settings.opset)
