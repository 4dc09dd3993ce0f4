"""Per-component model quirks, one module each; stages look a component's module up here by name.

A model module provides: `load(checkpoint_dir)`, `export_wrapper(model)` (a context manager yielding an
exportable nn.Module), `example_inputs(model, text_length)`, `dynamic_shapes()`, `profile_shapes(profile,
text_length, config)`, `validation_cases(model, settings, text_length)`, `reference_outputs(model, case)`,
`OUTPUT_NAMES`, `TEXT_BRANCH_PATTERNS`, and `TEXT_AXES` / `text_axis_length(text_length)` for fixed text
padding; optionally `export_extras(checkpoint_dir, out_dir, text_length)` for files a runtime needs beside
the ONNX (the tokenizer). This registry stays import-light: the recipe schema, the task graph and the manifest read it
without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

ALL_SURGERY = ("fold_constants", "infer_shapes", "cleanup", "fix_text_padding", "freeze_text_branch")


@dataclass(frozen=True)
class ComponentInfo:
    module: str
    feed_function: str  # `module:function` turning a diffusers-level call into the engine's input dict
    checkpoint_folders: tuple[str, ...]  # what a diffusers-layout checkpoint must hold for this component
    config_folder: str  # where its config.json lives in the checkpoint
    validate_requires: tuple[str, ...]  # validate keys that must be set ("sizes" implies an image profile)
    surgery_passes: tuple[str, ...] = ALL_SURGERY
    quantizable: bool = False  # INT8/FP8 plans apply (calibration data can be captured for it)


COMPONENTS: dict[str, ComponentInfo] = {
    "text_encoder": ComponentInfo(
        "stages.models.qwen_text_encoder", "stages.models.qwen_text_encoder:text_encoder_engine_inputs",
        ("text_encoder", "tokenizer"), "text_encoder", ("text_tokens",), ALL_SURGERY[:4], quantizable=True,
    ),
    "transformer": ComponentInfo(
        "stages.models.qwen_image", "stages.models.qwen_image:transformer_engine_inputs",
        ("transformer",), "transformer", ("sizes", "timesteps", "text_tokens"), quantizable=True,
    ),
    "vae_decoder": ComponentInfo(
        "stages.models.qwen_vae", "stages.models.qwen_vae:vae_decoder_engine_inputs",
        ("vae",), "vae", ("sizes",), ALL_SURGERY[:3],
    ),
}


def component_module(component: str) -> ModuleType:
    return importlib.import_module(COMPONENTS[component].module)
