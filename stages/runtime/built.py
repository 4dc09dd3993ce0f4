"""A built recipe as its manifest describes it: which files each component runs from, verified before use.

Light on purpose (json, hashlib): `doit generate` checks a build with it before loading any model. Paths in a
manifest are relative to the recipe's view (`artifacts/<recipe>/`), so a copied or downloaded view works as is.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.errors import fail
from stages.store.digests import sha256_file

MANIFEST = "manifest.json"
COMPONENTS = ("text_encoder", "transformer", "vae_decoder")


@dataclass
class BuiltRecipe:
    """One view's manifest and the files it lists; `verify` rehashes what a run will open."""

    manifest_path: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    verified: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, manifest_path: str | Path) -> BuiltRecipe:
        path = Path(manifest_path)
        if path.is_dir():
            path = path / MANIFEST
        try:
            data = path.read_bytes()
            manifest = json.loads(data)
        except OSError:
            raise fail(path, None, "no manifest here; build the recipe first (doit build recipe=...)") from None
        except ValueError as error:
            raise fail(path, None, f"not a JSON manifest ({error})") from None
        if not isinstance(manifest, dict) or not isinstance(manifest.get("components"), dict):
            raise fail(path, "components", "not a forge manifest (no components section)")
        missing = [c for c in COMPONENTS if c not in manifest["components"]]
        if missing:
            raise fail(path, "components", f"the recipe builds no {', '.join(missing)}; generating needs engines "
                       f"for all of {', '.join(COMPONENTS)}")
        return cls(path, manifest, hashlib.sha256(data).hexdigest())

    @property
    def root(self) -> Path:
        return self.manifest_path.parent

    @property
    def name(self) -> str:
        return str(self.manifest["recipe"]["name"])

    @property
    def recipe(self) -> dict[str, Any]:
        return self.manifest["recipe"]["resolved"]

    @property
    def text_length(self) -> int:
        return int(self.recipe["text_length"])

    @property
    def family(self) -> str:
        return str(self.recipe.get("family", "qwen-image"))

    @property
    def target(self) -> dict[str, Any]:
        return self.manifest["target"]

    @property
    def compute_capability(self) -> tuple[int, int]:
        major, minor = str(self.target["compute_capability"]).split(".")
        return int(major), int(minor)

    def component(self, name: str) -> dict[str, Any]:
        return self.manifest["components"][name]

    def files(self, component: str, stage: str) -> list[dict[str, Any]]:
        entries = self.component(component)["artifacts"].get(stage)
        if not entries:
            raise fail(self.manifest_path, f"components.{component}.artifacts.{stage}",
                       "lists no files; rebuild the recipe")
        return entries

    def path(self, component: str, stage: str, name: str) -> Path:
        """A listed file of a stage by its name inside the stage's folder (e.g. `model.onnx`), verified."""
        for entry in self.files(component, stage):
            if entry["path"] == f"{component}/{stage}/{name}":
                return self.verify(entry)
        raise fail(self.manifest_path, f"components.{component}.artifacts.{stage}", f"lists no {name}")

    def stage_dir(self, component: str, stage: str) -> Path:
        """Every file of a stage verified; its folder (e.g. the tokenizer and configs shipped with the export)."""
        for entry in self.files(component, stage):
            self.verify(entry)
        return self.root / component / stage

    def engine_paths(self, component: str) -> list[Path]:
        """The engine file, or every part's in run order (a split engine), verified."""
        parts = self.component(component).get("parts")
        if parts:
            return [self.verify(next(f for f in part["files"] if f["path"].endswith(".plan"))) for part in parts]
        return [self.verify(next(f for f in self.files(component, "engine") if f["path"].endswith(".plan")))]

    def engine_sha256(self) -> dict[str, list[str]]:
        """Each component's engine digests (every part's, in order) as the manifest records them."""
        found = {}
        for component in COMPONENTS:
            parts = self.component(component).get("parts")
            files = [f for part in parts for f in part["files"]] if parts else self.files(component, "engine")
            found[component] = [f["sha256"] for f in files if f["path"].endswith(".plan")]
        return found

    def verify(self, entry: dict[str, Any]) -> Path:
        """The file a manifest entry names, refused in one line when it is missing or its sha256 differs."""
        path = self.root / entry["path"]
        if entry["path"] in self.verified:
            return path
        if not path.is_file():
            raise fail(path, "sha256", "missing; rebuild the recipe (doit build recipe=...)")
        if sha256_file(path) != entry["sha256"]:
            raise fail(path, "sha256", f"does not match the manifest ({entry['sha256'][:12]}...): damaged or replaced; "
                       "rebuild the recipe")
        self.verified.add(entry["path"])
        return path

    @property
    def lora_settings(self) -> Any:
        """The recipe's `components.transformer.lora` (None: the engine has no LoRA inputs)."""
        from stages.recipe.schema import LoraSettings

        section = (self.recipe.get("components") or {}).get("transformer") or {}
        entry = self.component("transformer").get("lora")
        return LoraSettings.model_validate(section["lora"]) if entry and section.get("lora") else None

    def profile(self, component: str) -> dict[str, Any]:
        return self.recipe["components"][component]["profile"]

    def streaming_budget_bytes(self, component: str) -> int | None:
        streaming = ((self.component(component).get("fit") or {}).get("streaming") or {})
        budget = streaming.get("budget_gib")
        return None if budget is None else int(float(budget) * 1024**3)
