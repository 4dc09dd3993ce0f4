"""Qwen-Image (diffusers QwenImagePipeline): Qwen2.5-VL text encoder, 60-block MMDiT transformer, Qwen VAE.

One module per component (transformer, text_encoder, vae) plus the tokenizer, the pipeline-check adapters
(pipeline), and calibration capture. This file only declares the family; its modules are reached through
thunks (stages.families.base), so importing it loads nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import Any

from stages.families.base import ALL_SURGERY, ComponentInfo, Family
from stages.families.qwen_image import lora_targets


def _text_encoder() -> ModuleType:
    from stages.families.qwen_image import text_encoder
    return text_encoder


def _transformer() -> ModuleType:
    from stages.families.qwen_image import transformer
    return transformer


def _vae() -> ModuleType:
    from stages.families.qwen_image import vae
    return vae


def _text_encoder_feed() -> Callable[..., Any]:
    from stages.families.qwen_image.text_encoder import text_encoder_engine_inputs
    return text_encoder_engine_inputs


def _transformer_feed() -> Callable[..., Any]:
    from stages.families.qwen_image.transformer import transformer_engine_inputs
    return transformer_engine_inputs


def _vae_decoder_feed() -> Callable[..., Any]:
    from stages.families.qwen_image.vae import vae_decoder_engine_inputs
    return vae_decoder_engine_inputs


def _pipeline() -> ModuleType:
    from stages.families.qwen_image import pipeline
    return pipeline


def _calibration() -> ModuleType:
    from stages.families.qwen_image import calibration
    return calibration


def _fit() -> ModuleType:
    from stages.families.qwen_image import fit
    return fit


FAMILY = Family(
    name="qwen-image",
    components={
        "text_encoder": ComponentInfo(
            _text_encoder, _text_encoder_feed, ("text_encoder", "tokenizer"), "text_encoder", ("text_tokens",),
            ("hidden_states",), ALL_SURGERY[:4], quantizable=True, block_pattern=r"^/language_model/layers/(\d+)/",
        ),
        "transformer": ComponentInfo(
            _transformer, _transformer_feed, ("transformer",), "transformer", ("sizes", "timesteps", "text_tokens"),
            ("sample",), quantizable=True, block_pattern=r"^/transformer_blocks/(\d+)/",
            lora_targets=lora_targets.BLOCK_LINEARS, lora_defaults=lora_targets.DEFAULT_TARGETS,
        ),
        "vae_decoder": ComponentInfo(
            _vae, _vae_decoder_feed, ("vae",), "vae", ("sizes",), ("image",), ALL_SURGERY[:3],
        ),
    },
    pipeline_files=("model_index.json", "scheduler"),
    pipeline=_pipeline,
    calibration=_calibration,
    fit=_fit,
)
