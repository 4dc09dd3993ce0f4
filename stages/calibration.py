"""Calibration stage: capture each quantized component's real inputs from the PyTorch pipeline.

The feeds are the stage's output, so they live in a store entry keyed by what determines them (model files,
prompt file contents, steps, sizes, samples, text length, code); recipes asking for identical data (l40s-fp8
and rtx5090-fp8) share that one entry instead of running the pipeline again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from stages import log
from stages.errors import fail
from stages.families import DEFAULT_FAMILY, FAMILIES
from stages.graphs import blockwise
from stages.inputs import StageInputs
from stages.store.digests import sha256_file

if TYPE_CHECKING:
    from stages.recipe.schema import CalibrationSettings, LoadedRecipe

LOG = log.get("calibration")

INDEX_FILE = "index.json"


def load_prompts(settings: CalibrationSettings) -> list[str]:
    path = settings.prompts_file
    prompts = yaml.safe_load(path.read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise fail(path, "precision.calibration.prompts", "must be a YAML list of non-empty prompt strings")
    return prompts


@dataclass(frozen=True)
class CaptureCalibration:
    component: str
    checkpoint_dir: Path
    settings: CalibrationSettings
    text_length: int
    family: str = DEFAULT_FAMILY
    blockwise: dict[str, bool] = field(default_factory=dict)  # component -> run it one block at a time

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import json

        import numpy as np

        capture = FAMILIES[self.family].calibration().CAPTURE

        prompts = load_prompts(self.settings)
        started = time.perf_counter()
        LOG.info(f"capturing {self.component} inputs: {len(prompts)} prompts, sizes {self.settings.sizes}, "
              f"{self.settings.num_inference_steps} steps ({self.settings.steps})")
        feeds = capture[self.component](self.checkpoint_dir, prompts, self.settings, self.text_length, self.blockwise)
        files = {}
        for number, feed in enumerate(feeds):
            name = f"feed_{number:04d}.npz"
            np.savez(out_dir / name, **feed)
            files[name] = sha256_file(out_dir / name)
        index = {"component": self.component, "samples": len(feeds), "files": files, "prompts": prompts,
                 "settings": self.settings.model_dump(mode="json", exclude={"method"}),
                 "inputs": {k: list(v.shape) for k, v in feeds[0].items()} if feeds else {}}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
        LOG.info(f"{len(feeds)} feeds in {time.perf_counter() - started:.1f}s")
        return index


def load_feeds(folder: Path) -> list[dict[str, Any]]:
    """The captured feeds, verified against the digests recorded when they were written."""
    import json

    import numpy as np

    index = json.loads((folder / INDEX_FILE).read_text())
    feeds = []
    for name, sha in index["files"].items():
        if sha256_file(folder / name) != sha:
            raise fail(folder / name, "calibration", "file changed since capture (sha256 mismatch); rerun the build")
        with np.load(folder / name) as data:
            feeds.append({key: data[key] for key in data.files})
    return feeds


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> CaptureCalibration:
    assert component is not None
    plan = loaded.recipe.components[component].precision
    assert plan.calibration is not None
    # the pipeline runs the family's components in fp32; each one heavy enough runs block by block (same feeds)
    layered = {name: blockwise.wanted(plan.blockwise, loaded.family, name, inputs.weights)
               for name, spec in loaded.family.components.items() if spec.block_pattern}
    return CaptureCalibration(component, inputs.weights, plan.calibration, loaded.recipe.text_length,
                              loaded.recipe.family, layered)
