"""Qwen-Image on built components, called like diffusers' `QwenImagePipeline`.

The denoising loop is diffusers 0.42.1's `QwenImagePipeline.__call__` (same timesteps and shift, same true-CFG
combination and norm rescale, same scheduler step), written out so that CFG's two branches can go to the
transformer as one batch-2 call where its profile allows. Everything else is the stock pipeline's own code: the
initial latents (`prepare_latents`, so `generator=torch.Generator().manual_seed(n)` gives diffusers' noise),
unpacking and post-processing. Users reach it through `stages.runtime.EnginePipeline`; the pipeline check's
built side runs it too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from diffusers import QwenImagePipeline

from stages.families.qwen_image import text_encoder as qwen_text_encoder
from stages.families.qwen_image import tokenizer as qwen_tokenizer

# Every component is reached through one shape of callable, a *component run*: it takes the diffusers-level
# call a validation case holds (`case["call"]`: the keyword arguments of the PyTorch forward) and returns the
# component's named numpy outputs. A graph run turns the call into the engine feed with the component's feed
# function; a PyTorch run is the module's own `reference_outputs`. So the pipeline never knows which runtime it drives.
ComponentRun = Callable[[dict[str, Any]], dict[str, np.ndarray]]
SessionRun = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]

# The keyword arguments QwenImagePipeline.__call__ (diffusers 0.42.1) passes to its transformer.
TRANSFORMER_CALL_KEYS = frozenset({
    "hidden_states", "timestep", "guidance", "encoder_hidden_states_mask", "encoder_hidden_states", "img_shapes",
    "attention_kwargs", "return_dict",
})


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


def graph_pipeline(transformer: TransformerRunAdapter, tokenizer: Any, scheduler: Any,
                   vae_scale_factor: int) -> QwenImagePipeline:
    """The stock pipeline class around an adapted transformer, for its own helpers (latents, unpacking,
    post-processing); no PyTorch text encoder or VAE is loaded. The VAE scale factor, which the constructor
    derives from a loaded VAE, is set from the VAE config instead."""
    from diffusers.image_processor import VaeImageProcessor

    pipeline = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=tokenizer,
                                 transformer=transformer)
    pipeline.vae_scale_factor = vae_scale_factor
    pipeline.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


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


@dataclass
class Timings:
    """Seconds per phase of the last call: prompt encoding, each denoising step, each decode."""

    text_encoder_s: float = 0.0
    steps_s: list[float] = field(default_factory=list)
    vae_s: list[float] = field(default_factory=list)
    transformer_calls: int = 0
    truncated_tokens: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        steps = self.steps_s
        return {"text_encoder_s": round(self.text_encoder_s, 4), "steps_s": [round(s, 4) for s in steps],
                "mean_step_s": round(sum(steps) / len(steps), 4) if steps else None,
                "vae_s": [round(s, 4) for s in self.vae_s], "transformer_calls": self.transformer_calls,
                "truncated_tokens": list(self.truncated_tokens)}


@dataclass
class Output:
    """What `QwenImagePipeline` returns: `.images` (the final latents with `output_type="latent"`)."""

    images: list[Any]


class QwenImageEnginePipeline:
    """`pipe(prompt=..., negative_prompt=..., height=..., width=..., num_inference_steps=..., true_cfg_scale=...,
    generator=...)` on component runs; `.timings` holds the last call's per-step seconds."""

    def __init__(self, runs: dict[str, ComponentRun], *, scheduler: Any, tokenizer: Any,
                 transformer_config: dict[str, Any], vae_scale_factor: int, text_length: int,
                 transformer_max_batch: int) -> None:
        self.runs = runs
        self.text_length = text_length
        self.transformer_max_batch = transformer_max_batch
        self.adapter = TransformerRunAdapter(runs["transformer"], transformer_config)
        self.stock = graph_pipeline(self.adapter, tokenizer, scheduler, vae_scale_factor)
        self.timings = Timings()

    @property
    def vae_scale_factor(self) -> int:
        return int(self.stock.vae_scale_factor)

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of the prompt as the text encoder sees it (the template's prefix not counted)."""
        _, _, truncated = qwen_tokenizer.tokenize_prompts(self.stock.tokenizer, [prompt], self.text_length)
        return self.text_length + int(truncated[0])

    def __call__(self, prompt: str | Sequence[str], negative_prompt: str | Sequence[str] | None = None,
                 height: int = 1328, width: int = 1328, num_inference_steps: int = 50, true_cfg_scale: float = 4.0,
                 generator: torch.Generator | None = None, num_images_per_prompt: int = 1,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 callback_on_step_end: Callable[..., dict[str, Any]] | None = None) -> Output:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift, retrieve_timesteps

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None if negative_prompt is None else (
            [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt))
        do_cfg = true_cfg_scale > 1 and negatives is not None
        timings = self.timings = Timings()
        started = time.perf_counter()
        embeds, mask = self._encode(prompts, num_images_per_prompt, timings)
        if do_cfg:
            negative, negative_mask = self._encode(negatives, num_images_per_prompt, timings)
        timings.text_encoder_s = time.perf_counter() - started
        batch = len(prompts) * num_images_per_prompt
        channels = self.adapter.config.in_channels // 4
        latents = self.stock.prepare_latents(batch, channels, height, width, torch.float32, torch.device("cpu"),
                                             generator, latents)
        shape = (1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)
        scheduler = self.stock.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, torch.device("cpu"), sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        calls_before = self.adapter.calls
        for index, t in enumerate(timesteps):
            step_started = time.perf_counter()
            timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
            if do_cfg:
                noise, negative_noise = self._both_branches(latents, timestep, embeds, mask, negative,
                                                            negative_mask, shape)
                combined = negative_noise + true_cfg_scale * (noise - negative_noise)
                noise = combined * (torch.norm(noise, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))
            else:
                noise = self._transformer(latents, timestep, embeds, mask, shape)
            latents = scheduler.step(noise, t, latents, return_dict=False)[0]
            if callback_on_step_end is not None:
                latents = callback_on_step_end(self, index, t, {"latents": latents}).pop("latents", latents)
            timings.steps_s.append(time.perf_counter() - step_started)
        timings.transformer_calls = self.adapter.calls - calls_before
        if output_type == "latent":
            return Output(images=list(latents))
        images = []
        for item in range(batch):
            decode_started = time.perf_counter()
            images += decode_with(self.runs["vae_decoder"], self.stock, latents[item:item + 1], height, width)
            timings.vae_s.append(time.perf_counter() - decode_started)
        if output_type == "np":
            images = [np.asarray(image.convert("RGB")) for image in images]
        return Output(images=images)

    def _encode(self, prompts: Sequence[str], copies: int, timings: Timings) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = []
        for prompt in prompts:
            embeds, mask, truncated = prompt_embeds_with(self.runs["text_encoder"], self.stock.tokenizer, prompt,
                                                         self.text_length)
            timings.truncated_tokens.append(truncated)
            pairs.append((embeds, mask))
        embeds = torch.cat([e for e, _ in pairs]).repeat_interleave(copies, dim=0)
        mask = torch.cat([m for _, m in pairs]).repeat_interleave(copies, dim=0)
        return embeds, mask

    def _transformer(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                     shape: tuple[int, int, int]) -> torch.Tensor:
        return self.adapter(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds,
                            encoder_hidden_states_mask=mask, img_shapes=[[shape]] * latents.shape[0],
                            return_dict=False)[0]

    def _both_branches(self, latents: torch.Tensor, timestep: torch.Tensor, embeds: torch.Tensor, mask: torch.Tensor,
                       negative: torch.Tensor, negative_mask: torch.Tensor, shape: tuple[int, int, int]
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Conditional and unconditional predictions: one call of twice the batch where the profile takes it."""
        batch = latents.shape[0]
        if 2 * batch <= self.transformer_max_batch:
            both = self._transformer(torch.cat([latents, latents]), torch.cat([timestep, timestep]),
                                     torch.cat([embeds, negative]), torch.cat([mask, negative_mask]), shape)
            return both[:batch], both[batch:]
        return (self._transformer(latents, timestep, embeds, mask, shape),
                self._transformer(latents, timestep, negative, negative_mask, shape))
