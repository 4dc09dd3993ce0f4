"""One exception type for every user-facing failure, and one way to tell any failure in one line."""

from __future__ import annotations

import os
from pathlib import Path

DEBUG_VAR = "FORGE_DEBUG"  # =1: tracebacks instead of one line


class ForgeError(Exception):
    """A problem the user can fix; its message names the file, the key and what is allowed."""


def fail(source: str | Path | None, key: str | None, message: str) -> ForgeError:
    """Build a ForgeError reading `file: key: message`, the shape every error of the forge takes."""
    parts = [str(part) for part in (source, key) if part]
    return ForgeError(": ".join([*parts, message]))


def debugging() -> bool:
    return os.environ.get(DEBUG_VAR) == "1"


def summary(error: BaseException) -> str:
    """`Type: first line of the message`: an unexpected error, short enough for a log line."""
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"


def one_line(error: BaseException) -> str:
    """A ForgeError's own message; anything else as its summary plus where the traceback is."""
    if isinstance(error, ForgeError):
        return str(error)
    return f"{summary(error)} ({DEBUG_VAR}=1 shows the traceback)"
