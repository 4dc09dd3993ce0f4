"""Logging: quiet by default (a line per task and progress on long work), detail on request.

`FORGE_LOG=debug` shows every stage's detail and the third-party tools' own messages; the default `info`
keeps the task lines, progress and results. Known third-party noise (Polygraphy's info lines, ModelOpt and
transformers warnings, diffusers deprecations, progress bars) is silenced only around a stage's work by
`quiet_tools()`, which restores every setting it touches.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

LOGGER_NAME = "forge"
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def get(stage: str | None = None) -> logging.Logger:
    """The forge's logger, or a stage's child logger (its records print as `[stage] message`)."""
    return logging.getLogger(f"{LOGGER_NAME}.{stage}" if stage else LOGGER_NAME)


_COMPONENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("forge_component", default=None)


@contextlib.contextmanager
def for_component(component: str | None) -> Iterator[None]:
    """Stage lines name the component they are about (`[export transformer] ...`): with `doit -n 2` two tasks'
    lines arrive side by side, and each must say whose it is."""
    token = _COMPONENT.set(component)
    try:
        yield
    finally:
        _COMPONENT.reset(token)


class _StageFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stage = record.name.removeprefix(LOGGER_NAME).lstrip(".")
        message = record.getMessage()
        if not stage:
            return message
        component = _COMPONENT.get()
        return f"[{stage} {component}] {message}" if component else f"[{stage}] {message}"


class Steps:
    """`label: done/total` every few seconds of a long loop, and at its end if it took that long (quick loops
    stay quiet)."""

    def __init__(self, logger: logging.Logger, label: str, total: int, every_s: float = 5.0) -> None:
        self.logger, self.label, self.total, self.every_s = logger, label, total, every_s
        self.started = self.last = time.perf_counter()

    def update(self, done: int, total: int | None = None) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s or (done == (total or self.total) and now - self.started >= self.every_s):
            self.logger.info(f"{self.label}: {done}/{total or self.total} in {now - self.started:.0f}s")
            self.last = now


def level() -> int:
    """The level asked for in FORGE_LOG (default info); an unknown value falls back to info."""
    return LEVELS.get(os.environ.get("FORGE_LOG", "info").lower(), logging.INFO)


def tool_level() -> int:
    """The level handed to tools that configure their own logging (ModelOpt): errors only, unless debugging."""
    return logging.DEBUG if level() <= logging.DEBUG else logging.ERROR


def configure() -> None:
    """One stderr handler for the forge's logger (idempotent); third-party loggers are left alone."""
    logger = get()
    logger.setLevel(level())
    logger.propagate = False
    if not any(getattr(h, "_forge", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StageFormatter())
        handler._forge = True  # type: ignore[attr-defined]
        logger.addHandler(handler)


NOISY_LOGGERS = ("modelopt", "modelopt.onnx", "root", "onnxscript", "onnx_ir", "torch.onnx", "transformers",
                 "diffusers", "accelerate", "huggingface_hub")
NOISY_WARNINGS = (FutureWarning, DeprecationWarning, UserWarning)


@contextlib.contextmanager
def quiet_tools() -> Iterator[None]:
    """Third-party chatter off for the block (unless FORGE_LOG=debug); every setting restored afterwards."""
    if level() <= logging.DEBUG:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(warnings.catch_warnings())
        for category in NOISY_WARNINGS:
            warnings.simplefilter("ignore", category)
        for name in NOISY_LOGGERS:
            logger = logging.getLogger() if name == "root" else logging.getLogger(name)
            stack.callback(logger.setLevel, logger.level)
            logger.setLevel(logging.ERROR)
        previous = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        stack.callback(_restore_env, "TQDM_DISABLE", previous)
        stack.enter_context(_polygraphy_quiet())
        stack.enter_context(_hf_progress_bars_off())
        yield


def _restore_env(name: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@contextlib.contextmanager
def _polygraphy_quiet() -> Iterator[None]:
    try:
        from polygraphy.logger import G_LOGGER
    except ImportError:
        yield
        return
    colors = G_LOGGER.colors
    G_LOGGER.colors = False  # else its first message prints "[W] 'colored' module is not installed"
    try:
        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            yield
    finally:
        G_LOGGER.colors = colors


@contextlib.contextmanager
def _hf_progress_bars_off() -> Iterator[None]:
    """transformers' and diffusers' progress bars and info logs, off for the block, then as they were."""
    restore = []
    for module in ("transformers.utils.logging", "diffusers.utils.logging"):
        try:
            hf = __import__(module, fromlist=["logging"])
        except ImportError:
            continue
        enabled = hf.is_progress_bar_enabled()
        verbosity = hf.get_verbosity()
        hf.disable_progress_bar()
        hf.set_verbosity_error()
        restore.append((hf, enabled, verbosity))
    try:
        yield
    finally:
        for hf, enabled, verbosity in restore:
            hf.set_verbosity(verbosity)
            if enabled:
                hf.enable_progress_bar()


@dataclass
class Captured:
    """What native code and third-party prints wrote to stdout/stderr during a `captured_output()` block."""

    lines: list[str] = field(default_factory=list)

    def errors(self) -> list[str]:
        return [line for line in self.lines if "[E]" in line or "ERROR" in line or "Error" in line]


_CAPTURING: contextvars.ContextVar[bool] = contextvars.ContextVar("forge_capturing", default=False)


def _forge_handler() -> logging.Handler | None:
    return next((h for h in get().handlers if getattr(h, "_forge", False)), None)


@contextlib.contextmanager
def captured_output() -> Iterator[Captured]:
    """Process-level stdout and stderr (file descriptors 1 and 2) go to a temporary file for the block, so the
    chatter of native libraries (TensorRT's builder warnings, Polygraphy's and ONNX Runtime's prints, Python
    warnings) stays off the terminal; the forge's own log lines keep going to it. FORGE_LOG=debug shows the
    captured text afterwards; a block that raises logs its error lines at debug level."""
    captured = Captured()
    handler = _forge_handler()
    if _CAPTURING.get() or level() <= logging.DEBUG or not isinstance(handler, logging.StreamHandler):
        yield captured  # nested blocks: the outer one captures
        return
    capturing = _CAPTURING.set(True)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = os.dup(1), os.dup(2)
    terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1, encoding="utf-8", errors="replace")
    previous = handler.setStream(terminal)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            handler.setStream(previous)
            terminal.close()
            _CAPTURING.reset(capturing)
            sink.seek(0)
            captured.lines = sink.read().decode("utf-8", errors="replace").splitlines()


def human_bytes(count: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"
