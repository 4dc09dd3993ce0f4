"""Checkpoint stage: materialise the built-in tiny pipeline as a diffusers-layout checkpoint.

Saving it (instead of regenerating weights in every stage) means export and validation load the exact same
weights through the same `from_pretrained` path a real Qwen-Image checkpoint takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import log
from stages.families import DEFAULT_FAMILY, FAMILIES
from stages.inputs import StageInputs

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

LOG = log.get("checkpoint")

TINY_BANNER = "TINY MODEL: random weights (seed {seed}), not Qwen-Image; numbers say nothing about the real model"


@dataclass(frozen=True)
class SaveTinyCheckpoint:
    seed: int
    family: str = DEFAULT_FAMILY

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        save_tiny_checkpoint = FAMILIES[self.family].pipeline().save_tiny_checkpoint
        LOG.warning(TINY_BANNER.format(seed=self.seed))
        return {"model": "tiny", "seed": self.seed, **save_tiny_checkpoint(self.seed, out_dir)}


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> SaveTinyCheckpoint:
    return SaveTinyCheckpoint(seed=loaded.recipe.model.seed, family=loaded.recipe.family)
