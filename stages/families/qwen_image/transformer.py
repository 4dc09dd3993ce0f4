"""Qwen-Image transformer quirks: the tiny configuration, exportable RoPE and the engine's input contract.

Stock diffusers RoPE multiplies complex tensors (``torch.polar``/``view_as_complex``), which neither ONNX
exporter handles. The engine therefore takes RoPE as real cos/sin inputs computed on the host by
:func:`transformer_engine_inputs`, and the exported graph rotates query/key pairs with real arithmetic.
This also makes one graph serve every image size: the positional tables are data, not constants.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import diffusers.models.transformers.transformer_qwenimage as qwen_module
from diffusers import QwenImageTransformer2DModel

from stages.families.qwen_image.shards import ShardReader as _ShardReader
from stages.families.qwen_image.shards import one_block_at_a_time, ship_files
from stages.families.qwen_image.lora_targets import lora_modules  # noqa: F401 - the family contract
from stages.families.qwen_image.text_branch import TEXT_BRANCH_PATTERNS  # noqa: F401 - the family contract

TINY_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 4,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "joint_attention_dim": 16,
    "axes_dims_rope": (8, 4, 4),
}

INPUT_NAMES = [
    "hidden_states",
    "encoder_hidden_states",
    "encoder_hidden_states_mask",
    "timestep",
    "img_rope_cos",
    "img_rope_sin",
    "txt_rope_cos",
    "txt_rope_sin",
]
OUTPUT_NAMES = ["sample"]
TEXT_AXES = {"encoder_hidden_states": 1, "encoder_hidden_states_mask": 1, "txt_rope_cos": 0, "txt_rope_sin": 0}



def text_axis_length(text_length: int) -> int:
    """The transformer sees the prompt embeddings after the template prefix is dropped."""
    return text_length


def make_tiny_transformer(seed: int) -> QwenImageTransformer2DModel:
    """The real diffusers class at test size, so CI exercises every code path of the released model."""
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(**TINY_TRANSFORMER_CONFIG).eval()


def load_meta(checkpoint_dir: str | Path) -> QwenImageTransformer2DModel:
    """The model's structure and config without its weights (no memory): enough to make validation cases."""
    config = QwenImageTransformer2DModel.load_config(str(Path(checkpoint_dir) / "transformer"))
    with torch.device("meta"):
        return QwenImageTransformer2DModel.from_config(config).eval()


