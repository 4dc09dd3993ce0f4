"""What a model family declares, as types: the family folders and the registry (stages.families) import this.

A family declares its components (which checkpoint folders each reads, which module exports and validates
it, which stages apply) and the modules recipe-wide stages call (saving a tiny random checkpoint and the
pipeline-check adapters, calibration capture, the GPU fit arithmetic). Modules are referenced by thunks:
zero-argument functions whose body imports the module and returns it. Declaring a family therefore imports
nothing heavy, a reader and a static tool follow the import, and a store key covers a thunk's target only for
the tasks that call it (stages.plan.fingerprint.is_thunk).

A component module provides: `load(checkpoint_dir)`, `export_wrapper(model)` (a context manager yielding an
exportable nn.Module), `example_inputs(model, text_length)`, `dynamic_shapes()`, `profile_shapes(profile,
text_length, config)`, `validation_cases(model, settings, text_length)`, `reference_outputs(model, case)`,
`OUTPUT_NAMES`, `TEXT_BRANCH_PATTERNS`, and `TEXT_AXES` / `text_axis_length(text_length)` for fixed text
padding; optionally `export_extras(checkpoint_dir, out_dir, text_length)` for files a runtime needs beside
the ONNX (the tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

ALL_SURGERY = ("fold_constants", "infer_shapes", "cleanup", "fix_text_padding", "freeze_text_branch",
               "drop_softmax_nan_guard")
DEFAULT_FAMILY = "qwen-image"

ModuleThunk = Callable[[], ModuleType]


@dataclass(frozen=True)
class ComponentInfo:
    module: ModuleThunk
    feed_function: Callable[[], Callable[..., Any]]  # a diffusers-level call -> the engine's input dict
    checkpoint_folders: tuple[str, ...]  # what a diffusers-layout checkpoint must hold for this component
    config_folder: str  # where its config.json lives in the checkpoint
    validate_requires: tuple[str, ...]  # validate keys that must be set ("sizes" implies an image profile)
    outputs: tuple[str, ...]  # graph outputs, each gated by a `validate.tolerances` entry of that name
    surgery_passes: tuple[str, ...] = ALL_SURGERY
    quantizable: bool = False  # INT8/FP8 plans apply (calibration data can be captured for it)
    block_pattern: str | None = None  # regex over node names whose group 1 is the block index (block-wise runs)
    lora_targets: tuple[str, ...] = ()  # linears of a block that may take a LoRA branch (none: no LoRA)
    lora_defaults: tuple[str, ...] = ()  # the targets when a recipe's `lora.targets` is empty


@dataclass(frozen=True)
class Family:
    name: str
    components: dict[str, ComponentInfo]
    pipeline_files: tuple[str, ...]  # checkpoint files/folders the whole pipeline reads besides the components'
    pipeline: ModuleThunk  # `save_tiny_checkpoint(seed, out_dir)` and the pipeline check's adapters
    calibration: ModuleThunk  # `CAPTURE`: component -> capture(checkpoint_dir, prompts, settings, text_length)
    fit: ModuleThunk  # light: `engine_weight_bytes`, `activation_bytes`, `precision_plan` (the GPU fit check)

    def module(self, component: str) -> ModuleType:
        return self.components[component].module()

    def weight_bytes(self, checkpoint: Path, component: str | None = None) -> int:
        """Safetensors bytes behind one component (or the whole pipeline): what decides large-model code paths."""
        folders = [self.components[component].config_folder] if component else [
            info.config_folder for info in self.components.values()]
        return sum(p.stat().st_size for folder in folders for p in (checkpoint / folder).glob("*.safetensors"))

    def checkpoint_folders(self) -> tuple[str, ...]:
        """Everything the whole pipeline reads: shared files first, then every component's folders."""
        return (*self.pipeline_files,
                *dict.fromkeys(f for info in self.components.values() for f in info.checkpoint_folders))
