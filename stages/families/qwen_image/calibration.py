"""Calibration inputs captured from the real Qwen-Image pipeline, in each engine's input format.

The transformer's inputs are recorded while QwenImagePipeline denoises the shipped prompts (with CFG, so the
negative branch is covered too), at the denoising steps the recipe names. Prompts go through the fixed
tokenizer padding the engines use, so the captured tensors have the engine's shapes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.families.qwen_image import text_encoder as qwen_text_encoder
from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.families.qwen_image import transformer as qwen_image
from stages.families.qwen_image.pipeline import load_pipeline

Feed = dict[str, np.ndarray]


def evenly(feeds: Sequence[Feed], samples: int) -> list[Feed]:
    """`samples` feeds spread over the whole capture (all prompts, sizes and steps), in order."""
    if len(feeds) <= samples:
        return list(feeds)
    picks = np.linspace(0, len(feeds) - 1, samples).round().astype(int)
    return [feeds[i] for i in picks]


def capture_text_encoder(checkpoint_dir: Path, prompts: Sequence[str], settings: Any, text_length: int) -> list[Feed]:
    """The text encoder's real inputs: the prompt set through the Qwen tokenizer with fixed padding."""
    tokenizer = qwen_tokenizer.load_tokenizer(checkpoint_dir)
    feeds = []
    for prompt in prompts:
        input_ids, attention_mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, [prompt], text_length)
        feeds.append(qwen_text_encoder.text_encoder_engine_inputs(input_ids, attention_mask))
    return evenly(feeds, settings.samples)


def capture_transformer(checkpoint_dir: Path, prompts: Sequence[str], settings: Any, text_length: int) -> list[Feed]:
    """Run the fp32 pipeline per prompt and size; record the transformer's inputs at the chosen steps."""
    pipeline = load_pipeline(checkpoint_dir)
    wanted = set(range(settings.num_inference_steps)) if settings.steps == "all" else set(settings.steps)
    axes = pipeline.transformer.config.axes_dims_rope
    feeds: list[Feed] = []
    state = {"step": 0}

    def record(_module: Any, _args: Any, kwargs: dict[str, Any]) -> None:
        if state["step"] in wanted:
            feeds.append(qwen_image.transformer_engine_inputs(
                kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"],
                kwargs["timestep"], kwargs["img_shapes"], axes_dims_rope=axes))

    def next_step(_pipe: Any, step: int, _t: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        state["step"] = step + 1
        return tensors

    hook = pipeline.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        negative = qwen_text_encoder.encode_prompts(pipeline.text_encoder, pipeline.tokenizer, [" "], text_length)
        for height, width in settings.sizes:
            for index, prompt in enumerate(prompts):
                embeds, mask, _ = qwen_text_encoder.encode_prompts(pipeline.text_encoder, pipeline.tokenizer,
                                                                  [prompt], text_length)
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


CAPTURE = {"transformer": capture_transformer, "text_encoder": capture_text_encoder}
