"""Qwen-Image engine forge: `doit build recipe=a10-fp16` turns a recipe into validated TensorRT engines.

Command-line variables: `recipe=` (a name in recipes/ or a path to a YAML file, default a10-fp16),
`model=` (`tiny` or a diffusers checkpoint directory), `verify=1` (rehash every output instead of the cheap
size/mtime/inode check), and any dotted `key.path=value` recipe override.
"""

import signal
import sys

from stages.errors import ForgeError
from stages.taskgraph import (build_task, command_line_vars, gc_task, load_from_command_line, manifest_task,
                              stage_tasks)

DOIT_CONFIG = {
    "backend": "sqlite3",
    "dep_file": ".doit.db",
    "default_tasks": ["build"],
    "verbosity": 2,
}

signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops a build as Ctrl-C does

try:
    BUILD = load_from_command_line(command_line_vars())
except ForgeError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


def task_checkpoint():
    """Save the built-in tiny random-weight model as a diffusers checkpoint (skipped for model=<dir>)."""
    yield from stage_tasks(BUILD, "checkpoint")


def task_calibration():
    """Capture real inputs of each INT8/FP8 component from the PyTorch pipeline (shared between recipes)."""
    yield from stage_tasks(BUILD, "calibration")


def task_export():
    """Export each component to ONNX from the real diffusers model (real-valued RoPE, fixed text length)."""
    yield from stage_tasks(BUILD, "export")


def task_surgery():
    """Apply the recipe's graph passes: fold constants, infer shapes, fix text padding, freeze the text branch."""
    yield from stage_tasks(BUILD, "surgery")


def task_precision():
    """Decide precision in the graph: ModelOpt AutoCast (fp16/bf16) or explicit Q/DQ (INT8/FP8), frozen nodes kept high."""
    yield from stage_tasks(BUILD, "precision")


def task_engine():
    """Build a strongly typed TensorRT engine ahead of time for the recipe's GPU through Polygraphy."""
    yield from stage_tasks(BUILD, "engine")


def task_validate():
    """Compare the built graph (ONNX Runtime; the engine where a GPU can run it) with PyTorch fp32."""
    yield from stage_tasks(BUILD, "validate")


def task_pipeline_check():
    """Denoise the recipe's prompts all in PyTorch and on the built graphs; compare latents and images."""
    yield from stage_tasks(BUILD, "pipeline_check")


def task_manifest():
    """Write artifacts/<recipe>/manifest.json: what was built from what, with digests and validation."""
    yield manifest_task(BUILD)


def task_build():
    """Build, validate and record everything the recipe describes (`doit clean` removes the recipe's view)."""
    return build_task(BUILD)


def task_gc():
    """Delete store entries that no recipe's view references; says how many bytes it freed."""
    return gc_task(BUILD)
