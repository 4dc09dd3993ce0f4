"""What each Qwen-Image engine holds and how much activation memory it needs: the family's side of the GPU fit
check (stages/recipe/fit.py). Stdlib only: it runs while the recipe is loaded, before any task."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from stages.families.qwen_image.lora_targets import DEFAULT_TARGETS as DEFAULT_LORA_TARGETS
from stages.families.qwen_image.lora_targets import block_linear_shapes
from stages.families.qwen_image.text_branch import TEXT_BRANCH_PATTERNS
from stages.targets import memory_fit

DEFAULT_STEPS = 50  # QwenImagePipeline's default num_inference_steps, with true CFG (a negative prompt)
PROMPT_TEMPLATE_TOKENS = 34  # the text encoder sees the pipeline's template prefix before it is dropped

# (folder, include regexes, exclude regexes) on tensor names. Released Qwen2.5-VL keys are
# `model.layers.*`/`visual.*`/`lm_head.*`, transformers 5 modules `model.language_model.*`/`model.visual.*`:
# the text-encoder engine holds neither the vision tower nor the LM head; the VAE engine only the decoder.
ENGINE_WEIGHTS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "transformer": ("transformer", (), ()),
    "text_encoder": ("text_encoder", (), (r"(^|\.)visual\.", r"^lm_head\.")),
    "vae_decoder": ("vae", (r"^decoder\.", r"^post_quant_conv\."), ()),
}


# Checkpoint keys of the repeated blocks (group 1: the block index) and of what follows the last block, for
# pricing an engine split by block ranges (stages.graphs.parts cuts the graph at the same blocks).
BLOCK_KEYS = {"transformer": r"^transformer_blocks\.(\d+)\.", "text_encoder": r"(?:^|\.)layers\.(\d+)\."}
EPILOGUE_KEYS = {"transformer": (r"^norm_out\.", r"^proj_out\."), "text_encoder": (r"(?:^|\.)norm\.weight$",)}


# What the last block computes for nothing: its text stream's output reaches no engine output, so the export drops
# the linears after the joint attention (its add_q_proj stays: queries of both streams are one attention op). An
# engine holds none of these bytes (tests/test_manifest.py prices the tiny build from its export's initializers).
DEAD_IN_LAST_BLOCK = {"transformer": (r"\.attn\.to_add_out\.", r"\.txt_mlp\.")}

# GEMMs ModelOpt's calibrated modes (int8 W8A8, fp8) leave unquantized: they read the [batch, dim] conditioning (no
# token axis) and the captured calibration feeds are batch 1 (diffusers runs CFG's branches as separate calls), so
# its GEMV rule (m = 1) keeps them at high precision: ~3.5 G parameters at release width (every block's modulation).
# Weight-only INT8 quantizes every GEMM. tests/test_recipes.py checks the list against ModelOpt's own choice.
CONDITIONING_GEMMS = (r"^time_text_embed\.", r"(^|\.)img_mod\.", r"(^|\.)txt_mod\.", r"^norm_out\.linear\.")

TINY_BLOCKS = {"transformer": 2, "text_encoder": 2}  # the tiny configurations' layer counts (tests check them)


def block_count(checkpoint: str | Path | None, component: str) -> int:
    """How many repeated blocks the component's engine holds, from its config (None: the tiny model's)."""
    if checkpoint is None:
        return TINY_BLOCKS[component]
    folder, _, _ = ENGINE_WEIGHTS[component]
    config = json.loads((Path(checkpoint) / folder / "config.json").read_text())
    return int(config.get("text_config", config)["num_hidden_layers" if component == "text_encoder" else "num_layers"])


def engine_tensors(checkpoint: str | Path, component: str) -> list[memory_fit.TensorInfo]:
    """The checkpoint tensors the component's engine holds, from the safetensors headers: those the export keeps."""
    folder, include, exclude = ENGINE_WEIGHTS[component]
    tensors = memory_fit.checkpoint_tensors(Path(checkpoint) / folder, include, exclude)
    dead = DEAD_IN_LAST_BLOCK.get(component)
    if not dead:
        return tensors
    block = re.compile(BLOCK_KEYS[component])
    last = max((int(m.group(1)) for t in tensors if (m := block.search(t.name))), default=None)
    return [t for t in tensors if not ((m := block.search(t.name)) and int(m.group(1)) == last
                                       and any(re.search(p, t.name) for p in dead))]


