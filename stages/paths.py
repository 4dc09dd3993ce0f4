"""Where the forge lives and writes: the repository and the artifacts root. Light: os and pathlib only."""

from __future__ import annotations

import os
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_DIR / "recipes"


def artifacts_root() -> Path:
    """`FORGE_ARTIFACTS` or `<repo>/artifacts`: the store and the recipe views live here."""
    return Path(os.environ.get("FORGE_ARTIFACTS") or REPO_DIR / "artifacts")


def user_cache_dir() -> Path:
    """`FORGE_CACHE` or `$XDG_CACHE_HOME/qwen-image-forge` (`~/.cache/...`): memos of pure derivations that every
    artifacts root of this user may share (never store entries: those live under the artifacts root)."""
    configured = os.environ.get("FORGE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen-image-forge"
