from __future__ import annotations

from pathlib import Path

import pytest

from stages import capabilities
from stages.errors import ForgeError
from stages.recipe import load_recipe


def test_precisions_follow_compute_capability() -> None:
    assert capabilities.precisions_for((7, 5)) == ["fp32", "fp16"]
    assert "bf16" in capabilities.precisions_for((8, 6)) and "fp8" not in capabilities.precisions_for((8, 6))
    assert "fp8" in capabilities.precisions_for((8, 9)) and "fp4" not in capabilities.precisions_for((8, 9))
    assert "fp4" in capabilities.precisions_for((12, 0))


def test_rtx_cannot_target_hopper_but_tensorrt_can() -> None:
    assert (9, 0) not in capabilities.BACKEND_COMPUTE_CAPABILITIES["tensorrt-rtx"]
    assert (9, 0) in capabilities.BACKEND_COMPUTE_CAPABILITIES["tensorrt"]


def test_missing_backend_package_is_refused_before_work() -> None:
    # Full TensorRT is not installable here (see NOTES); the recipe must be refused, not fail mid-build.
    pytest.importorskip("tensorrt_rtx")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ForgeError, match=r"target.backend: tensorrt needs the Python package `tensorrt`"):
            load_recipe("a10-fp16", {"target.backend": "tensorrt"})
    else:
        pytest.skip("tensorrt is installed here")


def test_activate_backend_sets_polygraphy_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("POLYGRAPHY_USE_TENSORRT_RTX", raising=False)
    capabilities.activate_backend("tensorrt-rtx")
    import os

    assert os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] == "1"
    capabilities.activate_backend("tensorrt")
    assert os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] == "0"
