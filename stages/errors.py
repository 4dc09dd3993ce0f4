"""One exception type for every user-facing failure, so entry points can print it as one line."""

from __future__ import annotations

from pathlib import Path


class ForgeError(Exception):
    """A problem the user can fix; its message names the file, the key and what is allowed."""


def fail(source: str | Path | None, key: str | None, message: str) -> ForgeError:
    """Build a ForgeError reading `file: key: message`, the shape every error of the forge takes."""
    parts = [str(part) for part in (source, key) if part]
    return ForgeError(": ".join([*parts, message]))
