"""Qwen-Image engine forge: `doit build recipe=a10-fp16` turns a recipe into validated TensorRT engines.

Command-line variables: `recipe=` (a name in recipes/ or a path to a YAML file, default a10-fp16),
`recipes=a,b` (comma-separated, for `doit audit`; default the `recipe=` one),
`model=` (`tiny` or a diffusers checkpoint directory), `verify=1` (rehash every output instead of the cheap
size/mtime/inode check), `remote=<url>` (overrides FORGE_REMOTE: a store mirror shared by CI runners),
`remote_required=1`, `doit generate`'s `prompt=`/`prompts=FILE`, `negative_prompt=`, `height=`, `width=`, `steps=`,
`cfg=`, `seed=`, `batch=`, `out=`, `runner=`, `truncate=`, and any dotted `key.path=value` recipe override. Exit codes: stages/tasks/ci.py and the README.
"""

import signal
import sys

from stages import log
from stages.errors import ForgeError
from stages.tasks import ci
from stages.tasks.ci import ForgeReporter
from stages.tasks.taskgraph import (audit_request, audit_task, banners, build_task, command_line_vars, gc_task,
                                    generate_request, generate_task, load_from_command_line, manifest_task,
                                    publish_task, stage_tasks)

DOIT_CONFIG = {
    "backend": "sqlite3",
    "dep_file": ".doit.db",
    "default_tasks": ["build"],
    "verbosity": 2,
    "reporter": ForgeReporter,  # the summary line and distinct exit codes (validation failed vs stage failed)
}

STOP = ci.Stop()
for stop in (signal.SIGINT, signal.SIGTERM):  # SIGTERM stops a build as Ctrl-C does: one line, no traceback
    signal.signal(stop, STOP)
log.configure()

try:
    BUILD = load_from_command_line(command_line_vars(), generating="generate" in sys.argv[1:])
    AUDIT = audit_request(command_line_vars(), BUILD)
    GENERATE = generate_request(command_line_vars(), BUILD, sys.argv)
    DOIT_CONFIG["reporter"] = ci.reporter(banners(BUILD), STOP)
except ForgeError as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(ci.EXIT_BAD_INPUT)
except KeyboardInterrupt:
    sys.exit(ci.EXIT_INTERRUPTED)


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
    """Build, validate and record everything the recipe describes (`doit help build`: variables, exit codes)."""
    return build_task(BUILD, command_line_vars())


def task_publish():
    """Put every store entry of the recipe on the remote (FORGE_REMOTE / remote=), e.g. ones built before it was set."""
    return publish_task(BUILD)


def task_audit():
    """Audit `recipes=a,b` (building what is missing): artifacts/audit/<a+b>/report.html with charts, images, OCR."""
    return audit_task(AUDIT)


def task_generate():
    """Images from the recipe's engines (`prompt=` or `prompts=FILE`, height=, width=, steps=, cfg=, seed=, batch=, out=)."""
    return generate_task(BUILD, GENERATE)


def task_gc():
    """Delete store entries that no recipe's view references; says how many bytes it freed."""
    return gc_task(BUILD)
