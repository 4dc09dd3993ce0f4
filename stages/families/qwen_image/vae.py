"""Qwen-Image VAE decoder quirks: the tiny configuration, the single-frame decode graph and its input contract.

Engine contract. The input ``latents`` is exactly what QwenImagePipeline holds after the denoising loop and
``_unpack_latents``: float32 [B, z_dim, 1, H/f, W/f] (f = 2 ** len(temperal_downsample), 8 for the released
VAE), still in the *normalised* latent space the transformer works in. The output ``image`` is float32
[B, 3, H, W] in [-1, 1], what the pipeline passes to ``image_processor.postprocess``. Keeping the frame axis
(fixed at 1) makes the host side nothing but the pipeline's own ``_unpack_latents``; see
:func:`vae_decoder_engine_inputs`, which also accepts the loop's packed [B, N, 4 * z_dim] latents.

De-normalisation lives in the graph. diffusers 0.42.1 (pipeline_qwenimage.py) decodes with::

    latents_std = 1.0 / tensor(vae.config.latents_std)      # the reciprocal of the std ...
    latents = latents / latents_std + latents_mean          # ... so this is latents * std + mean
    image = vae.decode(latents)[0][:, :, 0]

The exported graph applies the same two operations with the same constants (division by the reciprocal,
not a multiplication, so it matches the pipeline bit for bit in fp32) before the stock ``vae.decode``. Folding
it in keeps the per-checkpoint constants out of the host code and makes the engine's input the transformer's
output space, which the precision stage can calibrate with N(0, 1) latents.

Dynamic shapes. ``AutoencoderKLQwenImage.decode`` exports as is with dynamic batch/height/width: for one
frame the causal-conv feature cache only holds Python-side bookkeeping (``"Rep"`` markers, clones that are
never read), so the graph is the plain causal-conv decoder. Tiling and slicing are switched off while
exporting because they are Python branches on the trace shapes that would bake one tile layout into the graph.

Upsampling. The decoder's ``QwenImageUpsample`` uses ``nearest-exact``, which the dynamo exporter lowers to
float index arithmetic (Range, +0.5, *scale, Cast to int64) feeding GatherND. AutoCast lowers that arithmetic
to fp16/bf16, and the indices then round to wrong or out-of-range pixels: from 256 px in bf16 and above
1024 px in fp16 (seen in the emulated graphs of scripts/vae_precision_benchmark.py). For an integer scale s,
nearest-exact's floor((i + 0.5) / s) equals nearest's floor(i / s), so the wrapper switches those modules to
``nearest`` while exporting: the graph gets an index-free ONNX Resize that TensorRT runs natively, with
bit-identical output.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageUpsample

from stages.families.qwen_image.shards import ship_files

CHECKPOINT_SUBFOLDER = "vae"

# z_dim 4 matches the tiny transformer (out_channels 4, in_channels 16 = 4 * 2 * 2). Unlike diffusers' own
# tiny test VAE (dim_mult (1, 2, 4), 4x), three down stages keep the released 8x compression, so one pixel
# profile means the same latent size for the transformer and the VAE, and the decoder has the released mix of
# upsample3d/upsample2d blocks. Mean/std are the released values' first four channels, so de-normalisation
# is non-trivial in tests.
TINY_VAE_CONFIG: dict[str, Any] = {
    "base_dim": 16,
    "z_dim": 4,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [-0.7571, -0.7089, -0.9113, 0.1075],
    "latents_std": [2.8184, 1.4541, 2.3275, 2.6558],
}

INPUT_NAMES = ["latents"]
OUTPUT_NAMES = ["image"]
TEXT_BRANCH_PATTERNS: list[str] = []
TEXT_AXES: dict[str, int] = {}  # no text input: `fix_text_padding` has nothing to pin

MAX_BATCH = 64
MAX_LATENT_SIDE = 512  # 4096 px at 8x


def text_axis_length(text_length: int) -> int:
    """Protocol completeness only: the decoder has no text input, so nothing is pinned to this length."""
    return text_length


def make_tiny_vae(seed: int, config: Mapping[str, Any] | None = None) -> AutoencoderKLQwenImage:
    """The real diffusers class at test size; the caller's global RNG state is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoencoderKLQwenImage(**dict(config or TINY_VAE_CONFIG))
    return model.eval()


