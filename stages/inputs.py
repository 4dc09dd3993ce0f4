"""What a stage is configured with besides its recipe section: where its upstream outputs and weights are.

Stdlib only: every stage imports it, so it is part of every stage's code digest and must stay small.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import fail


@dataclass(frozen=True, order=True)
class Ref:
    """One task: a stage for one component (or recipe-wide, component None); `part`: one engine of a component
    built as consecutive block-range parts (stages.graphs.parts)."""

    stage: str
    component: str | None = None
    part: int | None = None

    @property
    def label(self) -> str:
        """`component/stage[-partN]` or `stage`: the task's path inside a recipe's view."""
        base = f"{self.component}/{self.stage}" if self.component else self.stage
        return base if self.part is None else f"{base}-part{self.part}"


@dataclass(frozen=True)
class StageInputs:
    """Upstream store entries by task, the checkpoint folder stages load weights from, and the artifacts root
    (reports name files relative to it, so they stay portable)."""

    checkpoint: Path | None
    dirs: dict[Ref, Path]
    root: Path
    shared_copy: Callable[[Path, str], Path] | None = None  # the store's copy of a checkpoint file (another filesystem)
    part: int | None = None  # the part this task builds, for a component split into block-range engines

    def dir(self, stage: str, component: str | None = None) -> Path:
        try:
            return self.dirs[Ref(stage, component)]
        except KeyError:
            raise fail(stage, component, "upstream output not among this stage's inputs") from None

    def report(self, stage: str, component: str | None = None) -> dict[str, Any]:
        return _report_in(self.dir(stage, component))

    def parts(self, stage: str, component: str) -> list[Path]:
        """The upstream entries of a stage split into parts, in part order (one entry when it is not split)."""
        found = sorted((ref.part, path) for ref, path in self.dirs.items()
                       if ref.stage == stage and ref.component == component and ref.part is not None)
        return [path for _, path in found] if found else [self.dir(stage, component)]

    def part_contracts(self, stage: str, component: str) -> tuple[dict[str, Any], ...]:
        """The `part` section of each part's report (its blocks, inputs and outputs), in part order; () when the
        stage is not split."""
        paths = self.parts(stage, component)
        if len(paths) == 1:
            return ()
        return tuple(_report_in(path)["part"] for path in paths)

    def has(self, stage: str, component: str | None = None) -> bool:
        return Ref(stage, component) in self.dirs

    @property
    def weights(self) -> Path:
        if self.checkpoint is None:
            raise fail("checkpoint", None, "the tiny checkpoint has not been built")
        return self.checkpoint

    def relative(self, path: Path) -> str:
        """Path relative to the artifacts root where it lies inside it (store entries), else its name only."""
        try:
            return str(Path(path).resolve().relative_to(self.root.resolve()))
        except ValueError:
            return Path(path).name


def _report_in(entry: Path) -> dict[str, Any]:
    return json.loads((entry / "record.json").read_text())["report"]
