"""Model families, registered here by name; each family is a folder (see `qwen_image/`).

A family declares its components (which checkpoint folders each reads, which module exports and validates
it, which stages apply) and the hooks recipe-wide stages call: saving a tiny random checkpoint, capturing
calibration data, and the pipeline-check adapters. Adding a family (Qwen-Image-Edit, Flux) is a sibling
folder plus one line in FAMILIES. This module stays import-light: the recipe schema, the task graph and the
manifest read it without loading torch.

A component module provides: `load(checkpoint_dir)`, `export_wrapper(model)` (a context manager yielding an
exportable nn.Module), `example_inputs(model, text_length)`, `dynamic_shapes()`, `profile_shapes(profile,
text_length, config)`, `validation_cases(model, settings, text_length)`, `reference_outputs(model, case)`,
`OUTPUT_NAMES`, `TEXT_BRANCH_PATTERNS`, and `TEXT_AXES` / `text_axis_length(text_length)` for fixed text
padding; optionally `export_extras(checkpoint_dir, out_dir, text_length)` for files a runtime needs beside
the ONNX (the tokenizer).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ALL_SURGERY = ("fold_constants", "infer_shapes", "cleanup", "fix_text_padding", "freeze_text_branch")
DEFAULT_FAMILY = "qwen-image"


@dataclass(frozen=True)
class ComponentInfo:
    module: str
    feed_function: str  # `module:function` turning a diffusers-level call into the engine's input dict
    checkpoint_folders: tuple[str, ...]  # what a diffusers-layout checkpoint must hold for this component
    config_folder: str  # where its config.json lives in the checkpoint
    validate_requires: tuple[str, ...]  # validate keys that must be set ("sizes" implies an image profile)
    outputs: tuple[str, ...]  # graph outputs, each gated by a `validate.tolerances` entry of that name
    surgery_passes: tuple[str, ...] = ALL_SURGERY
    quantizable: bool = False  # INT8/FP8 plans apply (calibration data can be captured for it)
    block_pattern: str | None = None  # regex over node names whose group 1 is the block index (block-wise runs)


@dataclass(frozen=True)
class Family:
    name: str
    components: dict[str, ComponentInfo]
    pipeline_files: tuple[str, ...]  # checkpoint files/folders the whole pipeline reads besides the components'
    tiny_checkpoint: str  # `module:function(seed, out_dir) -> report`: the built-in random-weight checkpoint
    calibration: str  # `module:mapping` component -> capture(checkpoint_dir, prompts, settings, text_length)
    pipeline: str  # module with the pipeline check's adapters (see stages.pipeline_check)
    fit: str  # light module with `engine_weight_bytes` and `activation_bytes` for the GPU fit check (stages.fit)

    def module(self, component: str) -> ModuleType:
        return importlib.import_module(self.components[component].module)

    def hook(self, dotted: str) -> Any:
        module, attribute = dotted.split(":")
        return getattr(importlib.import_module(module), attribute)

    def pipeline_module(self) -> ModuleType:
        return importlib.import_module(self.pipeline)

    def weight_bytes(self, checkpoint: Path, component: str | None = None) -> int:
        """Safetensors bytes behind one component (or the whole pipeline): what decides large-model code paths."""
        folders = [self.components[component].config_folder] if component else [
            info.config_folder for info in self.components.values()]
        return sum(p.stat().st_size for folder in folders for p in (checkpoint / folder).glob("*.safetensors"))

    def checkpoint_folders(self) -> tuple[str, ...]:
        """Everything the whole pipeline reads: shared files first, then every component's folders."""
        return (*self.pipeline_files,
                *dict.fromkeys(f for info in self.components.values() for f in info.checkpoint_folders))


def _registered() -> dict[str, Family]:
    from stages.families import qwen_image

    return {family.name: family for family in (qwen_image.FAMILY,)}


FAMILIES: dict[str, Family] = _registered()
ALL_COMPONENTS: tuple[str, ...] = tuple(dict.fromkeys(c for f in FAMILIES.values() for c in f.components))


def component_module(component: str, family: str = DEFAULT_FAMILY) -> ModuleType:
    return FAMILIES[family].module(component)
