"""Store keys of one build: a task's key is the digest of everything that can change its output.

Inputs of a task: its resolved recipe settings, the checkpoint files it reads (by sha256), the sha256 of every
upstream output it reads, its tool versions, the source of every project module it can execute, and the record
schema. Upstream outputs enter by content, not by key, so a stage that reruns but writes the same bytes does not
rerun what follows it. A key is known once every upstream entry exists; before that the task is not up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages.plan import fingerprint, registry
from stages.plan.registry import Ref
from stages.recipe.schema import LoadedRecipe
from stages.store import digests
from stages.store.local import CACHE_DIR, SCHEMA, Entry, Store

if TYPE_CHECKING:
    from stages.store.remote import Remote


@dataclass
class Build:
    """One `doit` process's view of one recipe: the store, how deep to verify, keys and entries."""

    loaded: LoadedRecipe
    root: Path
    deep: bool = False
    store: Store = field(init=False)
    files: digests.FileDigests = field(init=False)
    code: fingerprint.CodeIndex = field(init=False)

    remote: Remote | None = None  # the store's mirror (FORGE_REMOTE / remote=), shared by CI runners
    _keys: dict[Ref, str] = field(init=False, default_factory=dict)
    _weights: dict[str, Path] | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.store = Store(self.root)
        self.files = digests.FileDigests(self.root / CACHE_DIR / digests.FILE_DIGESTS, rehash=self.deep)
        self.code = fingerprint.CodeIndex(self.root / CACHE_DIR / "code-imports.json")

    def invalidate(self) -> None:
        """Forget computed keys: an entry was committed or discarded, downstream keys may change."""
        self._keys.clear()

    @property
    def name(self) -> str:
        return self.loaded.name

    def refs(self) -> list[Ref]:
        return registry.refs(self.loaded)

    def checkpoint_dir(self) -> Path | None:
        """Where stages read weights: the tiny checkpoint's entry, or the user's directory."""
        if not self.loaded.recipe.model.is_tiny:
            return Path(self.loaded.recipe.model.path)
        entry = self.entry(Ref("checkpoint"))
        return entry.path if entry else None

    def model_files(self, ref: Ref) -> dict[str, str] | None:
        """{relative path: sha256} of the checkpoint files the task reads; None until the tiny model exists."""
        folders = registry.model_folders(self.loaded, ref)
        if self.loaded.recipe.model.is_tiny:
            entry = self.entry(Ref("checkpoint"))
            if entry is None:
                return None
            return {n: d for n, d in entry.digests().items() if any(n.startswith(f"{f}/") or n == f for f in folders)}
        root = Path(self.loaded.recipe.model.path)
        return self.files.of(root, fingerprint.checkpoint_files(root, folders))

    def checkpoint_weights(self) -> dict[str, Path]:
        """{sha256: file} of the user's checkpoint ({} for the tiny model): content a remote never stores, linked
        from the checkpoint instead. Hashed once (FileDigests), remembered for this build."""
        if self._weights is None:
            model, self._weights = self.loaded.recipe.model, {}
            if not model.is_tiny:
                files = self.model_files(Ref("pipeline_check")) or {}
                self._weights = {sha: Path(model.path) / name for name, sha in sorted(files.items())}
        return self._weights

    def inputs(self, ref: Ref) -> dict[str, Any] | None:
        """The key's material, or None while an upstream entry is missing."""
        spec = registry.STAGES[ref.stage]
        upstream: dict[str, dict[str, str]] = {}
        for dep in registry.upstream_refs(self.loaded, ref):
            entry = self.entry(dep)
            if entry is None:
                return None
            if dep.stage != "checkpoint":
                upstream[dep.label] = entry.digests()
        model = self.model_files(ref) if spec.reads_model else None
        if spec.reads_model and model is None:
            return None
        return {
            "schema": SCHEMA,
            "stage": ref.stage,
            "component": ref.component,
            **({} if ref.part is None else {"part": ref.part}),
            "settings": spec.settings(self.loaded, ref.component),
            "model": model,
            "upstream": upstream,
            "versions": fingerprint.tool_versions(registry.versions_for(self.loaded, ref)),
            "code": self.code.digest(registry.code_roots(self.loaded, ref)),
        }

    def key(self, ref: Ref) -> str | None:
        if ref not in self._keys:
            material = self.inputs(ref)
            if material is None:
                return None
            self._keys[ref] = digests.digest(material)
        return self._keys[ref]

    def entry(self, ref: Ref) -> Entry | None:
        """The task's verified entry for its current key (None: not built for these inputs, or damaged)."""
        key = self.key(ref)
        return None if key is None else self.store.lookup(ref.stage, key, deep=self.deep)

    def upstream_dirs(self, ref: Ref) -> dict[Ref, Path]:
        dirs = {}
        for dep in registry.upstream_refs(self.loaded, ref):
            entry = self.entry(dep)
            if entry is None:
                raise RuntimeError(f"{dep.label} has no store entry (its task did not complete)")
            dirs[dep] = entry.path
        return dirs
