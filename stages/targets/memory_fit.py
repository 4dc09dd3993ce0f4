"""Will the engine fit the target GPU? Weight bytes from safetensors headers plus an activation estimate.

Why: the fp16 release transformer holds ~38 GiB of weights and an A10 has 24 GiB. Building it anyway costs
about 100 GB of builder RAM and minutes of CPU, only to fail at deploy time. This module answers before any
work, from a few KB of safetensors headers, and says in one line what would fit instead. Stdlib only, so the
recipe checks and the task graph can import it without torch.

Units: every byte figure here is in bytes; messages print GiB (2**30). NVIDIA datasheets quote memory as
"24 GB" etc.; those capacities are binary (24 GiB of GDDR/HBM chips), so the table below takes the datasheet
number as GiB. The whole capacity is never available: ECC/driver reservations and the CUDA context (a few
hundred MB up to ~1 GiB with TensorRT's kernels loaded) come off first, so :data:`CONTEXT_RESERVE_BYTES` is
subtracted before comparing.

What is estimated (and what is not):
- Weights: parameter counts by dtype from the component's ``*.safetensors`` headers, restricted to what its
  engine holds (the text encoder engine is the language model only: no vision tower, no LM head; the VAE engine
  is the decoder only), then priced by the precision plan (:func:`weight_bytes`). An engine's file holds its
  weights plus well under 1% of code (measured: 40.69 GB of fp16 weights -> 40.77 GB engine), ignored here.
- Activations: peak live tensors of one block at the profile's max shape (:func:`transformer_activation_bytes`),
  plus a fixed workspace allowance. TensorRT reuses activation memory across layers, so one block's peak is the
  right order; the formulas are deliberately conservative (they assume attention materialises its scores).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stages import safetensors

GIB = 1 << 30

# Datasheet memory per GPU in capabilities.GPUS / gpus.GPUS, taken as GiB (see module docstring).
GPU_MEMORY_GIB: dict[str, float] = {
    "t4": 16,  # T4: 16 GB GDDR6
    "a100": 80,  # A100 ships as 40 GB and 80 GB; the forge's "a100" means the 80 GB part (the larger one)
    "a10": 24,  # A10: 24 GB GDDR6
    "rtx3090": 24,  # GeForce RTX 3090: 24 GB GDDR6X
    "l4": 24,  # L4: 24 GB GDDR6
    "l40s": 48,  # L40S: 48 GB GDDR6 (ECC)
    "rtx4090": 24,  # GeForce RTX 4090: 24 GB GDDR6X
    "h100": 80,  # H100 SXM5 / PCIe: 80 GB HBM3 / HBM2e
    "rtx5090": 32,  # GeForce RTX 5090: 32 GB GDDR7
}
CONTEXT_RESERVE_BYTES = 1 * GIB  # CUDA context, driver and ECC reservations, taken off the datasheet capacity
WORKSPACE_BYTES = GIB // 2  # GEMM/attention tactic workspace allowance on top of the activation estimate

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4, "I16": 2,
               "I8": 1, "U8": 1, "BOOL": 1}
PLAN_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}



@dataclass(frozen=True)
class TensorInfo:
    """One checkpoint tensor as its safetensors header describes it."""

    name: str
    dtype: str  # safetensors dtype string, e.g. "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return self.dtype.startswith(("F", "BF"))

    @property
    def is_gemm_weight(self) -> bool:
        """A Linear layer's weight: 2-D ``*.weight`` (ONNX MatMul/Gemm, which ModelOpt quantizes), not an embedding
        table (a Gather) and not a convolution kernel (4-D/5-D)."""
        return len(self.shape) == 2 and self.name.endswith(".weight") and "embed_tokens" not in self.name


@dataclass(frozen=True)
class PrecisionPlan:
    """How the engine stores weights. Regexes match checkpoint tensor names (module paths)."""

    dtype: str = "fp16"  # fp32 | fp16 | bf16 | int8 | fp8
    weight_only: bool = False  # int8 weight-only GEMMs (activations stay fp16)
    high_precision: str = "fp16"  # what non-quantized tensors of a quantized plan are stored as
    quantize_exclude: tuple[str, ...] = ()  # GEMMs kept in high precision (e.g. first/last blocks, embedders)
    fp32_islands: tuple[str, ...] = ()  # tensors kept in fp32 (e.g. a frozen text branch), overriding the rest
    # tensors stored at `high_precision` whatever the plan (a frozen text branch, excluded nodes): matched against
    # the tensor name and its node path (`a.b.weight` -> `/a/b/weight`), as recipe node-name regexes are written
    high_precision_patterns: tuple[str, ...] = ()
    bf16_gemm_patterns: tuple[str, ...] = ()  # GEMM weights stored bf16 whatever the rest (precision.frozen_storage)
    per_channel_scale_bytes: int = 4  # int8: one fp32 scale per output channel of each quantized GEMM


@dataclass
class WeightEstimate:
    """Engine weight bytes and how they split up (for the fit message and the manifest)."""

    total: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    parameters: int = 0

    def add(self, kind: str, count: int) -> None:
        self.by_kind[kind] = self.by_kind.get(kind, 0) + count
        self.total += count


# --- checkpoint headers ----------------------------------------------------------------------------------------------

def checkpoint_tensors(folder: str | Path, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[TensorInfo]:
    """Every tensor of a component folder's shards (sorted by name), filtered by include/exclude regexes."""
    shards = sorted(Path(folder).glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    tensors = []
    for shard in shards:
        for name, entry in safetensors.tensors(shard).items():
            if include and not any(re.search(pattern, name) for pattern in include):
                continue
            if any(re.search(pattern, name) for pattern in exclude):
                continue
            tensors.append(TensorInfo(name, entry["dtype"], tuple(entry["shape"])))
    return sorted(tensors, key=lambda tensor: tensor.name)


# --- weights -----------------------------------------------------------------------------------------------------------

def weight_bytes(tensors: Iterable[TensorInfo], plan: PrecisionPlan) -> WeightEstimate:
    """Bytes the engine stores for these tensors under `plan`.

    fp32/fp16/bf16 plans: every floating tensor at the plan's width, whatever the checkpoint's dtype.
    int8 (weight-only or not) and fp8: each quantized GEMM weight at 1 byte per parameter (int8 adds one
    per-output-channel scale), everything else at ``high_precision``. Tensors matching ``high_precision_patterns``
    (frozen or excluded: never quantized, never lowered) are at ``high_precision`` in every plan; fp32 islands
    override all of it. Integer tensors keep their own width.
    """
    quantized = plan.dtype in ("int8", "fp8")
    if plan.dtype not in PLAN_BYTES and not quantized:
        raise ValueError(f"unknown plan dtype {plan.dtype!r}; expected one of fp32, fp16, bf16, int8, fp8")
    base = PLAN_BYTES[plan.high_precision if quantized else plan.dtype]
    estimate = WeightEstimate()
    for tensor in tensors:
        estimate.parameters += tensor.numel
        if not tensor.is_float:
            estimate.add("integer", tensor.numel * DTYPE_BYTES.get(tensor.dtype, 8))
        elif any(re.search(pattern, tensor.name) for pattern in plan.fp32_islands):
            estimate.add("fp32 islands", tensor.numel * 4)
        elif tensor.is_gemm_weight and plan.bf16_gemm_patterns and _matches(tensor.name, plan.bf16_gemm_patterns):
            estimate.add("bf16 (frozen GEMMs)", tensor.numel * PLAN_BYTES["bf16"])
        elif plan.high_precision_patterns and _matches(tensor.name, plan.high_precision_patterns):
            estimate.add(f"{plan.high_precision} (frozen or excluded)", tensor.numel * PLAN_BYTES[plan.high_precision])
        elif quantized and tensor.is_gemm_weight and not any(re.search(p, tensor.name) for p in plan.quantize_exclude):
            estimate.add(f"{plan.dtype} GEMM weights", tensor.numel)
            if plan.dtype == "int8":
                estimate.add("int8 scales", tensor.shape[0] * plan.per_channel_scale_bytes)
        else:
            estimate.add(f"{plan.high_precision if quantized else plan.dtype}", tensor.numel * base)
    return estimate


def part_weight_bytes(tensors: Sequence[TensorInfo], plan: PrecisionPlan, block_key: str,
                      epilogue_keys: Sequence[str], ranges: Sequence[Sequence[int]]) -> list[WeightEstimate]:
    """:func:`weight_bytes` of each part of an engine split by block ranges: a block's tensors (group 1 of
    `block_key` is the block index) go to the part holding it, tensors matching `epilogue_keys` to the last part,
    every other tensor (embeddings, input projections) to the first."""
    pattern = re.compile(block_key)
    part_of = {block: index for index, blocks in enumerate(ranges) for block in blocks}
    members: list[list[TensorInfo]] = [[] for _ in ranges]
    for tensor in tensors:
        match = pattern.search(tensor.name)
        if match and int(match.group(1)) in part_of:
            members[part_of[int(match.group(1))]].append(tensor)
        elif any(re.search(p, tensor.name) for p in epilogue_keys):
            members[-1].append(tensor)
        else:
            members[0].append(tensor)
    return [weight_bytes(group, plan) for group in members]


def physical_memory_bytes() -> int:
    """This machine's RAM (what `build.host_memory_gib` defaults from)."""
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    node_path = "/" + name.replace(".", "/")
    return any(re.search(pattern, name) or re.search(pattern, node_path) for pattern in patterns)


# --- activations -------------------------------------------------------------------------------------------------------

def image_tokens(height: int, width: int, vae_scale: int = 8, patch: int = 2) -> int:
    """Packed latent tokens of an image: 8x VAE, then 2x2 patches (1024x1024 -> 4096)."""
    return (height // (vae_scale * patch)) * (width // (vae_scale * patch))


def transformer_activation_bytes(config: Mapping[str, object], batch: int, height: int, width: int, text_tokens: int,
                                 act_bytes: int = 2) -> int:
    """Peak activations of one QwenImage block at the max profile shape.

    With N = image tokens + text tokens, D = heads * head_dim and H = heads::

        bytes = act_bytes * batch * (6 * N * D  +  4 * N * D  +  H * N * N)

    6 * N * D: residual stream, normalised/modulated input, q, k, v and the attention output, all [B, N, D];
    4 * N * D: the MLP's hidden [B, N, 4D] (GELU input); H * N * N: one [B, H, N, N] score matrix, i.e. attention
    as if not fused into a flash kernel (TensorRT usually fuses it, so this is the conservative bound). The text
    branch kept in fp32 is a few % of N and ignored. Example: 1024x1024, 256 text tokens, batch 2, fp16:
    N = 4352, ~2.2 GiB.
    """
    heads = int(config["num_attention_heads"])
    width_d = heads * int(config["attention_head_dim"])
    tokens = image_tokens(height, width, patch=int(config.get("patch_size", 2))) + text_tokens
    return act_bytes * batch * (10 * tokens * width_d + heads * tokens * tokens)


def text_encoder_activation_bytes(text_config: Mapping[str, object], batch: int, tokens: int, act_bytes: int = 2) -> int:
    """Peak of one Qwen2.5-VL decoder layer: 6 [B, L, hidden] streams, the gated MLP's 3 [B, L, intermediate]
    (gate, up, their product) and one [B, heads, L, L] score matrix (unfused attention, conservative)."""
    hidden, inner = int(text_config["hidden_size"]), int(text_config["intermediate_size"])
    heads = int(text_config["num_attention_heads"])
    return act_bytes * batch * tokens * (6 * hidden + 3 * inner + heads * tokens)


def vae_decoder_activation_bytes(config: Mapping[str, object], batch: int, height: int, width: int,
                                 act_bytes: int = 2) -> int:
    """Rough peak of the VAE decoder: its full-resolution stage, where the upsampler hands over 2 * base_dim
    channels and a residual block keeps ~4 such [B, C, H, W] tensors live (input, norm, conv, causal cache)."""
    channels = 2 * int(config.get("base_dim", 96))
    return act_bytes * batch * 4 * channels * height * width


# --- the fit check ----------------------------------------------------------------------------------------------------

def gpu_memory_bytes(gpu: str) -> int:
    """Datasheet capacity in bytes."""
    if gpu not in GPU_MEMORY_GIB:
        raise KeyError(f"no memory figure for GPU {gpu!r}; known: {', '.join(GPU_MEMORY_GIB)}")
    return int(GPU_MEMORY_GIB[gpu] * GIB)


def usable_bytes(gpu: str) -> int:
    """What an engine may use: the datasheet capacity less the CUDA context/driver reserve."""
    return gpu_memory_bytes(gpu) - CONTEXT_RESERVE_BYTES


def needed_bytes(weights: int, activations: int) -> int:
    return weights + activations + WORKSPACE_BYTES


def gib(count: float) -> str:
    return f"{count / GIB:.1f} GiB"


def check_fit(gpu: str, weights: int, activations: int, component: str = "engine",
              candidates: Iterable[str] | None = None) -> str | None:
    """None if the engine fits `gpu`, else one line: what it needs, what the GPU has, and what would fit.

    `candidates` limits the GPUs offered instead (e.g. those the backend builds for); default all known ones.
    The weight-streaming budget offered is what is left for weights once activations, workspace and the
    context reserve are taken off (TensorRT streams the rest from host memory at each call).
    """
    need = needed_bytes(weights, activations)
    usable = usable_bytes(gpu)
    if need <= usable:
        return None
    fitting = sorted((name for name in (candidates if candidates is not None else GPU_MEMORY_GIB)
                      if name in GPU_MEMORY_GIB and needed_bytes(weights, activations) <= usable_bytes(name)),
                     key=lambda name: (GPU_MEMORY_GIB[name], name))
    budget = usable - activations - WORKSPACE_BYTES
    streaming = (f"use build.weight_streaming with a budget of at most ~{gib(budget)}" if budget > 0
                 else "weight streaming cannot help (activations alone exceed it); lower the profile's max shape")
    alternative = (f"or a GPU with >= {GPU_MEMORY_GIB[fitting[0]]:g} GiB: {', '.join(fitting)}" if fitting
                   else "no known GPU has enough memory")
    return (f"{component} needs ~{gib(weights)} of weights + ~{gib(activations)} activations + {gib(WORKSPACE_BYTES)} "
            f"workspace; {gpu} has {GPU_MEMORY_GIB[gpu]:g} GiB (~{gib(usable)} usable); {streaming}, {alternative}")