def load(checkpoint_dir: str | Path) -> QwenImageTransformer2DModel:
    """Load `transformer/` of a diffusers-layout checkpoint offline, in fp32 (the reference precision)."""
    model = QwenImageTransformer2DModel.from_pretrained(
        checkpoint_dir, subfolder="transformer", torch_dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def architecture(checkpoint_dir: str | Path) -> QwenImageTransformer2DModel:
    """The class built from `transformer/config.json` in fp32, no weights read (the export stage calls this with
    parameters on the meta device and references the checkpoint's tensors in place)."""
    config = QwenImageTransformer2DModel.load_config(checkpoint_dir, subfolder="transformer", local_files_only=True)
    return QwenImageTransformer2DModel.from_config(config).float().eval()


_ROPE_CACHE: dict[tuple[Any, ...], dict[str, np.ndarray]] = {}


def export_extras(checkpoint_dir: str | Path, out_dir: Path, text_length: int) -> dict[str, Any]:
    """Ship the config and the scheduler the denoising loop runs beside the ONNX (stages.runtime reads them)."""
    return {"runtime_files": ship_files(checkpoint_dir, out_dir, {
        "transformer/config.json": "config.json", "scheduler/scheduler_config.json": "scheduler/scheduler_config.json"})}


def transformer_engine_inputs(
    hidden_states: Any,
    encoder_hidden_states: Any,
    encoder_hidden_states_mask: Any,
    timestep: Any,
    img_shapes: Sequence[tuple[int, int, int]],
    axes_dims_rope: Sequence[int] = (16, 56, 56),
) -> dict[str, np.ndarray]:
    """Turn a diffusers-level transformer call into the engine's input dict.

    Arguments mirror ``QwenImageTransformer2DModel.forward``: ``hidden_states`` [B, N, C] packed latents,
    ``encoder_hidden_states`` [B, T, D] padded to the engine's fixed text length, ``encoder_hidden_states_mask``
    [B, T] (1 = real token, 0 = padding), ``timestep`` [B] (sigma in [0, 1]) and ``img_shapes``, a list of
    (frame, height, width) in latent patches (or the pipeline's [[(frame, height, width)]] per entry), all
    equal within a batch as diffusers requires.
    ``axes_dims_rope`` is the model config's value (the released model's by default). Tensors may be torch
    or numpy; the result is numpy, ready for ONNX Runtime or a TensorRT runner.
    """
    # The pipeline passes one [(frame, h, w)] list per batch entry; diffusers' RoPE reads its first shape.
    shapes = [tuple(int(v) for v in (shape[0] if isinstance(shape[0], (list, tuple)) else shape))
              for shape in img_shapes]
    if len(set(shapes)) != 1:
        raise ValueError(f"`img_shapes` must hold one shape for the whole batch, got {shapes}.")
    feed = {
        "hidden_states": _as_numpy(hidden_states, np.float32),
        "encoder_hidden_states": _as_numpy(encoder_hidden_states, np.float32),
        "encoder_hidden_states_mask": _as_numpy(encoder_hidden_states_mask, np.int64),
        "timestep": _as_numpy(timestep, np.float32).reshape(-1),
    }
    text_length = feed["encoder_hidden_states"].shape[1]
    key = (tuple(axes_dims_rope), shapes[0], text_length)
    if key not in _ROPE_CACHE:
        rope = qwen_module.QwenEmbedRope(theta=10000, axes_dim=list(axes_dims_rope), scale_rope=True)
        _ROPE_CACHE[key] = _rope_from_module(rope, shapes[0], text_length)
    feed.update(_ROPE_CACHE[key])
    return feed


def _rope_from_module(rope: nn.Module, img_shape: tuple[int, ...], text_length: int) -> dict[str, np.ndarray]:
    img_freqs, txt_freqs = rope([img_shape], max_txt_seq_len=text_length, device=torch.device("cpu"))
    return {
        "img_rope_cos": img_freqs.real.float().numpy(),
        "img_rope_sin": img_freqs.imag.float().numpy(),
        "txt_rope_cos": txt_freqs.real.float().numpy(),
        "txt_rope_sin": txt_freqs.imag.float().numpy(),
    }


def _as_numpy(value: Any, dtype: type) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(value).astype(dtype))


def apply_real_rope(x: torch.Tensor, freqs: tuple[torch.Tensor, torch.Tensor], **_: Any) -> torch.Tensor:
    """Stock ``apply_rotary_emb_qwen(use_real=False)`` rewritten with real arithmetic on interleaved pairs."""
    cos, sin = freqs
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(3).type_as(x)


