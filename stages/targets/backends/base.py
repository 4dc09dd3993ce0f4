"""What a backend is: the TensorRT flavour that builds and runs engines for a set of compute capabilities.

A backend module defines one `Backend`: its package, the compute capabilities it targets, its INT8 rule, how
Polygraphy's builder config is made for it and how its engines are run. Heavy imports happen only inside the
methods, so recipe checks and the task graph can read backends without loading TensorRT.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from stages.errors import fail


@dataclass(frozen=True)
class Backend:
    name: str  # the recipe's `target.backend`
    package: str  # the pip distribution, recorded in keys and manifests
    module: str  # the Python module Polygraphy loads
    compute_capabilities: frozenset[tuple[int, int]]
    int8_refusal: Callable[[str, tuple[int, int], bool], str | None]  # (gpu, cc, weight_only) -> why not, or None
    timing_cache_works: bool
    timing_cache_note: str  # what the manifest says about a recipe's timing cache on this backend
    rtx: bool  # Polygraphy's TensorRT-RTX mode
    # builder RAM ~ fixed + factor x the weight bytes built (TensorRT-RTX 1.7 on CPU, external data, fp16 plans at
    # release width: 3.02-3.06x for the full transformer's 7- and 8-block parts with bf16 text-branch GEMMs,
    # 15.2-17.2 GB; 2.7x for the whole fp32-storage engine; docs/scale.md)
    builder_fixed_bytes: int = 768 << 20
    builder_bytes_per_weight_byte: float = 3.1

    def builder_peak_bytes(self, weight_bytes: int) -> int:
        """The builder's expected peak RAM for an engine holding `weight_bytes` (what `build.parts: auto` sizes by)."""
        return int(self.builder_fixed_bytes + self.builder_bytes_per_weight_byte * weight_bytes)

    def installed(self) -> bool:
        return importlib.util.find_spec(self.module) is not None

    @contextlib.contextmanager
    def polygraphy(self) -> Iterator[Any]:
        """Polygraphy's TensorRT loaders bound to this flavour for the block; the previous setting is restored.

        Polygraphy imports one TensorRT flavour per process: a second flavour in the same process is refused.
        """
        from polygraphy import config

        previous = config.USE_TENSORRT_RTX
        config.USE_TENSORRT_RTX = self.rtx
        try:
            from polygraphy.backend import trt as polygraphy_trt
            from polygraphy.mod.trt_importer import lazy_import_trt

            trt = lazy_import_trt()
            if trt.__name__ != self.module:
                raise fail("target.backend", self.name, f"Polygraphy already loaded {trt.__name__} in this process; "
                           f"run {self.name} builds in a separate doit invocation")
            yield polygraphy_trt
        finally:
            config.USE_TENSORRT_RTX = previous

    def create_config(self, polygraphy_trt: Any, compute_capability: tuple[int, int], **settings: Any) -> Any:
        """Polygraphy's builder-config loader for this flavour (call inside `polygraphy()`)."""
        if not self.rtx:
            return polygraphy_trt.CreateConfig(**settings)
        from polygraphy.backend.tensorrt_rtx import CreateConfigRTX

        return CreateConfigRTX(compute_capabilities=[compute_capability], **settings)
