"""`EnginePipeline`: a built recipe, called like diffusers' `QwenImagePipeline`.

    pipe = EnginePipeline.from_manifest("artifacts/a10-fp16/manifest.json")
    image = pipe(prompt="...", negative_prompt=" ", height=1328, width=1328, num_inference_steps=50,
                 true_cfg_scale=4.0, generator=torch.Generator().manual_seed(0)).images[0]

Loading verifies the sha256 of every file it opens against the manifest, opens each component on one runner
and warms the pipeline up once. Runners: the engines themselves on a GPU of their compute capability
(TensorRT-RTX, split parts chained, the manifest's weight-streaming budget, a runtime cache beside the engines),
or ONNX Runtime on the engines' exact ONNX. `runner="auto"` takes the engines where they can run and says so
when it does not; `runner="engine"` refuses in one line where no suitable GPU is present.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stages import log
from stages.errors import fail
from stages.graphs.runners import (OnnxRuntimeRunner, RunnerName, engine_runner, engine_unrunnable_reason,
                                   onnxruntime_execution)
from stages.runtime.built import COMPONENTS, BuiltRecipe
from stages.runtime.request import RUNNERS

LOG = log.get("generate")
RUNTIME_CACHE = "runtime.cache"  # beside the engines of each component: TensorRT-RTX's kernels compiled at run time


class EnginePipeline:
    """A built recipe's components on one runner, driven by the family's engine pipeline."""

    def __init__(self, built: BuiltRecipe, runner: str = "auto", warm_up: bool = True) -> None:
        if runner not in RUNNERS:
            raise fail("EnginePipeline", "runner", f"{runner!r}; allowed: {', '.join(RUNNERS)}")
        self.built = built
        self.runner, self.why = choose_runner(runner, built)
        self._lora_feed: dict[str, Any] = {}
        self.loras: list[dict[str, Any]] = []  # what is bound now: file, sha256, scale, rank
        self._stack = contextlib.ExitStack()
        started = time.perf_counter()
        try:
            self.pipe = self._open()
            self.load_s = time.perf_counter() - started
            self.warm_up_s = self._warm_up() if warm_up else 0.0
        except BaseException:
            self._stack.close()
            raise
        LOG.info("%s: loaded on %s in %.1fs, warm-up %.1fs", built.name, self.label, self.load_s, self.warm_up_s)

    @classmethod
    def from_manifest(cls, manifest: str | Path, runner: str = "auto", warm_up: bool = True) -> EnginePipeline:
        return cls(BuiltRecipe.load(manifest), runner=runner, warm_up=warm_up)

    @property
    def label(self) -> str:
        """Which runner computes the images, in words (PNG metadata, logs)."""
        if self.runner == RunnerName.ENGINE.value:
            return f"{RunnerName.ENGINE.value} ({self.built.target['backend']}, sm_{''.join(map(str, self.built.compute_capability))})"
        return f"{RunnerName.ONNXRUNTIME.value} on the engines' exact ONNX (CPU; {self.why})"

    @property
    def timings(self) -> dict[str, Any]:
        """The last call's seconds: prompt encoding, every denoising step, every decode."""
        return self.pipe.timings.as_dict()

    @property
    def text_length(self) -> int:
        return self.built.text_length

    def prompt_tokens(self, prompt: str) -> int:
        return self.pipe.prompt_tokens(prompt)

    def __call__(self, *args: Any, lora: Any = "keep", **kwargs: Any) -> Any:
        """diffusers' `QwenImagePipeline.__call__` arguments; `lora=` binds LoRAs for this and later calls first
        (see `set_lora`)."""
        if lora != "keep":
            self.set_lora(lora)
        return self.pipe(*args, **kwargs)

    def set_lora(self, lora: str | Sequence[tuple[str | Path, float]] | None) -> list[dict[str, Any]]:
        """Bind LoRAs to the transformer's LoRA inputs, no rebuild: `"a.safetensors:0.8,b.safetensors"` or
        `[(path, scale), ...]`; several are summed in rank slots of their own; None or `[]`: the base model.
        Files are read with diffusers' loader; one that does not fit the engine is refused in one line and the
        LoRAs bound before stay bound."""
        from stages.families import FAMILIES
        from stages.recipe.loras import no_lora_inputs, parse_lora

        settings = self.built.lora_settings
        if isinstance(lora, str):
            lora = parse_lora(lora, settings, source="lora")
        specs = [(Path(path), float(scale)) for path, scale in (lora or [])]
        if specs and settings is None:
            raise no_lora_inputs("lora")
        if not specs:
            self._lora_feed, self.loras = {}, []
            return []
        hooks = FAMILIES[self.built.family].pipeline()
        graph = self.built.path("transformer", "precision", "model.onnx")
        targets = self.built.component("transformer")["lora"]["targets"]
        self._lora_feed, self.loras = hooks.lora_binding(specs, graph, targets)
        LOG.info("LoRA bound: %s", ", ".join(f"{r['file']} x{r['scale']:g} (rank {r['rank']})" for r in self.loras))
        return self.loras

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> EnginePipeline:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _open(self) -> Any:
        from stages.families import FAMILIES

        hooks = FAMILIES[self.built.family].pipeline()
        for component in COMPONENTS:
            self.built.engine_paths(component)  # the images' provenance names them, whichever runner computes
        export = {c: self.built.stage_dir(c, "export") for c in COMPONENTS}
        runs = {}
        for component in COMPONENTS:
            config = hooks.runtime_feed_config(export[component], component)
            session = self._stack.enter_context(self._component_runner(component))
            infer = self._with_lora(session.infer) if component == "transformer" else session.infer
            runs[component] = hooks.graph_component_run(component, infer, config)
        return hooks.engine_pipeline(runs, export, self.built.text_length,
                                     int(self.built.profile("transformer")["batch"]["max"]),
                                     (self.built.recipe.get("sampling") or {}).get("scheduler") or {})

    def _with_lora(self, infer: Callable[[dict[str, Any]], dict[str, Any]]) -> Callable[[dict[str, Any]], dict[str, Any]]:
        """The transformer's feeds with the bound LoRA inputs (none bound: the runner's zeros, s = 0)."""
        return lambda feed: infer({**feed, **self._lora_feed})

    def _component_runner(self, component: str) -> Any:
        if self.runner == RunnerName.ENGINE.value:
            paths = self.built.engine_paths(component)
            parts = self.built.component(component).get("parts") or []
            contracts = [{"inputs": p["inputs"], "outputs": p["outputs"]} for p in parts]
            budgets = ([_budget(p.get("weight_streaming")) for p in parts] if parts
                       else [self.built.streaming_budget_bytes(component)])
            return engine_runner(paths, self.built.target["backend"], contracts, budgets,
                                 runtime_cache=paths[0].parent / RUNTIME_CACHE)
        graph = self.built.path(component, "precision", "model.onnx")
        self.built.stage_dir(component, "precision")
        LOG.debug("%s: %s", component, onnxruntime_execution(graph))
        return OnnxRuntimeRunner(graph)

    def _warm_up(self) -> float:
        """One step at the transformer profile's smallest size: sessions, kernels and caches ready before the first
        image."""
        profile = self.built.profile("transformer")
        started = time.perf_counter()
        self.pipe(prompt="warm-up", height=int(profile["height"]["min"]), width=int(profile["width"]["min"]),
                  num_inference_steps=2, true_cfg_scale=1.0, output_type="pil")
        return time.perf_counter() - started


def choose_runner(requested: str, built: BuiltRecipe) -> tuple[str, str]:
    """(runner, why): the engines where a GPU of their compute capability is present, else ONNX Runtime; an explicit
    `engine` without such a GPU is one line."""
    if requested == "onnxruntime":
        return RunnerName.ONNXRUNTIME.value, "runner=onnxruntime"
    reason = engine_unrunnable_reason(built.compute_capability)
    if reason is None:
        return RunnerName.ENGINE.value, "a GPU of the engines' compute capability"
    if requested == "engine":
        raise fail("runner", "engine", f"cannot run the {built.name} engines here: {reason.split(';')[0]}; allowed: "
                   f"runner=onnxruntime (the engines' exact ONNX on CPU) or a GPU of compute capability "
                   f"{'.'.join(map(str, built.compute_capability))}")
    return RunnerName.ONNXRUNTIME.value, reason.split(";")[0]


def _budget(setting: Any) -> int | None:
    if not setting or setting.get("budget_gib") is None:
        return None
    return int(float(setting["budget_gib"]) * 1024**3)
