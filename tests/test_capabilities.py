from __future__ import annotations

import re

import pytest

from stages.errors import ForgeError
from stages.recipe.load import load_recipe
from stages.targets import capabilities
from stages.targets.capabilities import check_quantization, quantization_refusal


def test_precisions_follow_compute_capability() -> None:
    assert capabilities.precisions_for((7, 5)) == ["fp32", "fp16"]
    assert "bf16" in capabilities.precisions_for((8, 6)) and "fp8" not in capabilities.precisions_for((8, 6))
    assert "fp8" in capabilities.precisions_for((8, 9)) and "fp4" not in capabilities.precisions_for((8, 9))
    assert "fp4" in capabilities.precisions_for((12, 0))


def test_rtx_cannot_target_hopper_and_says_which_backend_can() -> None:
    with pytest.raises(ForgeError, match=r"target\.backend: tensorrt-rtx cannot build for h100 \(compute capability "
                                         r"9\.0\); it supports 7\.5, 8\.0, 8\.6, 8\.9, 12\.0; use backend tensorrt"):
        load_recipe("a10-fp16", {"target.gpu": "h100"})
    assert capabilities.backend_refusal("tensorrt-rtx", "a10", (8, 6)) is None


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


def test_backend_context_restores_polygraphy_mode() -> None:
    """A backend switches Polygraphy's TensorRT flavour only inside its block: no global state left behind."""
    from polygraphy import config

    from stages.targets.backends import BACKENDS

    before = config.USE_TENSORRT_RTX
    with BACKENDS["tensorrt-rtx"].polygraphy() as polygraphy_trt:
        assert config.USE_TENSORRT_RTX is True and hasattr(polygraphy_trt, "engine_bytes_from_network")
    assert config.USE_TENSORRT_RTX == before


@pytest.mark.parametrize(("backend", "gpu", "cc", "dtype", "weight_only", "expected"), [
    ("tensorrt-rtx", "a10", (8, 6), "fp8", False, r"fp8 needs compute capability 8\.9\+.*int8 weight-only"),
    ("tensorrt", "a100", (8, 0), "fp8", False, r"8\.9\+.*h100"),
    ("tensorrt-rtx", "t4", (7, 5), "fp8", False, r"use fp16 on t4"),
    ("tensorrt-rtx", "l4", (8, 9), "fp4", False, r"fp4 needs compute capability 12\.0\+.*fp8"),
    ("tensorrt-rtx", "rtx5090", (12, 0), "fp4", False, r"not produced by ModelOpt"),
    ("tensorrt-rtx", "a10", (8, 6), "int8", False, r"weight-only.*int8 weight-only.*backend tensorrt"),
    ("tensorrt-rtx", "l4", (8, 9), "int8", False, r"fp8 on l4"),
    ("tensorrt-rtx", "t4", (7, 5), "int8", True, r"not 7\.5"),
    ("tensorrt-rtx", "a100", (8, 0), "int8", True, r"not 8\.0"),
    ("tensorrt", "a10", (8, 6), "int8", True, r"INT4 only.*int8 \(weights and activations\)"),
    ("tensorrt-rtx", "l4", (8, 9), "fp8", True, r"fp8 weight-only"),
])
def test_refused_plans_name_an_alternative(backend: str, gpu: str, cc: tuple[int, int], dtype: str,
                                           weight_only: bool, expected: str) -> None:
    reason = quantization_refusal(backend, gpu, cc, dtype, weight_only)
    assert reason is not None and "\n" not in reason
    assert re.search(expected, reason), reason


@pytest.mark.parametrize(("backend", "gpu", "cc", "dtype", "weight_only"), [
    ("tensorrt-rtx", "a10", (8, 6), "int8", True),
    ("tensorrt-rtx", "rtx5090", (12, 0), "int8", True),
    ("tensorrt-rtx", "l4", (8, 9), "fp8", False),
    ("tensorrt-rtx", "rtx5090", (12, 0), "fp8", False),
    ("tensorrt", "a10", (8, 6), "int8", False),
    ("tensorrt", "h100", (9, 0), "fp8", False),
    ("tensorrt-rtx", "a10", (8, 6), "fp16", False),
])
def test_supported_plans_pass(backend: str, gpu: str, cc: tuple[int, int], dtype: str, weight_only: bool) -> None:
    assert quantization_refusal(backend, gpu, cc, dtype, weight_only) is None


def test_refusal_is_a_forge_error_naming_file_and_key() -> None:
    with pytest.raises(ForgeError, match=r"^recipes/x\.yaml: components\.transformer\.precision\.dtype: fp8 needs"):
        check_quantization("recipes/x.yaml", "components.transformer.precision.dtype", "tensorrt-rtx", "a10", (8, 6), "fp8")
