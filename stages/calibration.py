"""Calibration stage: capture each quantized component's real inputs once, share them between recipes.

The data lives in artifacts/calibration/<digest>/, where the digest covers everything that determines it
(component, model, prompt file contents, steps, sizes, samples, text length). A recipe asking for identical
calibration data reuses that directory instead of re-running the pipeline; its own stage record points at it.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages import artifacts
from stages.errors import fail
from stages.recipe import REPO_DIR, CalibrationSettings, LoadedRecipe

INDEX_FILE = "index.json"


def prompts_path(settings: CalibrationSettings) -> Path:
    repo_relative = REPO_DIR / settings.prompts
    return repo_relative if repo_relative.is_file() else Path(settings.prompts)


def load_prompts(settings: CalibrationSettings) -> list[str]:
    path = prompts_path(settings)
    prompts = yaml.safe_load(path.read_text())
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise fail(path, "precision.calibration.prompts", "must be a YAML list of non-empty prompt strings")
    return prompts


def calibration_digest(component: str, model: dict[str, Any], settings: CalibrationSettings, text_length: int) -> str:
    """Identity of a calibration set: equal digests mean interchangeable data."""
    identity = {
        "component": component,
        "model": model,
        "settings": settings.model_dump(mode="json", exclude={"method", "prompts"}),
        "prompts_sha256": hashlib.sha256(prompts_path(settings).read_bytes()).hexdigest(),
        "text_length": text_length,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]


def shared_dir(digest: str) -> Path:
    return artifacts.ARTIFACTS_DIR / "calibration" / digest


@dataclass(frozen=True)
class CaptureCalibration:
    component: str
    checkpoint_dir: Path
    settings: CalibrationSettings
    text_length: int
    digest: str

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        target = shared_dir(self.digest)
        reused = (target / INDEX_FILE).is_file()
        if reused:
            print(f"[calibration] reusing shared calibration data {self.digest}", file=sys.stderr)
        else:
            self._capture(target)
        index = artifacts.read_json(target / INDEX_FILE)
        return {"component": self.component, "digest": self.digest, "reused": reused,
                "shared_dir": str(target.relative_to(artifacts.ARTIFACTS_DIR)), **index}

    def _capture(self, target: Path) -> None:
        import numpy as np

        from stages.models.qwen_calibration import CAPTURE

        prompts = load_prompts(self.settings)
        started = time.perf_counter()
        print(f"[calibration] capturing {self.component} inputs: {len(prompts)} prompts, sizes {self.settings.sizes}, "
              f"{self.settings.num_inference_steps} steps ({self.settings.steps})", file=sys.stderr)
        feeds = CAPTURE[self.component](self.checkpoint_dir, prompts, self.settings, self.text_length)
        with artifacts.staged_output(target) as scratch:
            files = {}
            for number, feed in enumerate(feeds):
                name = f"feed_{number:04d}.npz"
                np.savez(scratch / name, **feed)
                files[name] = artifacts.sha256_file(scratch / name)
            index = {"samples": len(feeds), "files": files, "prompts": prompts,
                     "settings": self.settings.model_dump(mode="json"),
                     "inputs": {k: list(v.shape) for k, v in feeds[0].items()} if feeds else {},
                     "seconds": round(time.perf_counter() - started, 2)}
            artifacts.write_json_atomic(scratch / INDEX_FILE, index)
        print(f"[calibration] {len(feeds)} feeds -> {target}", file=sys.stderr)


def load_feeds(digest: str) -> list[dict[str, Any]]:
    """The captured feeds, verified against the digests recorded when they were written."""
    import numpy as np

    folder = shared_dir(digest)
    index = artifacts.read_json(folder / INDEX_FILE)
    feeds = []
    for name, sha in index["files"].items():
        if artifacts.sha256_file(folder / name) != sha:
            raise fail(folder / name, "calibration", "file changed since capture (sha256 mismatch); rerun the build")
        with np.load(folder / name) as data:
            feeds.append({key: data[key] for key in data.files})
    return feeds


def from_recipe(loaded: LoadedRecipe, component: str | None) -> CaptureCalibration:
    from stages.checkpoint import checkpoint_dir
    from stages.taskgraph import model_identity

    assert component is not None
    settings = loaded.recipe.components[component].precision.calibration
    assert settings is not None
    digest = calibration_digest(component, model_identity(loaded), settings, loaded.recipe.text_length)
    return CaptureCalibration(component, checkpoint_dir(loaded), settings, loaded.recipe.text_length, digest)
