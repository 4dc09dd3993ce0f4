"""The whole Qwen-Image pipeline: the tiny one (released scheduler settings, one diffusers-layout checkpoint), the
PyTorch reference runs of the pipeline check, and the engine pipeline configured from a built recipe.

Saving all parts through `QwenImagePipeline.save_pretrained` gives the tiny model the same directory layout
as a released checkpoint, so every stage (and `QwenImagePipeline.from_pretrained`) loads both the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)

from stages.errors import fail
from stages.families.qwen_image import lora as qwen_lora
from stages.families.qwen_image import text_encoder as qwen_text_encoder
from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.families.qwen_image import transformer as qwen_image
from stages.families.qwen_image import vae as qwen_vae
from stages.families.qwen_image.engine_pipeline import (ComponentRun, QwenImageEnginePipeline, SessionRun,
                                                        TransformerRunAdapter)  # noqa: F401 - the adapters' home

COMPONENT_MODULES: dict[str, Any] = {"text_encoder": qwen_text_encoder, "transformer": qwen_image, "vae_decoder": qwen_vae}
FEED_FUNCTIONS: dict[str, Callable[..., dict[str, np.ndarray]]] = {
    "text_encoder": qwen_text_encoder.text_encoder_engine_inputs, "transformer": qwen_image.transformer_engine_inputs,
    "vae_decoder": qwen_vae.vae_decoder_engine_inputs}

# scheduler/scheduler_config.json of the released Qwen/Qwen-Image checkpoint (see NOTES).
RELEASED_SCHEDULER_CONFIG: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}


def make_tiny_pipeline(seed: int) -> QwenImagePipeline:
    """Every component of the real pipeline at test size, each deterministic from `seed`."""
    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**RELEASED_SCHEDULER_CONFIG),
        vae=qwen_vae.make_tiny_vae(seed),
        text_encoder=qwen_text_encoder.make_tiny_text_encoder(seed),
        tokenizer=qwen_tokenizer.build_qwen_tokenizer(),
        transformer=qwen_image.make_tiny_transformer(seed),
    )


def save_tiny_checkpoint(seed: int, out_dir: Path) -> dict[str, Any]:
    pipeline = make_tiny_pipeline(seed)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return {
        "transformer_config": dict(qwen_image.TINY_TRANSFORMER_CONFIG),
        "text_encoder_config": {k: v for k, v in qwen_text_encoder.TINY_TEXT_ENCODER_CONFIG.items()},
        "vae_config": dict(qwen_vae.TINY_VAE_CONFIG),
        "scheduler_config": dict(RELEASED_SCHEDULER_CONFIG),
    }


def load_pipeline(checkpoint_dir: str | Path) -> QwenImagePipeline:
    """The stock pipeline from a diffusers-layout directory, offline, in fp32 (the reference precision)."""
    import torch

    return QwenImagePipeline.from_pretrained(str(checkpoint_dir), torch_dtype=torch.float32, local_files_only=True)


# --- End-to-end check glue: the stock QwenImagePipeline driving built graphs --------------------------------
#
# Every component is reached through one shape of callable, a *component run*: it takes the diffusers-level
# call a validation case holds (`case["call"]`: the keyword arguments of the PyTorch forward) and returns the
# component's named numpy outputs (`OUTPUT_NAMES`). A graph run turns the call into the engine feed with the
# component's feed function; a PyTorch run is the module's own `reference_outputs`. So the pipeline code
# below never knows which runtime it drives.



def feed_config(checkpoint_dir: str | Path, component: str) -> dict[str, Any]:
    """What a component's feed function needs from the checkpoint: the transformer's config, nothing else."""
    return component_config(checkpoint_dir, component) if component == "transformer" else {}


def component_config(checkpoint_dir: str | Path, component: str, shipped: bool = False) -> dict[str, Any]:
    """The component's config.json with the class defaults filled in, as `from_pretrained` would see it; `shipped`:
    the copy a built recipe's export holds (`checkpoint_dir` is then that export's folder)."""
    import inspect

    classes = {"transformer": (QwenImageTransformer2DModel, "transformer"), "vae_decoder": (AutoencoderKLQwenImage, "vae")}
    model_class, folder = classes[component]  # the family's config_folder of each
    loaded = dict(model_class.load_config(str(checkpoint_dir), subfolder=None if shipped else folder,
                                          local_files_only=True))
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **{key: value for key, value in loaded.items() if not key.startswith("_")}}


def runtime_feed_config(export_dir: Path, component: str) -> dict[str, Any]:
    """`feed_config` from what a built recipe ships (the export's config copy), without the checkpoint."""
    return component_config(export_dir, component, shipped=True) if component == "transformer" else {}


def engine_pipeline(runs: dict[str, ComponentRun], export_dirs: dict[str, Path], text_length: int,
                    transformer_max_batch: int, scheduler: dict[str, Any] | None = None) -> Any:
    """The engine pipeline on component runs, configured from the files the exports ship: the tokenizer, the
    scheduler and the transformer's and VAE's configs."""
    transformer = export_dirs["transformer"]
    if not (transformer / "scheduler" / "scheduler_config.json").is_file():
        raise fail(transformer, "scheduler/scheduler_config.json", "not shipped: the checkpoint the recipe was built "
                   "from has no scheduler/; allowed: a diffusers-layout checkpoint with model_index.json and scheduler/")
    return QwenImageEnginePipeline(
        runs, scheduler=with_overrides(FlowMatchEulerDiscreteScheduler.from_pretrained(
            str(transformer), subfolder="scheduler", local_files_only=True), scheduler or {}),
        tokenizer=qwen_tokenizer.load_tokenizer(export_dirs["text_encoder"]),
        transformer_config=component_config(transformer, "transformer", shipped=True),
        vae_scale_factor=qwen_vae.spatial_compression(component_config(export_dirs["vae_decoder"], "vae_decoder",
                                                                       shipped=True)),
        text_length=text_length, transformer_max_batch=transformer_max_batch)


def engine_feed(component: str, call: dict[str, Any], config: dict[str, Any]) -> dict[str, np.ndarray]:
    """A diffusers-level call -> the engine's input dict, through the registry's feed function."""
    feed_function = FEED_FUNCTIONS[component]
    if component == "transformer":
        return feed_function(**call, axes_dims_rope=tuple(config["axes_dims_rope"]))
    return feed_function(**call)


def graph_component_run(component: str, session: SessionRun, config: dict[str, Any]) -> ComponentRun:
    """A built graph (ONNX Runtime session, TensorRT runner) as a component run."""

    def run(call: dict[str, Any]) -> dict[str, np.ndarray]:
        return session(engine_feed(component, call, config))

    return run


def torch_component_run(component: str, checkpoint_dir: str | Path) -> ComponentRun:
    """The stock PyTorch module in fp32 as a component run (for a component the recipe builds no graph for)."""
    spec = COMPONENT_MODULES[component]
    model = spec.load(checkpoint_dir)

    def run(call: dict[str, Any]) -> dict[str, np.ndarray]:
        return spec.reference_outputs(model, {"call": call})

    return run


def load_scheduler(checkpoint_dir: str | Path) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(checkpoint_dir), subfolder="scheduler",
                                                           local_files_only=True)


