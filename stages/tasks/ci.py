"""What a CI system reads from a build besides the artifacts: the exit code and one summary line.

doit itself exits 1 for any failed task and 2 for an action that raised, which would collide with the forge's
"bad input" code. `ForgeReporter` (set in dodo.py's DOIT_CONFIG, so the command stays `doit build`) tells a
failed validation from a failed stage and ends the run with the documented code once doit has saved its state.
Light on purpose: imported while the task graph is built.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from doit.exceptions import BaseFail, UnmetDependency
from doit.reporter import ConsoleReporter

from stages.log import human_bytes

EXIT_OK = 0  # built, validated, manifest and junit.xml written
EXIT_STAGE_FAILED = 1  # a stage could not produce its output (or a required remote was unreachable)
EXIT_BAD_INPUT = 2  # recipe, override, checkpoint or remote setting refused before anything ran (dodo.py)
EXIT_DOIT_USAGE = 3  # doit's own code for an unknown task or option: the reporter never runs
EXIT_VALIDATION_FAILED = 4  # everything built, but a validation or pipeline check is outside its thresholds
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: finished tasks kept, the running ones lost (the shell's 128 + SIGINT)


COUNTS = ("built", "reused", "fetched", "published", "up_to_date", "bytes_down", "bytes_up", "seconds_down",
          "seconds_up")
VALUES_KEY = "forge"  # what a stage action returns to doit: {"forge": {counts..., "failed": ...}}


@dataclass
class Tally:
    """Counts for the summary line. Each stage action counts its own task into a Tally of its own and hands it back
    to doit as the task's values (`values`), which reach the reporter in doit's own process also when tasks run in
    parallel worker processes (`doit -n 2`); the reporter merges them. No process keeps a global count."""

    built: int = 0
    reused: int = 0
    fetched: int = 0
    published: int = 0
    up_to_date: int = 0
    bytes_down: int = 0
    bytes_up: int = 0
    seconds_down: float = 0.0
    seconds_up: float = 0.0
    remote: str | None = None
    remote_note: str | None = None

    def fetch(self, transfer: Any) -> None:
        """A stages.store.remote.Transfer that placed an entry."""
        self.fetched, self.bytes_down, self.seconds_down = (
            self.fetched + 1, self.bytes_down + transfer.bytes, self.seconds_down + transfer.seconds)

    def publish(self, transfer: Any) -> None:
        self.published, self.bytes_up, self.seconds_up = (
            self.published + 1, self.bytes_up + transfer.bytes, self.seconds_up + transfer.seconds)

    def values(self) -> dict[str, Any]:
        """The non-zero counts plus the remote's url and note: one task's doit values."""
        counts = {name: getattr(self, name) for name in COUNTS if getattr(self, name)}
        return {**counts, "remote": self.remote, "remote_note": self.remote_note}

    def merge(self, delta: dict[str, Any]) -> None:
        for name in COUNTS:
            setattr(self, name, getattr(self, name) + delta.get(name, 0))
        self.remote = delta.get("remote") or self.remote
        self.remote_note = delta.get("remote_note") or self.remote_note

    def line(self) -> str:
        parts = [f"{self.built} built", f"{self.fetched} fetched", f"{self.reused} reused", f"{self.up_to_date} up to date"]
        text = "summary: " + ", ".join(parts)
        if self.remote is None:
            return text + "; no remote"
        down = _rate(self.bytes_down, self.seconds_down)
        up = _rate(self.bytes_up, self.seconds_up)
        text += f"; {self.published} published; {human_bytes(self.bytes_down)} down{down}, {human_bytes(self.bytes_up)} up{up}"
        return text + f"; remote {self.remote}" + (f" ({self.remote_note})" if self.remote_note else "")


def _rate(count: int, seconds: float) -> str:
    return f" ({human_bytes(count / seconds)}/s)" if count and seconds > 0 else ""


class Stop:
    """The SIGINT/SIGTERM handler dodo.py installs: remember which signal, then stop as Ctrl-C does (finished
    entries are committed, scratch of the running tasks is removed on the way out)."""

    def __init__(self) -> None:
        self.signal: str | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        import signal

        self.signal = signal.Signals(signum).name
        raise KeyboardInterrupt


def reporter(banners: Sequence[str], stop: Stop) -> type[ForgeReporter]:
    """The reporter class for DOIT_CONFIG (doit instantiates it), bound to this build's banners and stop handler."""
    return type("ForgeReporter", (ForgeReporter,), {"banners": tuple(banners), "stop": stop})


