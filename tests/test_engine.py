from __future__ import annotations

from pathlib import Path

import pytest

from stages.engine import BuildEngine
from stages.errors import ForgeError
from stages.families.qwen_image import transformer as qwen_image
from stages.recipe.load import load_recipe

CONFIG = {"patch_size": 2, "in_channels": 16, "joint_attention_dim": 16, "attention_head_dim": 16}


def shapes() -> dict:
    profile = load_recipe("a10-fp16").recipe.components["transformer"].profile
    return qwen_image.profile_shapes(profile, 256, CONFIG)


def test_rtx_builds_strongly_typed_engine_without_gpu(fp16_output: tuple[Path, dict], tmp_path: Path) -> None:
    cache = tmp_path / "cache" / "sm86.cache"
    report = BuildEngine("transformer", fp16_output[0], "tensorrt-rtx", (8, 6), shapes(), 1, cache)(tmp_path)
    engine = (tmp_path / "engine.plan").read_bytes()
    assert len(engine) > 100_000
    assert report["compute_capability"] == "8.6" and report["strongly_typed"]
    assert report["profile"]["hidden_states"] == {"min": (1, 1024, 16), "opt": (1, 6889, 16), "max": (2, 6889, 16)}
    # TensorRT-RTX treats timing caches as no-ops: the report must say so rather than pretend to reuse one.
    assert "no-ops in TensorRT-RTX" in report["timing_cache"]
    assert not cache.exists() and not (tmp_path / ".timing.cache").exists()


def test_other_compute_capability_gives_other_engine(fp16_output: tuple[Path, dict], tmp_path: Path) -> None:
    ada, ampere = tmp_path / "ada", tmp_path / "ampere"
    ada.mkdir(), ampere.mkdir()
    BuildEngine("transformer", fp16_output[0], "tensorrt-rtx", (8, 9), shapes(), 0)(ada)
    BuildEngine("transformer", fp16_output[0], "tensorrt-rtx", (8, 6), shapes(), 0)(ampere)
    assert (ada / "engine.plan").read_bytes() != (ampere / "engine.plan").read_bytes()


def test_profile_outside_graph_is_an_error(fp16_output: tuple[Path, dict], tmp_path: Path) -> None:
    bad = shapes()
    bad["encoder_hidden_states"] = [(1, 300, 16)] * 3  # graph's text length is fixed at 256
    with pytest.raises(ForgeError, match="returned no engine"):
        BuildEngine("transformer", fp16_output[0], "tensorrt-rtx", (8, 6), bad, 0)(tmp_path)
    assert not (tmp_path / "engine.plan").exists()
