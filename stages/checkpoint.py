"""Checkpoint stage: materialise the built-in tiny pipeline as a diffusers-layout checkpoint.

Saving it (instead of regenerating weights in every stage) means export and validation load the exact same
weights through the same `from_pretrained` path a real Qwen-Image checkpoint takes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.inputs import StageInputs
from stages.recipe import LoadedRecipe

TINY_BANNER = "TINY MODEL: random weights (seed {seed}), not Qwen-Image; numbers say nothing about the real model"


@dataclass(frozen=True)
class SaveTinyCheckpoint:
    seed: int

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        from stages.models.qwen_pipeline import save_tiny_checkpoint

        print(TINY_BANNER.format(seed=self.seed), file=sys.stderr)
        return {"model": "tiny", "seed": self.seed, **save_tiny_checkpoint(self.seed, out_dir)}


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> SaveTinyCheckpoint:
    return SaveTinyCheckpoint(seed=loaded.recipe.model.seed)