class ForgeReporter(ConsoleReporter):
    """doit's console output, plus banners, the summary line, every failed check, and the forge's exit codes."""

    desc = "console output, forge summary line and exit codes"
    banners: tuple[str, ...] = ()  # said at the start of every run of the build's tasks (tiny model, overrides)
    stop: Stop = Stop()

    def __init__(self, outstream: Any, options: dict[str, Any]) -> None:
        super().__init__(outstream, options)
        self.tally = Tally()
        self.failed_checks: list[str] = []
        self.stage_failures = 0
        self.running: dict[str, None] = {}
        self.stage_tasks_seen = False
        self.started = time.perf_counter()

    def initialize(self, tasks: Any, selected_tasks: Any) -> None:
        super().initialize(tasks, selected_tasks)
        from stages import log

        for line in self.banners:
            log.get().warning(line)

    def skip_uptodate(self, task: Any) -> None:
        super().skip_uptodate(task)
        if _is_stage_task(task.name):
            self.tally.up_to_date += 1
            self.stage_tasks_seen = True

    def execute_task(self, task: Any) -> None:
        if task.name == "build":  # its action only records the no-op snapshot (stages.plan.noop)
            return
        super().execute_task(task)
        self.running[task.name] = None
        if _is_stage_task(task.name):
            self.stage_tasks_seen = True

    def _collect(self, task: Any) -> None:
        self.running.pop(task.name, None)
        values = (getattr(task, "values", None) or {}).get(VALUES_KEY) or {}
        self.tally.merge(values)
        if values.get("failed"):
            self.failed_checks.append(values["failed"])

    def add_success(self, task: Any) -> None:
        super().add_success(task)
        self._collect(task)

    def add_failure(self, task: Any, fail: BaseFail) -> None:
        super().add_failure(task, fail)
        self._collect(task)
        if not isinstance(fail, UnmetDependency):  # tasks after a failed one: not failures of their own
            self.stage_failures += 1

    def runtime_error(self, msg: str) -> None:
        super().runtime_error(msg)
        self.stage_failures += 1

    def complete_run(self) -> None:
        from stages import log

        logger = log.get()
        if self.stop.signal:
            sys.stdout.flush()
            lost = ", ".join(self.running) or "none"
            logger.error(f"interrupted ({self.stop.signal}): kept {self.tally.built + self.tally.fetched} task(s) finished in this run (committed "
                         f"to the store); lost the work of the task(s) still running: {lost} (scratch removed); "
                         "rerun to continue")
            sys.stderr.flush()
            raise SystemExit(EXIT_INTERRUPTED)
        super().complete_run()
        for line in self.failed_checks:
            logger.error(f"FAILED {line}")
        if self.stage_tasks_seen:
            logger.info(f"{self.tally.line()}; {time.perf_counter() - self.started:.1f} s")
        sys.stderr.flush()
        code = self.exit_code()
        if code != EXIT_OK:
            # Called by doit's runner after it saved its state; the runner would return 1 or 2 (2 is bad input here).
            raise SystemExit(code)

    def exit_code(self) -> int:
        if self.stage_failures:
            return EXIT_STAGE_FAILED
        return EXIT_VALIDATION_FAILED if self.failed_checks else EXIT_OK


def _is_stage_task(name: str) -> bool:
    from stages.plan.registry import STAGES

    return name.split(":", 1)[0] in STAGES and ":" in name