class _PrecomputedRope(nn.Module):
    """Stands in for ``pos_embed`` during export: returns the RoPE tables the engine receives as inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: tuple[Any, Any] | None = None

    def forward(self, *_: Any, **__: Any) -> tuple[Any, Any]:
        return self.tables


@contextlib.contextmanager
def real_rope(model: QwenImageTransformer2DModel) -> Iterator[_PrecomputedRope]:
    """Swap complex RoPE for real arithmetic inside the stock forward; restores the model on exit."""
    original_pos_embed = model.pos_embed
    original_apply = qwen_module.apply_rotary_emb_qwen
    holder = _PrecomputedRope()
    model.pos_embed = holder
    qwen_module.apply_rotary_emb_qwen = apply_real_rope
    try:
        yield holder
    finally:
        model.pos_embed = original_pos_embed
        qwen_module.apply_rotary_emb_qwen = original_apply


class ExportableTransformer(nn.Module):
    """Engine signature around the stock model: RoPE tables in, packed latent prediction out.

    Use inside :func:`real_rope`; everything but RoPE is the unmodified diffusers forward, so padded text
    tokens are masked by diffusers' own joint [text, image] mask.
    """

    def __init__(self, model: QwenImageTransformer2DModel, rope_holder: _PrecomputedRope) -> None:
        super().__init__()
        self.model = model
        self.rope_holder = rope_holder

    def forward(
        self,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_mask: torch.Tensor,
        timestep: torch.Tensor,
        img_rope_cos: torch.Tensor,
        img_rope_sin: torch.Tensor,
        txt_rope_cos: torch.Tensor,
        txt_rope_sin: torch.Tensor,
    ) -> torch.Tensor:
        self.rope_holder.tables = ((img_rope_cos, img_rope_sin), (txt_rope_cos, txt_rope_sin))
        return self.model(
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            timestep=timestep,
            img_shapes=None,
            return_dict=False,
        )[0]


def example_inputs(model: QwenImageTransformer2DModel, text_length: int) -> dict[str, torch.Tensor]:
    """Small trace inputs; batch 2 and a non-square image so neither dynamic axis is specialised away."""
    config = model.config
    batch, height, width = 2, 8, 12
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, text_length, dtype=torch.int64)
    mask[1, text_length // 2 :] = 0
    feed = transformer_engine_inputs(
        torch.randn(batch, height * width, config.in_channels, generator=generator),
        torch.randn(batch, text_length, config.joint_attention_dim, generator=generator),
        mask,
        torch.tensor([1.0, 0.5]),
        [(1, height, width)] * batch,
        axes_dims_rope=config.axes_dims_rope,
    )
    return {name: torch.from_numpy(feed[name]) for name in INPUT_NAMES}


def dynamic_shapes() -> dict[str, dict[int, Any] | None]:
    from torch.export import Dim

    batch = Dim("batch", min=1, max=64)
    img_tokens = Dim("img_tokens", min=4, max=65536)
    return {
        "hidden_states": {0: batch, 1: img_tokens},
        "encoder_hidden_states": {0: batch},
        "encoder_hidden_states_mask": {0: batch},
        "timestep": {0: batch},
        "img_rope_cos": {0: img_tokens},
        "img_rope_sin": {0: img_tokens},
        "txt_rope_cos": None,
        "txt_rope_sin": None,
    }


@contextlib.contextmanager
def export_wrapper(model: QwenImageTransformer2DModel) -> Iterator[nn.Module]:
    with real_rope(model) as holder:
        yield ExportableTransformer(model, holder).eval()


def image_tokens(height: int, width: int, config: dict[str, Any]) -> int:
    """Packed latent tokens for an image in pixels: 8x VAE downsampling, then patch x patch packing."""
    step = 8 * config["patch_size"]
    return (height // step) * (width // step)


def profile_shapes(profile: Any, text_length: int, config: dict[str, Any]) -> dict[str, list[tuple[int, ...]]]:
    """min/opt/max shape of every engine input for a recipe profile (batch, height, width ranges); the image tokens
    stop at the profile's largest area (its `sizes`, else height.max x width.max)."""
    rope_dim = config["attention_head_dim"] // 2
    shapes: dict[str, list[tuple[int, ...]]] = {name: [] for name in INPUT_NAMES}
    for level in ("min", "opt", "max"):
        batch = getattr(profile.batch, level)
        size = profile.largest if level == "max" else (getattr(profile.height, level), getattr(profile.width, level))
        tokens = image_tokens(*size, config)
        shapes["hidden_states"].append((batch, tokens, config["in_channels"]))
        shapes["encoder_hidden_states"].append((batch, text_length, config["joint_attention_dim"]))
        shapes["encoder_hidden_states_mask"].append((batch, text_length))
        shapes["timestep"].append((batch,))
        shapes["img_rope_cos"].append((tokens, rope_dim))
        shapes["img_rope_sin"].append((tokens, rope_dim))
        shapes["txt_rope_cos"].append((text_length, rope_dim))
        shapes["txt_rope_sin"].append((text_length, rope_dim))
    return shapes