def with_overrides(scheduler: FlowMatchEulerDiscreteScheduler, overrides: dict[str, Any]
                   ) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler with a recipe's `sampling.scheduler` settings (e.g. Qwen-Image-Lightning's shift 3)."""
    return FlowMatchEulerDiscreteScheduler.from_config({**scheduler.config, **overrides}) if overrides else scheduler


def scheduler_differences(scheduler: FlowMatchEulerDiscreteScheduler) -> dict[str, Any]:
    """Settings where a checkpoint's scheduler departs from the released Qwen-Image one ({} when it matches)."""
    config = dict(scheduler.config)
    return {key: {"checkpoint": config.get(key), "released": value}
            for key, value in RELEASED_SCHEDULER_CONFIG.items() if config.get(key) != value}


def initial_latents(pipeline: QwenImagePipeline, height: int, width: int, seed: int) -> torch.Tensor:
    """Packed [1, N, 4 * z] noise exactly as the pipeline would draw it from a generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    channels = pipeline.transformer.config.in_channels // 4
    return pipeline.prepare_latents(1, channels, height, width, torch.float32, torch.device("cpu"), generator)


# -- the pipeline check's runs (see stages.pipeline_check) ---------------------------------------------------


def _common_call(settings: Any, text_length: int, latents: Any, callback: Any) -> dict[str, Any]:
    """Arguments both runs share: same seed, a copy of the same initial latents, same text length."""
    return {
        "true_cfg_scale": settings.true_cfg_scale,
        "height": settings.height,
        "width": settings.width,
        "num_inference_steps": settings.num_inference_steps,
        "generator": torch.Generator().manual_seed(settings.seed),
        "latents": latents.clone(),
        "max_sequence_length": text_length,
        "callback_on_step_end": callback,
    }


def reference_runs(checkpoint_dir: str | Path, settings: Any, text_length: int, capture: Any,
                   loras: Any = (), scheduler: dict[str, Any] | None = None
                   ) -> tuple[Any, list[tuple[np.ndarray, list[np.ndarray]]], dict[str, Any], Any]:
    """Every prompt through the stock QwenImagePipeline: (latents, [(image, step latents)], scheduler, tokenizer);
    `loras`: (file, scale) pairs diffusers loads into its transformer through PEFT (what `load_lora_weights` does);
    `scheduler`: config overrides."""
    pipeline = load_pipeline(checkpoint_dir)
    pipeline.set_progress_bar_config(disable=True)
    if scheduler:
        pipeline.scheduler = with_overrides(pipeline.scheduler, scheduler)
    if loras:
        qwen_lora.apply_with_peft(pipeline.transformer, loras)
    latents = initial_latents(pipeline, settings.height, settings.width, settings.seed)
    results = []
    for prompt in settings.prompts:
        with capture() as (callback, steps):
            images = pipeline(prompt=prompt, negative_prompt=settings.negative_prompt,
                              **_common_call(settings, text_length, latents, callback), output_type="pil").images
        results.append((np.asarray(images[0].convert("RGB")), list(steps)))
    differences = scheduler_differences(pipeline.scheduler)
    scheduler_report = {"class": type(pipeline.scheduler).__name__, "matches_released": not differences,
                        "differences_from_released": differences, "recipe_overrides": scheduler or {}}
    return latents, results, scheduler_report, pipeline.tokenizer


def graph_runs(checkpoint_dir: str | Path, components: dict[str, Any], settings: Any, text_length: int, latents: Any,
               tokenizer: Any, capture: Any, transformer_max_batch: int = 2, scheduler: dict[str, Any] | None = None
               ) -> tuple[list[tuple[np.ndarray, list[np.ndarray], int, int]], int]:
    """Every prompt through the engine pipeline users run (`QwenImageEnginePipeline`) on the components' runs:
    ([(image, steps, truncated, transformer calls)], negative prompt truncation)."""
    pipe = QwenImageEnginePipeline(
        components, scheduler=with_overrides(load_scheduler(checkpoint_dir), scheduler or {}), tokenizer=tokenizer,
        transformer_config=component_config(checkpoint_dir, "transformer"),
        vae_scale_factor=qwen_vae.spatial_compression(component_config(checkpoint_dir, "vae_decoder")),
        text_length=text_length, transformer_max_batch=transformer_max_batch)
    results, negative_cut = [], 0
    for prompt in settings.prompts:
        with capture() as (callback, steps):
            image = pipe(prompt=prompt, negative_prompt=settings.negative_prompt, height=settings.height,
                         width=settings.width, num_inference_steps=settings.num_inference_steps,
                         true_cfg_scale=settings.true_cfg_scale, generator=torch.Generator().manual_seed(settings.seed),
                         latents=latents.clone(), callback_on_step_end=callback).images[0]
        truncated = pipe.timings.truncated_tokens
        negative_cut = truncated[-1] if settings.true_cfg_scale > 1 else 0
        results.append((np.asarray(image.convert("RGB")), list(steps), truncated[0], pipe.timings.transformer_calls))
    return results, negative_cut


def lora_binding(specs: list[tuple[Path, float]], graph: Path, targets: list[str]
                 ) -> tuple[dict[str, np.ndarray], list[dict[str, Any]]]:
    """(the transformer's LoRA inputs, what is bound) for these (file, scale) pairs; `graph`: the ONNX the engine was
    built from (its LoRA inputs' names and shapes, its weights' names), `targets`: the recipe's LoRA targets."""
    import onnx

    from stages.graphs.lora import graph_branches

    model = onnx.load(str(graph), load_external_data=False).graph
    rank, branches = graph_branches((v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in model.input)
    _, pruned = qwen_image.lora_modules([t.name for t in model.initializer], targets)
    files = [(qwen_lora.read_lora(path), scale) for path, scale in specs]
    feed = qwen_lora.bind(files, branches, rank, set(pruned))
    return feed, [{"file": weights.path.name, "sha256": weights.sha256, "scale": scale, "rank": weights.rank}
                  for weights, scale in files]
