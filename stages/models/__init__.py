"""Per-component model quirks, one module each; stages look a component's module up here by name.

A model module provides: `load(checkpoint_dir)`, `export_wrapper(model)` (a context manager yielding an
exportable nn.Module), `example_inputs(model, text_length)`, `dynamic_shapes()`, `profile_shapes(profile,
text_length, config)`, `validation_cases(model, settings, text_length)`, `reference_outputs(model, case)`,
`OUTPUT_NAMES` and `TEXT_BRANCH_PATTERNS`. This registry stays import-light: the task graph and the
manifest read it without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType


@dataclass(frozen=True)
class ComponentInfo:
    module: str
    feed_function: str  # `module:function` turning a diffusers-level call into the engine's input dict


COMPONENTS: dict[str, ComponentInfo] = {
    "transformer": ComponentInfo("stages.models.qwen_image", "stages.models.qwen_image:transformer_engine_inputs"),
}


def component_module(component: str) -> ModuleType:
    return importlib.import_module(COMPONENTS[component].module)
