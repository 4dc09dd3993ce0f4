"""A recipe's view: `artifacts/<recipe>/<component>/<stage>` links into the store, plus manifest.json.

Views are what people and CI read; the store is what builds trust. A view holds nothing but relative
symlinks and its manifest, so cleaning a view never deletes data another view still links to, and `gc`
deletes exactly the entries no view references.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from stages.store.local import AUDIT_DIR, CACHE_DIR, RECORD, STORE_DIR, WEIGHTS_STAGE, Store, crashpoint

MANIFEST = "manifest.json"
RESERVED = (STORE_DIR, CACHE_DIR, AUDIT_DIR)  # names a recipe view cannot take


def view_dir(store: Store, name: str) -> Path:
    return store.root / name


def view_lock(name: str) -> str:
    return f"view-{name}"


def link(store: Store, name: str, label: str, target: Path) -> None:
    """Point `<view>/<label>` at `target` atomically (caller holds the view lock); a real folder there from an
    older layout is replaced."""
    path = view_dir(store, name) / label
    path.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, path.parent)
    if path.is_symlink() and os.readlink(path) == relative:
        return
    if path.exists() and not path.is_symlink():
        shutil.rmtree(path)
    temporary = store.scratch_path(view_lock(name), ".link")
    os.symlink(relative, temporary)
    os.replace(temporary, path)


def links(store: Store, name: str) -> dict[str, Path]:
    """{label: resolved target} of every link in the view."""
    root = view_dir(store, name)
    found = {}
    if root.is_dir():
        for path in root.rglob("*"):
            if path.is_symlink():
                found[str(path.relative_to(root))] = (path.parent / os.readlink(path)).resolve()
    return found


def links_match(store: Store, name: str, expected: dict[str, Path]) -> bool:
    """Each expected label links to its target (only those links are read: a no-op rebuild asks this per task)."""
    root = view_dir(store, name)
    for label, target in expected.items():
        path = root / label
        if not path.is_symlink() or (path.parent / os.readlink(path)).resolve() != target.resolve():
            return False
    return True


def prune(store: Store, name: str, keep: set[str]) -> None:
    """Drop links the recipe no longer has (a component removed), and the folders they leave empty."""
    root = view_dir(store, name)
    for label in links(store, name):
        if label not in keep:
            (root / label).unlink()
            with contextlib.suppress(OSError):
                (root / label).parent.rmdir()


def write_manifest(store: Store, name: str, manifest: dict[str, Any]) -> Path:
    """Atomic: written in the store's scratch space under the view lock, then renamed over the old one."""
    path = view_dir(store, name) / MANIFEST
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = store.scratch_path(view_lock(name), ".json")
    with open(temporary, "w") as handle:
        json.dump(manifest, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    crashpoint("manifest:write")
    os.replace(temporary, path)
    return path


def read_manifest(store: Store, name: str) -> dict[str, Any] | None:
    try:
        data = json.loads((view_dir(store, name) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def views(store: Store) -> list[str]:
    if not store.root.is_dir():
        return []
    return sorted(p.name for p in store.root.iterdir() if p.is_dir() and not p.is_symlink()
                  and p.name not in RESERVED and not p.name.startswith("."))


def referenced(store: Store, exclude: str | None = None) -> set[str]:
    """Store entries (`store/<stage>/<key>`) that some view links to or lists in its manifest."""
    found: set[str] = set()
    base = store.base.resolve()
    for name in views(store):
        if name == exclude:
            continue
        for target in links(store, name).values():
            with contextlib.suppress(ValueError):
                found.add(f"{STORE_DIR}/{target.relative_to(base)}")
        manifest = read_manifest(store, name) or {}
        found.update(str(path) for path in (manifest.get("store") or {}).values())
    return found | _copies_held(store, found)


def _copies_held(store: Store, entries: set[str]) -> set[str]:
    """The shared `weights` copies whose content a referenced entry holds (linked there as one of its files)."""
    held: set[str] = set()
    for relative in entries:
        record = store.root / relative / RECORD
        with contextlib.suppress(OSError, ValueError):
            for meta in json.loads(record.read_text()).get("outputs", {}).values():
                copy = f"{STORE_DIR}/{WEIGHTS_STAGE}/{meta['sha256'][:32]}"
                if (store.root / copy).is_dir():
                    held.add(copy)
    return held


def clean(store: Store, name: str) -> tuple[int, int]:
    """Remove the view and the entries only it referenced; (entries removed, bytes freed)."""
    with store.exclusive():
        mine = referenced(store) - referenced(store, exclude=name)
        keep = {f"{STORE_DIR}/{stage}/{key}" for stage, key, _ in store.entries()} - mine
        folder = view_dir(store, name)
        if folder.is_dir():
            shutil.rmtree(folder)
        return store.remove_entries(keep)


def collect_garbage(store: Store) -> tuple[int, int, int]:
    """Remove entries no view references, orphaned scratch and unused locks; (entries, bytes, scratch items)."""
    with store.exclusive():
        count, freed = store.remove_entries(referenced(store))
        swept = len(store.sweep_orphans())
        return count, freed, swept
