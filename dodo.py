"""Qwen-Image engine forge: `doit build recipe=a10-fp16` turns a recipe into validated TensorRT engines.

Command-line variables: `recipe=` (a name in recipes/ or a path to a YAML file, default a10-fp16),
`model=` (`tiny` or a diffusers checkpoint directory), and any dotted `key.path=value` recipe override.
"""

import sys

from stages.errors import ForgeError
from stages.taskgraph import command_line_vars, load_from_command_line, manifest_task, stage_tasks

DOIT_CONFIG = {
    "backend": "sqlite3",
    "dep_file": ".doit.db",
    "default_tasks": ["build"],
    "verbosity": 2,
}

try:
    RECIPE = load_from_command_line(command_line_vars())
except ForgeError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def task_checkpoint():
    """Save the built-in tiny random-weight model as a diffusers checkpoint (skipped for model=<dir>)."""
    yield from stage_tasks(RECIPE, "checkpoint")


def task_calibration():
    """Capture real inputs of each INT8/FP8 component from the PyTorch pipeline (shared between recipes)."""
    yield from stage_tasks(RECIPE, "calibration")


def task_export():
    """Export each component to ONNX from the real diffusers model (real-valued RoPE, fixed text length)."""
    yield from stage_tasks(RECIPE, "export")


def task_surgery():
    """Apply the recipe's graph passes: fold constants, infer shapes, fix text padding, freeze the text branch."""
    yield from stage_tasks(RECIPE, "surgery")


def task_precision():
    """Decide precision in the graph: ModelOpt AutoCast (fp16/bf16) or explicit Q/DQ (INT8/FP8), frozen nodes kept high."""
    yield from stage_tasks(RECIPE, "precision")


def task_engine():
    """Build a strongly typed TensorRT engine ahead of time for the recipe's GPU through Polygraphy."""
    yield from stage_tasks(RECIPE, "engine")


def task_validate():
    """Compare the built graph (ONNX Runtime; the engine where a GPU can run it) with PyTorch fp32."""
    yield from stage_tasks(RECIPE, "validate")


def task_pipeline_check():
    """Denoise the recipe's prompts all in PyTorch and on the built graphs; compare latents and images."""
    yield from stage_tasks(RECIPE, "pipeline_check")


def task_manifest():
    """Write artifacts/<recipe>/manifest.json: what was built from what, with digests and validation."""
    yield manifest_task(RECIPE)


def task_build():
    """Build, validate and record everything the recipe describes."""
    return {"actions": None, "task_dep": [f"manifest:{RECIPE.name}"]}