def part_weight_bytes(tensors: list[memory_fit.TensorInfo], component: str, plan: memory_fit.PrecisionPlan,
                      ranges: list[tuple[int, ...]]) -> list[memory_fit.WeightEstimate]:
    return memory_fit.part_weight_bytes(tensors, plan, BLOCK_KEYS[component], EPILOGUE_KEYS[component], ranges)


def engine_weight_bytes(checkpoint: str | Path, component: str, plan: memory_fit.PrecisionPlan) -> memory_fit.WeightEstimate:
    return memory_fit.weight_bytes(engine_tensors(checkpoint, component), plan)


def precision_plan(component: str, section: Any) -> memory_fit.PrecisionPlan:
    """How the component's engine stores its weights under the recipe: the plan's dtype, and at `high_precision`
    the frozen text branch (about half of each transformer block: the fp16 release engine with an fp32 branch is
    61.0 GB, not 40.9; an INT8 plan keeps it at fp16, unquantized), the recipe's excluded nodes and, in calibrated
    plans, the conditioning GEMMs the quantizer skips."""
    plan = section.precision
    frozen = component == "transformer" and "freeze_text_branch" in section.surgery.passes
    kept = (*(TEXT_BRANCH_PATTERNS if frozen else ()), *plan.exclude)
    bf16 = TEXT_BRANCH_PATTERNS if frozen and plan.frozen_storage == "bf16" else ()
    calibrated = component == "transformer" and plan.dtype in ("int8", "fp8") and not plan.weight_only
    return memory_fit.PrecisionPlan(dtype=plan.dtype, weight_only=plan.weight_only, high_precision=plan.high_precision,
                                    quantize_exclude=CONDITIONING_GEMMS if calibrated else (),
                                    high_precision_patterns=tuple(kept), bf16_gemm_patterns=bf16)


def activation_bytes(component: str, section: Any, checkpoint: Path, text_length: int) -> int:
    """Peak activations at the profile's largest shape (memory_fit's conservative per-block formulas): the
    transformer at its largest image area (tokens), the VAE at height.max x width.max (its input has both)."""
    profile = section.profile
    batch = profile.batch.max

    def config(folder: str) -> dict[str, Any]:
        return json.loads((checkpoint / folder / "config.json").read_text())

    if component == "transformer":
        return (memory_fit.transformer_activation_bytes(config("transformer"), batch, *profile.largest, text_length)
                + lora_input_bytes(config("transformer"), section.lora))
    if component == "text_encoder":
        loaded = config("text_encoder")
        return memory_fit.text_encoder_activation_bytes(loaded.get("text_config", loaded), batch,
                                                        text_length + PROMPT_TEMPLATE_TOKENS)
    return memory_fit.vae_decoder_activation_bytes(config("vae"), batch, profile.height.max, profile.width.max)


def lora_input_bytes(config: dict[str, Any], lora: Any) -> int:
    """Device bytes of the LoRA inputs at `max_rank` (fp16 down [in, R] and up [R, out] per targeted linear of every
    block, stages.graphs.lora): at release width and rank 64 on the default targets ~0.79 GiB."""
    if lora is None:
        return 0
    shapes = block_linear_shapes(int(config["num_attention_heads"]) * int(config["attention_head_dim"]))
    per_block = sum(2 * lora.max_rank * sum(shapes[target]) for target in lora.targets or DEFAULT_LORA_TARGETS)
    return int(config["num_layers"]) * per_block + 4 * lora.max_rank


def calls_per_image(component: str, section: Any, steps: int = DEFAULT_STEPS) -> int:
    """Engine calls for one image with CFG: the two branches are one batch-2 call where the profile allows."""
    branches = 1 if section.profile.batch.max >= 2 else 2
    return {"transformer": steps * branches, "text_encoder": branches}.get(component, 1)


PIPELINE_FOLDERS = ("transformer", "text_encoder", "vae")


def pipeline_reference_bytes(checkpoint: Path) -> int:
    """fp32 bytes of every floating weight the pipeline check's reference (QwenImagePipeline in fp32) loads."""
    return sum(4 * tensor.numel for folder in PIPELINE_FOLDERS
               for tensor in memory_fit.checkpoint_tensors(Path(checkpoint) / folder) if tensor.is_float)
