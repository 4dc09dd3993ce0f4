"""Engine stage: strongly typed TensorRT build through Polygraphy's loaders, ahead of time for the recipe's GPU.

Backend `tensorrt-rtx` needs no GPU (compute capability chosen explicitly); backend `tensorrt` (TensorRT 11)
runs the same loader chain where that package is installed. Precision comes only from the ONNX.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import log
from stages.errors import fail
from stages.inputs import StageInputs
from stages.store.local import CACHE_DIR, scratch_beside
from stages.targets.backends import BACKENDS

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

ENGINE_FILE = "engine.plan"
LOG = log.get("engine")


@dataclass(frozen=True)
class BuildEngine:
    component: str
    onnx_path: Path
    backend: str
    compute_capability: tuple[int, int]
    shapes: dict[str, list[tuple[int, ...]]]
    optimization_level: int
    timing_cache: Path | None = None
    weight_streaming_budget_gib: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    part: int | None = None  # build this part of `parts` block-range engines (stages.graphs.parts)
    parts: int = 1
    block_pattern: str | None = None

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        if self.part is None:
            return self._build_engine(out_dir, self.onnx_path, self.shapes, {})
        from stages.graphs import parts

        with scratch_beside(out_dir, "part") as scratch:
            import onnx

            assert self.block_pattern is not None
            model = onnx.load(str(self.onnx_path), load_external_data=False)
            plan = parts.plan_parts(model, self.block_pattern, self.parts)[self.part]
            path, graph_sha256 = parts.write_part(self.onnx_path, plan, Path(scratch), model)
            shapes = parts.input_profiles(model, plan, self.shapes)
            share = parts.weight_share(model, plan)
            LOG.info("%s (of parts 0-%d): blocks %d-%d, %d nodes, %.1f%% of the weights", plan.name, plan.count - 1,
                     plan.blocks[0], plan.blocks[-1], len(plan.nodes), 100 * share)
            contract = {"index": plan.index, "count": plan.count, "blocks": [plan.blocks[0], plan.blocks[-1]],
                        "graph_sha256": graph_sha256, "weight_share": round(share, 6),
                        **parts.io_contract(model, plan, shapes)}
            return self._build_engine(out_dir, path, shapes, {"part": contract}, share)

    def _build_engine(self, out_dir: Path, onnx_path: Path, shapes: dict[str, list[tuple[int, ...]]],
                      extra: dict[str, Any], weight_share: float = 1.0) -> dict[str, Any]:
        backend = BACKENDS[self.backend]
        with backend.polygraphy() as polygraphy_trt:
            profile = polygraphy_trt.Profile()
            for name, (low, opt, high) in shapes.items():
                profile.add(name, low, opt, high)
            cache = self._usable_timing_cache()
            create_config = backend.create_config(
                polygraphy_trt, self.compute_capability,
                profiles=[profile],
                builder_optimization_level=self.optimization_level,
                load_timing_cache=str(cache) if cache and cache.exists() else None,
                progress_monitor=make_progress_monitor(),
                weight_streaming=self.weight_streaming_budget_gib is not None,
            )
            network = polygraphy_trt.NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
            started = time.perf_counter()
            LOG.info("building %s for sm_%s with %s", self.component, self.sm, self.backend)
            engine = self._build(polygraphy_trt, network, create_config, cache, out_dir / ".timing.cache")
        (out_dir / ENGINE_FILE).write_bytes(memoryview(engine))
        seconds = time.perf_counter() - started
        LOG.info("%s: %.1f MB in %.1fs", ENGINE_FILE, engine.nbytes / 1e6, seconds)
        return {
            "component": self.component,
            "engine_file": ENGINE_FILE,
            "backend": self.backend,
            "compute_capability": f"{self.compute_capability[0]}.{self.compute_capability[1]}",
            "strongly_typed": True,
            "builder_optimization_level": self.optimization_level,
            "timing_cache": str(cache) if cache else self._timing_cache_note(),
            "profile": {name: {"min": s[0], "opt": s[1], "max": s[2]} for name, s in shapes.items()},
            "build_seconds": round(seconds, 3),
            "weight_streaming": None if self.weight_streaming_budget_gib is None else {
                "budget_gib": round(self.weight_streaming_budget_gib * weight_share, 3),
                "note": "set the runtime's weight streaming budget (IEngine.weight_streaming_budget_v2) to this"
                        + ("" if self.part is None else "; the component's budget shared by weight")},
            **self.extra,
            **extra,
        }

    def _build(self, polygraphy_trt: Any, network: Any, config: Any, cache: Path | None, scratch_cache: Path) -> Any:
        """Build; a refused build (no engine, or Polygraphy's exception) becomes one line naming the target."""
        from polygraphy.exception import PolygraphyException

        try:
            engine = polygraphy_trt.engine_bytes_from_network(
                network, config=config, save_timing_cache=str(scratch_cache) if cache else None
            )
        except PolygraphyException as error:
            raise fail(self.onnx_path, "engine", f"{self.backend} returned no engine for sm_{self.sm}: "
                       f"{str(error).splitlines()[0]} (FORGE_LOG=debug shows the builder's messages)") from None
        if engine is None:
            raise fail(self.onnx_path, "engine", f"{self.backend} returned no engine for sm_{self.sm}")
        if cache and scratch_cache.exists():
            cache.parent.mkdir(parents=True, exist_ok=True)
            os.replace(scratch_cache, cache)
        return engine

    @property
    def sm(self) -> str:
        return "".join(map(str, self.compute_capability))

    def _usable_timing_cache(self) -> Path | None:
        return self.timing_cache if self.timing_cache and BACKENDS[self.backend].timing_cache_works else None

    def _timing_cache_note(self) -> str:
        if self.timing_cache and not BACKENDS[self.backend].timing_cache_works:
            return f"not used: {BACKENDS[self.backend].timing_cache_note}"
        return "disabled by the recipe"


def make_progress_monitor() -> Any:
    """Log builder phases as they start and finish; long builds otherwise look hung."""
    from polygraphy.mod.trt_importer import lazy_import_trt

    trt = lazy_import_trt()

    class PhasePrinter(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.started: dict[str, float] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.started[phase_name] = time.perf_counter()
            depth = 0 if parent_phase is None else 1
            (LOG.info if depth == 0 else LOG.debug)("%s%s (%d steps)", "  " * depth, phase_name, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return True

        def phase_finish(self, phase_name: str) -> None:
            took = time.perf_counter() - self.started.pop(phase_name, time.perf_counter())
            if took > 1.0:
                LOG.info("%s done in %.1fs", phase_name, took)

    return PhasePrinter()


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> BuildEngine:
    assert component is not None
    settings = loaded.recipe.components[component]
    target = loaded.recipe.target
    config = model_config(inputs.weights, loaded.family.components[component].config_folder)
    shapes = loaded.family.module(component).profile_shapes(settings.profile, loaded.recipe.text_length, config)
    cc = target.compute_capability
    cache = inputs.root / CACHE_DIR / "timing" / f"{target.backend}-sm{cc[0]}{cc[1]}.cache"
    return BuildEngine(
        component=component,
        onnx_path=inputs.dir("precision", component) / "model.onnx",
        backend=target.backend,
        compute_capability=cc,
        shapes=shapes,
        optimization_level=settings.build.optimization_level,
        timing_cache=cache if settings.build.timing_cache else None,
        weight_streaming_budget_gib=settings.build.weight_streaming.budget_gib if settings.build.weight_streaming else None,
        extra={"text_length": loaded.recipe.text_length, "gpu": target.gpu},
        part=inputs.part,
        parts=loaded.part_count(component),
        block_pattern=loaded.family.components[component].block_pattern,
    )


def model_config(checkpoint: Path, config_folder: str) -> dict[str, Any]:
    return json.loads((checkpoint / config_folder / "config.json").read_text())
