"""Backends by recipe name. Adding one: a module beside these defining `BACKEND`, plus one line here."""

from __future__ import annotations

from stages.targets.backends import tensorrt, tensorrt_rtx
from stages.targets.backends.base import Backend

BACKENDS: dict[str, Backend] = {module.BACKEND.name: module.BACKEND for module in (tensorrt_rtx, tensorrt)}
