"""Calibration inputs captured from the real Qwen-Image pipeline, in each engine's input format.

The transformer's inputs are recorded while QwenImagePipeline denoises the shipped prompts (with CFG, so the
negative branch is covered too), at the denoising steps the recipe names. Prompts go through the fixed
tokenizer padding the engines use, so the captured tensors have the engine's shapes.

The prompts are encoded first and the text encoder is freed before the transformer is loaded, so memory holds
one of them, not the whole pipeline. Above the block-wise threshold each runs with one block's (decoder layer's)
weights in memory at a time, read from the shards as it runs (the same loading as block-wise validation): the
stock modules and pipeline, the same feeds bit for bit, memory bounded at any checkpoint size.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline

from stages.families.qwen_image import text_encoder as qwen_text_encoder
from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.families.qwen_image import transformer as qwen_image

Feed = dict[str, np.ndarray]


def evenly(feeds: Sequence[Feed], samples: int) -> list[Feed]:
    """`samples` feeds spread over the whole capture (all prompts, sizes and steps), in order."""
    if len(feeds) <= samples:
        return list(feeds)
    picks = np.linspace(0, len(feeds) - 1, samples).round().astype(int)
    return [feeds[i] for i in picks]


def capture_text_encoder(checkpoint_dir: Path, prompts: Sequence[str], settings: Any, text_length: int,
                         blockwise: dict[str, bool] | None = None) -> list[Feed]:
    """The text encoder's real inputs: the prompt set through the Qwen tokenizer with fixed padding (no model runs)."""
    tokenizer = qwen_tokenizer.load_tokenizer(checkpoint_dir)
    feeds = []
    for prompt in prompts:
        input_ids, attention_mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, [prompt], text_length)
        feeds.append(qwen_text_encoder.text_encoder_engine_inputs(input_ids, attention_mask))
    return evenly(feeds, settings.samples)


def capture_transformer(checkpoint_dir: Path, prompts: Sequence[str], settings: Any, text_length: int,
                        blockwise: dict[str, bool] | None = None) -> list[Feed]:
    """Run the fp32 pipeline per prompt and size; record the transformer's inputs at the chosen steps.

    `blockwise` ({"text_encoder": bool, "transformer": bool}) runs that component one block at a time."""
    layered = blockwise or {}
    negative, *encoded = encode(checkpoint_dir, [" ", *prompts], text_length, layered.get("text_encoder", False))
    wanted = set(range(settings.num_inference_steps)) if settings.steps == "all" else set(settings.steps)
    feeds: list[Feed] = []
    state = {"step": 0}

    def next_step(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        state["step"] = step + 1
        return tensors

    with denoiser(checkpoint_dir, layered.get("transformer", False)) as pipeline:
        axes = pipeline.transformer.config.axes_dims_rope

        def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
            if state["step"] in wanted:
                feeds.append(qwen_image.transformer_engine_inputs(
                    kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"],
                    kwargs["timestep"], kwargs["img_shapes"], axes_dims_rope=axes))

        hook = pipeline.transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            for height, width in settings.sizes:
                for index, (embeds, mask) in enumerate(encoded):
                    state["step"] = 0
                    with torch.no_grad():
                        pipeline(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative[0],
                                 negative_prompt_embeds_mask=negative[1], true_cfg_scale=settings.true_cfg_scale,
                                 height=height, width=width, num_inference_steps=settings.num_inference_steps,
                                 generator=torch.Generator().manual_seed(settings.seed + index), output_type="latent",
                                 callback_on_step_end=next_step)
        finally:
            hook.remove()
    return evenly(feeds, settings.samples)


def encode(checkpoint_dir: Path, prompts: Sequence[str], text_length: int,
           blockwise: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(prompt_embeds, prompt_embeds_mask) of each prompt, one at a time as the pipeline encodes them, by the stock
    text encoder in fp32, whole or layer by layer; the model is freed on return."""
    tokenizer = qwen_tokenizer.load_tokenizer(checkpoint_dir)
    with contextlib.ExitStack() as stack:
        if blockwise:
            run = stack.enter_context(qwen_text_encoder.layer_by_layer(checkpoint_dir))
            hidden_states = lambda ids, mask: run(input_ids=ids, attention_mask=mask)[0]  # noqa: E731
        else:
            model = qwen_text_encoder.load(checkpoint_dir)
            hidden_states = lambda ids, mask: qwen_text_encoder.pipeline_hidden_states(model, ids, mask)  # noqa: E731
        encoded = []
        for prompt in prompts:
            input_ids, attention_mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, [prompt], text_length)
            embeds, mask = qwen_text_encoder.prompt_embeds_from_hidden_states(
                hidden_states(input_ids, attention_mask), attention_mask, text_length)
            encoded.append((embeds, mask))
    return encoded


@contextlib.contextmanager
def denoiser(checkpoint_dir: Path, blockwise: bool) -> Iterator[QwenImagePipeline]:
    """The stock pipeline in fp32 without its text encoder (prompts come encoded), its transformer whole or block
    by block."""
    with contextlib.ExitStack() as stack:
        transformer = stack.enter_context(qwen_image.block_by_block(checkpoint_dir, streams=lambda _: {}))[0] \
            if blockwise else qwen_image.load(checkpoint_dir)
        yield QwenImagePipeline.from_pretrained(str(checkpoint_dir), transformer=transformer, text_encoder=None,
                                                torch_dtype=torch.float32, local_files_only=True)


CAPTURE = {"transformer": capture_transformer, "text_encoder": capture_text_encoder}
