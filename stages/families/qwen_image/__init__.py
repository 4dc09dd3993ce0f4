"""Qwen-Image (diffusers QwenImagePipeline): Qwen2.5-VL text encoder, 60-block MMDiT transformer, Qwen VAE.

One module per component (transformer, text_encoder, vae) plus the tokenizer, the pipeline-check adapters
(pipeline), and calibration capture. This file only declares the family; it imports nothing heavy.
"""

from __future__ import annotations

from stages.families import ALL_SURGERY, ComponentInfo, Family

PACKAGE = "stages.families.qwen_image"

FAMILY = Family(
    name="qwen-image",
    components={
        "text_encoder": ComponentInfo(
            f"{PACKAGE}.text_encoder", f"{PACKAGE}.text_encoder:text_encoder_engine_inputs",
            ("text_encoder", "tokenizer"), "text_encoder", ("text_tokens",), ("hidden_states",), ALL_SURGERY[:4],
            quantizable=True, block_pattern=r"^/language_model/layers/(\d+)/",
        ),
        "transformer": ComponentInfo(
            f"{PACKAGE}.transformer", f"{PACKAGE}.transformer:transformer_engine_inputs",
            ("transformer",), "transformer", ("sizes", "timesteps", "text_tokens"), ("sample",), quantizable=True,
            block_pattern=r"^/transformer_blocks/(\d+)/",
        ),
        "vae_decoder": ComponentInfo(
            f"{PACKAGE}.vae", f"{PACKAGE}.vae:vae_decoder_engine_inputs", ("vae",), "vae", ("sizes",), ("image",),
            ALL_SURGERY[:3],
        ),
    },
    pipeline_files=("model_index.json", "scheduler"),
    tiny_checkpoint=f"{PACKAGE}.pipeline:save_tiny_checkpoint",
    calibration=f"{PACKAGE}.calibration:CAPTURE",
    pipeline=f"{PACKAGE}.pipeline",
    fit=f"{PACKAGE}.fit",
)
