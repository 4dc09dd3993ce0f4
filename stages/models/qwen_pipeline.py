"""The whole Qwen-Image pipeline at tiny size: released scheduler settings, one diffusers-layout checkpoint.

Saving all parts through `QwenImagePipeline.save_pretrained` gives the tiny model the same directory layout
as a released checkpoint, so every stage (and `QwenImagePipeline.from_pretrained`) loads both the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from stages.models import qwen_image, qwen_text_encoder, qwen_tokenizer, qwen_vae

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
