"""Run one task's stage in a process of its own, so its memory is its own and is returned when it ends.

doit runs every task in one process; at real scale (tens of GB per component) memory left behind by one
export would accumulate into the next. Tasks whose component weighs more than FORGE_ISOLATE_ABOVE_BYTES
(default 1 GiB; 0 isolates every task) run in a spawned child that dies with its parent, and report their own
peak RSS. Small tasks run in-process: a fresh interpreter costs seconds of imports.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import resource
import signal
import traceback
from pathlib import Path
from typing import Any

from stages import log
from stages.errors import ForgeError, debugging, summary
from stages.families.base import ModuleThunk
from stages.inputs import Ref, StageInputs

DEFAULT_THRESHOLD = 1 << 30
LOG = log.get()


def threshold() -> int:
    try:
        return int(os.environ.get("FORGE_ISOLATE_ABOVE_BYTES", DEFAULT_THRESHOLD))
    except ValueError:
        raise ForgeError(f"FORGE_ISOLATE_ABOVE_BYTES: {os.environ['FORGE_ISOLATE_ABOVE_BYTES']!r} is not a byte "
                         "count; allowed: an integer (0 isolates every task)") from None


def component_bytes(loaded: Any, ref: Ref, checkpoint: Path | None) -> int:
    """Checkpoint weight bytes behind the task: its component's, or the whole pipeline's for recipe-wide stages."""
    return 0 if checkpoint is None else loaded.family.weight_bytes(checkpoint, ref.component)


def _configure_and_run(module: ModuleThunk, loaded: Any, ref: Ref, inputs: StageInputs, scratch: Path) -> dict[str, Any]:
    with log.for_component(ref.component), log.quiet_tools(), log.captured_output():
        stage = module()  # inside: import-time warnings are tool chatter too
        return stage.from_recipe(loaded, ref.component, inputs)(scratch)


def run(module: ModuleThunk, loaded: Any, ref: Ref, inputs: StageInputs, scratch: Path, isolate: bool) -> dict[str, Any]:
    """The stage's report; in a child process when `isolate`. Errors come back as the child raised them
    (ForgeError stays a ForgeError); a child killed (e.g. out of memory) is one line saying so."""
    if not isolate:
        return _configure_and_run(module, loaded, ref, inputs, scratch)
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(sender, module, loaded, ref, inputs, scratch), daemon=True)
    child.start()
    sender.close()
    try:
        message = receiver.recv() if receiver.poll(None) else None
    except EOFError:
        message = None
    except BaseException:  # Ctrl-C / SIGTERM: the parent decides, the child's work is lost with its scratch
        child.kill()
        raise
    finally:
        child.join()
    if message is None:
        cause = f"signal {-child.exitcode}" if child.exitcode and child.exitcode < 0 else f"exit {child.exitcode}"
        raise ForgeError(f"the task's process died ({cause}) before reporting; out of memory?")
    kind, payload, peak_kb = message
    LOG.debug(f"{ref.label}: own process, peak RSS {peak_kb / 1e6:.2f} GB")
    if kind == "ok":
        return payload
    if kind == "forge":
        raise ForgeError(payload)
    if debugging():
        LOG.error(payload[2])
    raise RuntimeError(f"{payload[0]}: {payload[1]}")


def _child(sender: Any, module: ModuleThunk, loaded: Any, ref: Ref, inputs: StageInputs, scratch: Path) -> None:
    """Child side: die with the parent (no orphan writing into a swept scratch), run, send the outcome."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: the parent handles it
    log.configure()
    try:
        message: tuple[str, Any] = ("ok", _configure_and_run(module, loaded, ref, inputs, scratch))
    except ForgeError as error:
        message = ("forge", str(error))
    except Exception as error:  # noqa: BLE001 - handed to the parent, which turns it into one line
        name, first = summary(error).split(": ", 1)
        message = ("error", (name, first, traceback.format_exc()))
    sender.send((*message, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))
    sender.close()
