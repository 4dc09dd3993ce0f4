"""Before any task: can the recipe's GPU and TensorRT flavour honour every precision it asks for?"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages.errors import fail
from stages.targets import capabilities

if TYPE_CHECKING:
    from stages.recipe.schema import Recipe


def check_target(path: Path, recipe: Recipe) -> None:
    """Refuse a target/backend/precision combination the hardware or TensorRT flavour cannot honour."""
    target = recipe.target
    cc = target.compute_capability
    refusal = capabilities.backend_refusal(target.backend, target.gpu, cc)
    if refusal:
        raise fail(path, "target.backend", refusal)
    for name, component in recipe.components.items():
        plan = component.precision
        key = f"components.{name}.precision"
        if plan.quantized:
            capabilities.check_quantization(path, f"{key}.dtype", target.backend, target.gpu, cc, plan.dtype,
                                            plan.weight_only)
            if plan.calibration is not None:
                capabilities.check_calibration_method(path, f"{key}.calibration.method", plan.dtype,
                                                      plan.weight_only, plan.calibration.method)
        checks = [("high_precision", plan.high_precision)] if plan.quantized else [
            ("dtype", plan.dtype), ("high_precision", plan.high_precision)]
        for field_name, dtype in checks:
            refusal = capabilities.dtype_refusal(target.gpu, cc, dtype)
            if refusal:
                raise fail(path, f"{key}.{field_name}", refusal)
