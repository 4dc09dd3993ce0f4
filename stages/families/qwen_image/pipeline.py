"""The whole Qwen-Image pipeline at tiny size: released scheduler settings, one diffusers-layout checkpoint.

Saving all parts through `QwenImagePipeline.save_pretrained` gives the tiny model the same directory layout
as a released checkpoint, so every stage (and `QwenImagePipeline.from_pretrained`) loads both the same way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                       QwenImageTransformer2DModel)

from stages.families.qwen_image import text_encoder as qwen_text_encoder
from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.families.qwen_image import transformer as qwen_image
from stages.families.qwen_image import vae as qwen_vae

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

ComponentRun = Callable[[dict[str, Any]], dict[str, np.ndarray]]
SessionRun = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# The keyword arguments QwenImagePipeline.__call__ (diffusers 0.42.1) passes to its transformer.
TRANSFORMER_CALL_KEYS = frozenset({
    "hidden_states", "timestep", "guidance", "encoder_hidden_states_mask", "encoder_hidden_states", "img_shapes",
    "attention_kwargs", "return_dict",
})


def feed_config(checkpoint_dir: str | Path, component: str) -> dict[str, Any]:
    """What a component's feed function needs from the checkpoint: the transformer's config, nothing else."""
    return component_config(checkpoint_dir, component) if component == "transformer" else {}


def component_config(checkpoint_dir: str | Path, component: str) -> dict[str, Any]:
    """The component's config.json with the class defaults filled in, as `from_pretrained` would see it."""
    import inspect

    classes = {"transformer": (QwenImageTransformer2DModel, "transformer"), "vae_decoder": (AutoencoderKLQwenImage, "vae")}
    model_class, folder = classes[component]  # the family's config_folder of each
    loaded = dict(model_class.load_config(str(checkpoint_dir), subfolder=folder, local_files_only=True))
    defaults = {
        name: parameter.default
        for name, parameter in inspect.signature(model_class.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }
    return {**defaults, **{key: value for key, value in loaded.items() if not key.startswith("_")}}


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


class TransformerRunAdapter:
    """Stands in for ``pipeline.transformer`` so the stock denoising loop drives a component run.

    QwenImagePipeline.__call__ (diffusers 0.42.1) touches only ``config.in_channels``,
    ``config.guidance_embeds``, ``cache_context(name)`` and the call itself (keyword arguments, ``return_dict=False``,
    result ``[0]``); ``DiffusionPipeline.device``/``dtype`` look at ``nn.Module`` components only, so this plain
    object leaves them at CPU/fp32, where the loop's latents live. Unknown call arguments raise instead of being
    dropped, so a diffusers upgrade that passes something new cannot silently change the check.
    """

    dtype = torch.float32
    device = torch.device("cpu")

    def __init__(self, run: ComponentRun, config: dict[str, Any]) -> None:
        from diffusers.configuration_utils import FrozenDict

        self.run = run
        self.config = FrozenDict(config)
        self.calls = 0

    def cache_context(self, name: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def __call__(self, **kwargs: Any) -> Any:
        unknown = set(kwargs) - TRANSFORMER_CALL_KEYS
        if unknown:
            raise TypeError(f"transformer call: unexpected arguments {sorted(unknown)}; the adapter handles "
                            f"{sorted(TRANSFORMER_CALL_KEYS)} (what diffusers 0.42.1 passes)")
        if kwargs.get("guidance") is not None or kwargs.get("attention_kwargs"):
            raise ValueError("transformer call: `guidance` and `attention_kwargs` are not part of the engine contract")
        hidden_states = kwargs["hidden_states"]
        text = kwargs["encoder_hidden_states"]
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is None:  # the pipeline drops an all-ones mask
            mask = torch.ones(text.shape[:2], dtype=torch.int64)
        call = {
            "hidden_states": hidden_states,
            "encoder_hidden_states": text,
            "encoder_hidden_states_mask": mask,
            "timestep": kwargs["timestep"],
            "img_shapes": _one_shape_per_item(kwargs["img_shapes"]),
        }
        self.calls += 1
        sample = torch.from_numpy(np.asarray(self.run(call)["sample"], dtype=np.float32)).to(hidden_states.dtype)
        if kwargs.get("return_dict", True):
            from diffusers.models.modeling_outputs import Transformer2DModelOutput

            return Transformer2DModelOutput(sample=sample)
        return (sample,)


def _one_shape_per_item(img_shapes: Sequence[Any]) -> list[tuple[int, int, int]]:
    """The pipeline passes ``[[(1, h, w)]] * batch``; the engine contract takes one (frame, h, w) per item."""
    shapes = []
    for item in img_shapes:
        entries = [item] if isinstance(item, tuple) else list(item)
        if len(entries) != 1:
            raise ValueError(f"img_shapes: the engine takes one image per batch item, got {item!r}")
        shapes.append(tuple(int(value) for value in entries[0]))
    return shapes


def graph_pipeline(checkpoint_dir: str | Path, transformer: TransformerRunAdapter,
                   tokenizer: Any | None = None) -> QwenImagePipeline:
    """The stock pipeline class around an adapted transformer; no PyTorch text encoder or VAE is loaded.

    Scheduler and tokenizer come from the checkpoint, as `from_pretrained` would load them (pass an already
    loaded `tokenizer` to skip the seconds its 151k-merge vocabulary takes); the VAE scale factor (which the
    constructor derives from a loaded VAE) is set from the checkpoint's VAE config instead.
    """
    from diffusers.image_processor import VaeImageProcessor

    pipeline = QwenImagePipeline(
        scheduler=load_scheduler(checkpoint_dir),
        vae=None,
        text_encoder=None,
        tokenizer=tokenizer if tokenizer is not None else qwen_tokenizer.load_tokenizer(checkpoint_dir),
        transformer=transformer,
    )
    factor = qwen_vae.spatial_compression(component_config(checkpoint_dir, "vae_decoder"))
    pipeline.vae_scale_factor = factor
    pipeline.image_processor = VaeImageProcessor(vae_scale_factor=factor * 2)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_scheduler(checkpoint_dir: str | Path) -> FlowMatchEulerDiscreteScheduler:
    return FlowMatchEulerDiscreteScheduler.from_pretrained(str(checkpoint_dir), subfolder="scheduler",
                                                           local_files_only=True)


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


def prompt_embeds_with(
    text_encoder: ComponentRun, tokenizer: Any, prompt: str, text_length: int
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One prompt -> (prompt_embeds, prompt_embeds_mask, truncated tokens) through a text-encoder run, fixed length."""
    input_ids, attention_mask, truncated = qwen_tokenizer.tokenize_prompts(tokenizer, [prompt], text_length)
    hidden = np.asarray(text_encoder({"input_ids": input_ids, "attention_mask": attention_mask})["hidden_states"])
    embeds, mask = qwen_text_encoder.prompt_embeds_from_hidden_states(
        hidden.astype(np.float32), attention_mask.numpy(), text_length
    )
    return torch.from_numpy(embeds), torch.from_numpy(mask), truncated[0]


def decode_with(vae_decoder: ComponentRun, pipeline: QwenImagePipeline, latents: torch.Tensor, height: int,
                width: int) -> list[Any]:
    """The pipeline's own post-loop steps (unpack, decode, postprocess to PIL) with the decode as a component run."""
    unpacked = pipeline._unpack_latents(latents, height, width, pipeline.vae_scale_factor)
    image = np.asarray(vae_decoder({"latents": unpacked.float()})["image"], dtype=np.float32)
    return pipeline.image_processor.postprocess(torch.from_numpy(image), output_type="pil")


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


def reference_runs(checkpoint_dir: str | Path, settings: Any, text_length: int,
                   capture: Any) -> tuple[Any, list[tuple[np.ndarray, list[np.ndarray]]], dict[str, Any], Any]:
    """Every prompt through the stock QwenImagePipeline: (latents, [(image, step latents)], scheduler, tokenizer)."""
    pipeline = load_pipeline(checkpoint_dir)
    pipeline.set_progress_bar_config(disable=True)
    latents = initial_latents(pipeline, settings.height, settings.width, settings.seed)
    results = []
    for prompt in settings.prompts:
        with capture() as (callback, steps):
            images = pipeline(prompt=prompt, negative_prompt=settings.negative_prompt,
                              **_common_call(settings, text_length, latents, callback), output_type="pil").images
        results.append((np.asarray(images[0].convert("RGB")), list(steps)))
    differences = scheduler_differences(pipeline.scheduler)
    scheduler_report = {"class": type(pipeline.scheduler).__name__, "matches_released": not differences,
                        "differences_from_released": differences}
    return latents, results, scheduler_report, pipeline.tokenizer


def graph_runs(checkpoint_dir: str | Path, components: dict[str, Any], settings: Any, text_length: int, latents: Any,
               tokenizer: Any, capture: Any) -> tuple[list[tuple[np.ndarray, list[np.ndarray], int, int]], int]:
    """Every prompt with the components replaced by their runs: ([(image, steps, truncated, transformer calls)],
    negative prompt truncation)."""
    adapter = TransformerRunAdapter(components["transformer"], component_config(checkpoint_dir, "transformer"))
    pipeline = graph_pipeline(checkpoint_dir, adapter, tokenizer)
    negative, negative_mask, negative_cut = prompt_embeds_with(
        components["text_encoder"], pipeline.tokenizer, settings.negative_prompt, text_length)
    results = []
    for prompt in settings.prompts:
        embeds, mask, cut = prompt_embeds_with(components["text_encoder"], pipeline.tokenizer, prompt, text_length)
        calls_before = adapter.calls
        with capture() as (callback, steps):
            final = pipeline(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                             negative_prompt_embeds_mask=negative_mask,
                             **_common_call(settings, text_length, latents, callback), output_type="latent").images
        image = decode_with(components["vae_decoder"], pipeline, final, settings.height, settings.width)[0]
        results.append((np.asarray(image.convert("RGB")), list(steps), cut, adapter.calls - calls_before))
    return results, negative_cut