def validation_bytes(config: Any, batch: int, height: int, width: int, text_length: int) -> int:
    """Activations of one validation case (validate.case_memory_gib): ONNX Runtime CPU and the reference compute in
    fp32 and hold a [batch, heads, tokens, tokens] score matrix and its softmax at once, plus ~10 [batch, tokens,
    width] streams; at release width 928x1664 needs ~17 GiB, 512x512 ~1.2 GiB."""
    heads, dim = int(config["num_attention_heads"]), int(config["attention_head_dim"])
    tokens = image_tokens(height, width, config) + text_length
    return 4 * batch * (2 * heads * tokens * tokens + 10 * tokens * heads * dim)


def validation_cases(model: QwenImageTransformer2DModel, settings: Any, text_length: int) -> list[dict[str, Any]]:
    """Realistic inputs: N(0,1) latents and text embeddings, padded masks, timesteps across (0, 1], sizes.

    Each batch entry i gets `text_tokens[i % len]` real tokens followed by padding, like fixed tokenizer
    padding produces; the same generator seed gives the same cases on every run.
    """
    config = model.config
    generator = torch.Generator().manual_seed(settings.seed)
    cases = []
    for height, width in settings.sizes:
        patches = (1, height // (8 * config.patch_size), width // (8 * config.patch_size))
        tokens = patches[1] * patches[2]
        for step in settings.timesteps:
            batch = settings.batch
            mask = torch.zeros(batch, text_length, dtype=torch.int64)
            for index in range(batch):
                mask[index, : settings.text_tokens[index % len(settings.text_tokens)]] = 1
            call = {
                "hidden_states": torch.randn(batch, tokens, config.in_channels, generator=generator),
                "encoder_hidden_states": torch.randn(batch, text_length, config.joint_attention_dim, generator=generator),
                "encoder_hidden_states_mask": mask,
                "timestep": torch.full((batch,), float(step)),
                "img_shapes": [patches] * batch,
            }
            cases.append({
                "description": f"{height}x{width} batch {batch} timestep {step}",
                "activation_bytes": validation_bytes(config, batch, height, width, text_length),
                "call": call,
                "feed": transformer_engine_inputs(**call, axes_dims_rope=config.axes_dims_rope),
            })
    return cases


def lora_cases(model: QwenImageTransformer2DModel, cases: list[dict[str, Any]], targets: Sequence[str], max_rank: int,
               scale: float, work: Path, seed: int, graph_inputs: Sequence[tuple[str, Sequence[int]]]
               ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The first case again with a LoRA bound: synthetic files of the targets' shapes, rank `max_rank` (PEFT keys and
    metadata alpha) and a lower rank, zero-padded (kohya keys, `.alpha`), at `scale`; each case's reference is
    diffusers + PEFT loading that file into the fp32 model (`reference_outputs` and `blockwise_reference` load a case's
    `loras`). `model` may be on the meta device: only its shapes are read. Returns (the cases, what the report says)."""
    from stages.families.qwen_image import lora
    from stages.graphs.lora import graph_branches

    rank, branches = graph_branches(graph_inputs)
    shapes = lora.linear_shapes(model, targets)
    pruned = set(shapes) - {branch.module for branch in branches}  # the export left them out: they reach no output
    found, files = [], []
    for number, (lora_rank, fmt) in enumerate(((max_rank, "peft"), (max(1, max_rank // 4), "kohya"))):
        path = lora.write_synthetic(work / f"lora-{number}-rank{lora_rank}-{fmt}.safetensors", shapes, lora_rank,
                                    seed + 1000 + number, fmt, alpha=lora_rank / 2)
        weights = lora.read_lora(path)
        binding = lora.bind([(weights, scale)], branches, rank, pruned)
        found.append({**cases[0], "description": f"{cases[0]['description']} + LoRA rank {lora_rank} ({fmt} keys) "
                      f"at scale {scale:g}", "feed": {**cases[0]["feed"], **binding}, "loras": [(path, scale)]})
        files.append({"rank": lora_rank, "format": fmt, "alpha": lora_rank / 2, "sha256": weights.sha256})
    return found, {"max_rank": rank, "scale": scale, "files": files, "cases": [c["description"] for c in found],
                   "reference": "diffusers load_lora_into_transformer (PEFT) on the fp32 model"}


def reference_outputs(model: QwenImageTransformer2DModel, case: dict[str, Any]) -> dict[str, np.ndarray]:
    """Stock diffusers forward in fp32: complex RoPE and `img_shapes`, exactly as the pipeline calls it; a case's
    `loras` ([(file, scale)]) are loaded by diffusers + PEFT into a copy of the model."""
    if case.get("loras"):
        import copy

        from stages.families.qwen_image import lora

        model = lora.apply_with_peft(copy.deepcopy(model), case["loras"])
    with torch.no_grad():
        sample = model(**case["call"], return_dict=False)[0]
    return {"sample": sample.numpy()}


# -- block-wise validation at scale (see stages/graphs/blockwise.py) ---------------------------------------------------

def blockwise_reference(checkpoint_dir: str | Path, case: dict[str, Any]) -> tuple[list[dict[str, np.ndarray]],
                                                                                  dict[str, np.ndarray]]:
    """The stock diffusers forward in fp32 with one block's weights in memory at a time (:func:`block_by_block`).

    Returns every block's (text, image) hidden states and the final output, exactly as `reference_outputs` computes
    them. A case's `loras` are injected by diffusers + PEFT into the meta model (adapters, scalings, scales) and
    each block's LoRA weights are read with its base weights.
    """
    with block_by_block(checkpoint_dir, case.get("loras")) as (model, captured):
        sample = model(**case["call"], return_dict=False)[0]
    captured[-1].pop("text")  # the last block's text stream reaches no output: not in the graph, nothing to match
    return captured, {"sample": sample.numpy()}


@contextlib.contextmanager
def block_by_block(checkpoint_dir: str | Path, loras: Sequence[tuple[str | Path, float]] | None = None,
                   streams: Callable[[Any], dict[str, Any]] | None = None
                   ) -> Iterator[tuple[QwenImageTransformer2DModel, list[dict[str, Any]]]]:
    """The model in fp32 on the meta device, each block loaded from the safetensors shards just before it runs and
    dropped right after, for as many calls as the block runs; the small modules around the blocks are loaded up
    front. Yields the model and the list collecting `streams(block output)` (default: image and text hidden
    states) of every block run, in order."""
    folder = Path(checkpoint_dir) / "transformer"
    model = load_meta(checkpoint_dir)
    model.pos_embed = type(model.pos_embed)(theta=10000, axes_dim=list(model.config.axes_dims_rope), scale_rope=True)
    block_loras = None
    if loras:
        from stages.families.qwen_image import lora

        block_loras = lora.inject_on_meta(model, loras)
    reader = _ShardReader(folder)
    for name, child in model.named_children():
        if name not in ("transformer_blocks", "pos_embed"):
            reader.load(child, f"{name}.")
    with one_block_at_a_time(reader, model.transformer_blocks, "transformer_blocks.", streams or _image_and_text,
                             block_loras) as captured, torch.no_grad():
        yield model, captured


def _image_and_text(output: Any) -> dict[str, np.ndarray]:
    text, image = output
    return {"image": image.float().numpy().copy(), "text": text.float().numpy().copy()}
