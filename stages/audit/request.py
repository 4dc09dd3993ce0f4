"""The types the audit's modules share: what `doit audit` was asked, where its reports go, runner names."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from stages.store.views import AUDIT_DIR

__all__ = ["AUDIT_DIR", "MAX_NAME", "RUNNER_NAMES", "AuditRequest"]

RUNNER_NAMES = {"onnxruntime": "ONNX Runtime", "tensorrt-engine": "the TensorRT engine"}
MAX_NAME = 64


@dataclass(frozen=True)
class AuditRequest:
    """What `doit audit` was asked: recipes as given (to build what is missing) and their view names."""

    sources: tuple[str, ...]
    views: tuple[str, ...]
    overrides: tuple[tuple[str, str], ...]
    model: str | None
    root: Path
    thresholds: dict[str, dict[str, float | None]]  # view -> the recipe's `audit` section
    build_vars: tuple[tuple[str, str], ...] = ()  # other command-line variables a build of a missing recipe gets

    @property
    def name(self) -> str:
        joined = "+".join(self.views)
        if len(joined) <= MAX_NAME:
            return joined
        return f"{self.views[0][:40]}+{len(self.views) - 1}-more-{hashlib.sha256(joined.encode()).hexdigest()[:8]}"

    @property
    def out_dir(self) -> Path:
        return self.root / AUDIT_DIR / self.name