def load(checkpoint_dir: str | Path) -> AutoencoderKLQwenImage:
    """Load `vae/` of a diffusers-layout checkpoint offline, in fp32 (the reference precision)."""
    folder = Path(checkpoint_dir) / CHECKPOINT_SUBFOLDER
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"checkpoint_dir: {checkpoint_dir} has no {CHECKPOINT_SUBFOLDER}/config.json "
            f"(expected a diffusers-layout Qwen-Image checkpoint with a `{CHECKPOINT_SUBFOLDER}` subfolder)"
        )
    model = AutoencoderKLQwenImage.from_pretrained(
        checkpoint_dir, subfolder=CHECKPOINT_SUBFOLDER, torch_dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def architecture(checkpoint_dir: str | Path) -> AutoencoderKLQwenImage:
    """The class built from `vae/config.json` in fp32, no weights read (see the export stage: meta parameters)."""
    config = AutoencoderKLQwenImage.load_config(checkpoint_dir, subfolder=CHECKPOINT_SUBFOLDER, local_files_only=True)
    return AutoencoderKLQwenImage.from_config(config).float().eval()


def spatial_compression(config: Mapping[str, Any]) -> int:
    """Pixels per latent along each side; the pipeline derives its `vae_scale_factor` the same way."""
    return 2 ** len(config["temperal_downsample"])


def denormalization_constants(config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, 1 / std) shaped [1, z_dim, 1, 1, 1], built exactly as the pipeline builds them."""
    z_dim = config["z_dim"]
    for key in ("latents_mean", "latents_std"):
        if len(config[key]) != z_dim:
            raise ValueError(f"config.{key}: needs z_dim={z_dim} entries, got {len(config[key])}")
    mean = torch.tensor(config["latents_mean"]).view(1, z_dim, 1, 1, 1)
    inverse_std = 1.0 / torch.tensor(config["latents_std"]).view(1, z_dim, 1, 1, 1)
    return mean, inverse_std


class ExportableVaeDecoder(nn.Module):
    """Engine signature around the stock decode: normalised latents in, [-1, 1] image out.

    The constants are buffers so they become graph initializers (and move with `.to()`), never host inputs.
    """

    def __init__(self, model: AutoencoderKLQwenImage) -> None:
        super().__init__()
        self.model = model
        mean, inverse_std = denormalization_constants(model.config)
        self.register_buffer("latents_mean", mean, persistent=False)
        self.register_buffer("latents_inverse_std", inverse_std, persistent=False)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.latents_inverse_std.to(latents.dtype) + self.latents_mean.to(latents.dtype)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        decoded = self.model.decode(self.denormalize(latents), return_dict=False)[0]
        return decoded[:, :, 0]


def _integer_nearest_exact_upsamplers(model: nn.Module) -> list[nn.Upsample]:
    found = []
    for module in model.modules():
        if isinstance(module, QwenImageUpsample) and module.mode == "nearest-exact":
            factors = module.scale_factor if isinstance(module.scale_factor, tuple) else (module.scale_factor,)
            if module.size is None and all(float(f).is_integer() and f >= 1 for f in factors):
                found.append(module)
    return found


@contextlib.contextmanager
def export_wrapper(model: AutoencoderKLQwenImage) -> Iterator[nn.Module]:
    saved = (model.use_tiling, model.use_slicing)
    upsamplers = _integer_nearest_exact_upsamplers(model)
    model.use_tiling, model.use_slicing = False, False
    for module in upsamplers:
        module.mode = "nearest"
    try:
        yield ExportableVaeDecoder(model).eval()
    finally:
        model.use_tiling, model.use_slicing = saved
        for module in upsamplers:
            module.mode = "nearest-exact"


def example_inputs(model: AutoencoderKLQwenImage, text_length: int) -> dict[str, torch.Tensor]:
    """Trace inputs; batch 2 and a non-square latent so no dynamic axis is specialised. No text input."""
    generator = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(2, model.config.z_dim, 1, 8, 12, generator=generator)}


def dynamic_shapes() -> dict[str, dict[int, Any] | None]:
    from torch.export import Dim

    return {
        "latents": {
            0: Dim("batch", min=1, max=MAX_BATCH),
            3: Dim("latent_height", min=2, max=MAX_LATENT_SIDE),
            4: Dim("latent_width", min=2, max=MAX_LATENT_SIDE),
        }
    }


def latent_shape(batch: int, height: int, width: int, config: Mapping[str, Any]) -> tuple[int, int, int, int, int]:
    """Engine input shape for an image of `height` x `width` pixels."""
    factor = spatial_compression(config)
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ValueError(f"{name}: {value} px is not a multiple of the VAE's spatial compression {factor}")
    return (batch, config["z_dim"], 1, height // factor, width // factor)


def profile_shapes(profile: Any, text_length: int, config: Mapping[str, Any]) -> dict[str, list[tuple[int, ...]]]:
    """min/opt/max engine input shapes for a recipe profile in pixels; `config` is the VAE's config.json."""
    return {
        "latents": [
            latent_shape(getattr(profile.batch, level), getattr(profile.height, level), getattr(profile.width, level), config)
            for level in ("min", "opt", "max")
        ]
    }


def export_extras(checkpoint_dir: str | Path, out_dir: Path, text_length: int) -> dict[str, Any]:
    """Ship the VAE config beside the ONNX: a runtime derives the latent layout from it."""
    return {"runtime_files": ship_files(checkpoint_dir, out_dir, {"vae/config.json": "config.json"})}


def vae_decoder_engine_inputs(
    latents: Any,
    height: int | None = None,
    width: int | None = None,
    vae_scale_factor: int = 8,
) -> dict[str, np.ndarray]:
    """Turn the latents the pipeline produces into the engine's input dict (numpy float32).

    Accepts the denoising loop's packed [B, N, 4 * z_dim] latents (then `height`/`width` in pixels and the
    pipeline's `vae_scale_factor` are required, and unpacking is the pipeline's own `_unpack_latents`), the
    unpacked [B, z_dim, 1, h, w] latents the pipeline hands to the VAE step, or [B, z_dim, h, w]. Pass the
    latents *before* de-normalisation: the engine applies it.
    """
    tensor = torch.as_tensor(latents.detach().cpu() if isinstance(latents, torch.Tensor) else np.asarray(latents))
    if tensor.ndim == 3:
        if height is None or width is None:
            raise ValueError("height/width: packed [B, N, C] latents need the image height and width in pixels")
        from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

        tensor = QwenImagePipeline._unpack_latents(tensor, height, width, vae_scale_factor)
    elif tensor.ndim == 4:
        tensor = tensor.unsqueeze(2)
    elif tensor.ndim != 5:
        raise ValueError(f"latents: expected 3 (packed), 4 or 5 dims, got shape {tuple(tensor.shape)}")
    if tensor.shape[2] != 1:
        raise ValueError(f"latents: the engine decodes one frame; axis 2 must be 1, got shape {tuple(tensor.shape)}")
    return {"latents": np.ascontiguousarray(tensor.numpy().astype(np.float32))}


def validation_bytes(config: Mapping[str, Any], batch: int, height: int, width: int) -> int:
    """Activations of one validation case in fp32 (validate.case_memory_gib): ~4 [batch, 2 * base_dim, H, W]
    tensors at full resolution, times 3 for ONNX Runtime's im2col buffers of the 3x3x3 convolutions (measured:
    3.25 GB peak at 512x512 with the release VAE; ~13 GiB estimated at 1664x928)."""
    return 3 * 4 * batch * 4 * 2 * int(config.get("base_dim", 96)) * height * width


def validation_cases(model: AutoencoderKLQwenImage, settings: Any, text_length: int) -> list[dict[str, Any]]:
    """N(0, 1) latents, the distribution the transformer is trained to produce, at each size; seeded."""
    generator = torch.Generator().manual_seed(settings.seed)
    cases = []
    for height, width in settings.sizes:
        shape = latent_shape(settings.batch, height, width, model.config)
        latents = torch.randn(*shape, generator=generator)
        cases.append({
            "description": f"{height}x{width} batch {settings.batch}",
            "activation_bytes": validation_bytes(model.config, settings.batch, height, width),
            "call": {"latents": latents},
            "feed": vae_decoder_engine_inputs(latents),
        })
    return cases


def reference_outputs(model: AutoencoderKLQwenImage, case: dict[str, Any]) -> dict[str, np.ndarray]:
    """The pipeline's post-loop lines verbatim (own constants, stock decode, frame 0), in fp32."""
    latents = case["call"]["latents"].to(model.dtype)
    config = model.config
    latents_mean = torch.tensor(config.latents_mean).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents_std = 1.0 / torch.tensor(config.latents_std).view(1, config.z_dim, 1, 1, 1).to(latents.device, latents.dtype)
    latents = latents / latents_std + latents_mean
    with torch.no_grad():
        image = model.decode(latents, return_dict=False)[0][:, :, 0]
    return {"image": image.float().numpy()}

