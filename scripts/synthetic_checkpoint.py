"""Write a synthetic Qwen-Image checkpoint: released configs, seeded random bf16 weights, sharded like the release.

Why: the forge must be measured on the released shapes (20.4 B transformer, Qwen2.5-VL-7B text encoder) without
downloading 57 GB, and at any layer count (2, 8, 60) to see how time and memory grow. The output is a
diffusers-layout directory (``model_index.json``, ``scheduler/``, ``tokenizer/``, ``text_encoder/``,
``transformer/``, ``vae/``) that ``QwenImagePipeline.from_pretrained`` and the component classes load.

Memory stays bounded no matter how many layers: every module is built on the meta device only to learn the
tensor names, shapes and dtypes; each tensor is then generated in fixed-size chunks (one ``torch.Generator``
per tensor, seeded from ``--seed`` and the tensor's name) and streamed into its shard. The safetensors library
has no incremental writer (``save_file`` needs every tensor of a shard in memory), so shards are written here
directly in the safetensors format (8-byte little-endian header length, JSON header padded with spaces to
8 bytes, raw little-endian tensor bytes); the header is known up front from the shapes. Peak RSS is therefore
the Python/torch baseline plus one chunk, independent of the shard size and the layer count.

Values: parameters owned by a normalisation module (class name containing "norm") are ones (weights/gammas)
and zeros (biases), everything else N(0, 0.02). The same ``--seed`` gives byte-identical shards whatever the
shard size or component filter.

Usage::

    .venv/bin/python scripts/synthetic_checkpoint.py --out /tmp/qwen-synth --layers 2 --text-layers 1
    .venv/bin/python scripts/synthetic_checkpoint.py --out /tmp/tiny --config tiny --shard-size 200KB
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import re
import resource
import struct
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

COMPONENTS = ("transformer", "text_encoder", "vae", "tokenizer", "scheduler")
DEFAULT_SHARD_SIZE = "5GB"  # what transformers/diffusers' save_pretrained(max_shard_size="5GB") would cut
CHUNK_ELEMENTS = 1 << 24  # generation granularity: 16 M elements (64 MB fp32 scratch + 32 MB bf16)
INIT_STD = 0.02

# Released Qwen/Qwen-Image transformer/config.json (diffusers 0.42.1 argument names).
RELEASE_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 60, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 3584, "guidance_embeds": False, "axes_dims_rope": (16, 56, 56),
}

# Released text_encoder/config.json: Qwen2.5-VL-7B-Instruct, in transformers 5 layout (text_config/vision_config).
RELEASE_TEXT_ENCODER: dict[str, Any] = {
    "text_config": {
        "vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "hidden_act": "silu", "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6, "max_window_layers": 28, "sliding_window": 32768, "use_sliding_window": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "bos_token_id": 151643, "eos_token_id": 151645,
        "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 1000000.0},
    },
    "vision_config": {
        "depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "in_channels": 3,
        "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "tokens_per_second": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31], "hidden_act": "silu",
    },
    "image_token_id": 151655, "video_token_id": 151656, "vision_start_token_id": 151652,
    "vision_end_token_id": 151653, "tie_word_embeddings": False,
}

# Released vae/config.json equals AutoencoderKLQwenImage's defaults (base 96, z 16, dim_mult 1/2/4/4, 2 res
# blocks, temporal downsample F/T/T and the released latents_mean/std), so the release VAE is the class default.
RELEASE_VAE: dict[str, Any] = {}

MODEL_INDEX_CLASSES = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
    "tokenizer": ["transformers", "Qwen2Tokenizer"],
    "transformer": ["diffusers", "QwenImageTransformer2DModel"],
    "vae": ["diffusers", "AutoencoderKLQwenImage"],
}
WEIGHTS_PREFIX = {"transformer": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model", "text_encoder": "model"}

SAFETENSORS_DTYPES = {  # torch dtype name -> (safetensors dtype, bytes per element)
    "bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4), "float64": ("F64", 8),
    "int64": ("I64", 8), "int32": ("I32", 4), "int16": ("I16", 2), "int8": ("I8", 1), "uint8": ("U8", 1),
    "bool": ("BOOL", 1),
}


# Where the forge keeps each Qwen-Image model module: the family package (current) or the old flat one.
PROJECT_MODULES = {
    "transformer": ("stages.families.qwen_image.transformer", "stages.models.qwen_image"),
    "text_encoder": ("stages.families.qwen_image.text_encoder", "stages.models.qwen_text_encoder"),
    "vae": ("stages.families.qwen_image.vae", "stages.models.qwen_vae"),
    "tokenizer": ("stages.families.qwen_image.tokenizer", "stages.models.qwen_tokenizer"),
    "pipeline": ("stages.families.qwen_image.pipeline", "stages.models.qwen_pipeline"),
}


def project_module(name: str) -> ModuleType:
    """A Qwen-Image model module of the forge, wherever the ongoing refactor has put it."""
    errors = []
    for candidate in PROJECT_MODULES[name]:
        try:
            return importlib.import_module(candidate)
        except ModuleNotFoundError as error:  # noqa: PERF203 - two candidates only
            errors.append(f"{candidate}: {error}")
    raise ImportError("; ".join(errors))


# --- sizes -------------------------------------------------------------------------------------------------------

def parse_size(text: str | int) -> int:
    """'5GB' -> 5_000_000_000 (decimal units, as huggingface_hub reads max_shard_size); 'GiB' etc. are binary."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", text.upper())
    if not match:
        raise argparse.ArgumentTypeError(f"size {text!r}: use e.g. 5GB, 500MB, 64KiB or a byte count")
    number, unit = float(match.group(1)), match.group(2).rstrip("B") or ""
    scale = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "KI": 1 << 10, "MI": 1 << 20, "GI": 1 << 30, "TI": 1 << 40}[unit]
    size = int(number * scale)
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size {text!r} must be positive")
    return size


def human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(size) < 1000 or unit == "TB":
            return f"{size:.2f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.2f} TB"


# --- configs -----------------------------------------------------------------------------------------------------

def component_configs(preset: str, layers: int | None, text_layers: int | None,
                      vision_layers: int | None) -> dict[str, dict[str, Any]]:
    """Constructor arguments per component: the release's, or the forge's tiny test configs, with layer overrides."""
    if preset == "release":
        transformer, text, vae = dict(RELEASE_TRANSFORMER), json.loads(json.dumps(RELEASE_TEXT_ENCODER)), dict(RELEASE_VAE)
    elif preset == "tiny":
        transformer = dict(project_module("transformer").TINY_TRANSFORMER_CONFIG)
        text = json.loads(json.dumps(project_module("text_encoder").TINY_TEXT_ENCODER_CONFIG))
        vae = dict(project_module("vae").TINY_VAE_CONFIG)
    else:
        raise ValueError(f"unknown --config {preset!r}")
    if layers is not None:
        transformer["num_layers"] = layers
    if text_layers is not None:
        text["text_config"]["num_hidden_layers"] = text_layers
    if vision_layers is not None:
        vision = text["vision_config"]
        full = [index for index in vision.get("fullatt_block_indexes", []) if index < vision_layers]
        vision["depth"] = vision_layers
        vision["fullatt_block_indexes"] = full or [vision_layers - 1]
    return {"transformer": transformer, "text_encoder": text, "vae": vae}


# --- tensor plan ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its saved name, shape, torch dtype name and how its values are drawn."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    init: str  # "normal" | "ones" | "zeros"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * SAFETENSORS_DTYPES[self.dtype][1]


def meta_model(component: str, config: dict[str, Any]) -> tuple[Any, Callable[[Path], None]]:
    """The real class built on the meta device (no weight memory) and a function writing its config files."""
    import torch

    if component == "text_encoder":
        from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        hf_config = Qwen2_5_VLConfig(**config)
        hf_config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
        hf_config.dtype = torch.bfloat16
        with torch.device("meta"):
            model = Qwen2_5_VLForConditionalGeneration(hf_config)

        def save_config(folder: Path) -> None:
            hf_config.save_pretrained(folder)
            GenerationConfig.from_model_config(hf_config).save_pretrained(folder)

        return model, save_config
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

    cls = QwenImageTransformer2DModel if component == "transformer" else AutoencoderKLQwenImage
    with torch.device("meta"):
        model = cls(**config)
    return model, lambda folder: model.save_config(folder)


def tensor_plan(component: str, model: Any, dtype: str = "bfloat16") -> list[TensorSpec]:
    """Every tensor the checkpoint holds, under the names `save_pretrained` would write, in natural key order.

    Floating tensors are stored as `dtype` (the release is bf16 throughout); transformers models get the
    library's own reverse key mapping (Qwen2.5-VL saves ``model.layers.*``/``visual.*``/``lm_head.*``, the
    released layout, while its modules are ``model.language_model.*``/``model.visual.*``).
    """
    norm_owned: dict[str, str] = {}
    for prefix, module in model.named_modules():
        if "norm" in type(module).__name__.lower():
            for name, _ in module.named_parameters(recurse=False):
                full = f"{prefix}.{name}" if prefix else name
                norm_owned[full] = "zeros" if name in ("bias", "beta") else "ones"
    state = model.state_dict()
    saved = state
    if component == "text_encoder":
        from transformers.core_model_loading import revert_weight_conversion

        saved = revert_weight_conversion(model, dict(state))
        if len(saved) != len(state):
            raise RuntimeError(f"transformers' key reversal changed the tensor count {len(state)} -> {len(saved)}")
    by_id = {id(tensor): key for key, tensor in state.items()}
    specs = []
    for key, tensor in saved.items():
        original = by_id.get(id(tensor), key)
        kind = norm_owned.get(original, "normal") if tensor.is_floating_point() else "zeros"
        stored = dtype if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
        specs.append(TensorSpec(key, tuple(tensor.shape), stored, kind))
    return sorted(specs, key=lambda spec: natural_key(spec.name))


def natural_key(name: str) -> list[Any]:
    """'blocks.10.x' after 'blocks.9.x', so shards follow layer order like the release's."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def plan_shards(specs: Sequence[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Greedy split in tensor order, as huggingface_hub does: a shard closes before the tensor that would overflow
    it; a tensor larger than `max_bytes` gets a shard of its own."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(prefix: str, count: int) -> list[str]:
    if count == 1:
        return [f"{prefix}.safetensors"]
    return [f"{prefix}-{index:05d}-of-{count:05d}.safetensors" for index in range(1, count + 1)]


# --- generation and writing ------------------------------------------------------------------------------------------

def tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed, so a tensor's values depend on --seed and its name only (not on order or sharding)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


def tensor_chunks(spec: TensorSpec, seed: int) -> Iterator[memoryview]:
    """The tensor's raw little-endian bytes, CHUNK_ELEMENTS at a time (never the whole tensor in memory)."""
    import torch

    dtype = getattr(torch, spec.dtype)
    generator = torch.Generator().manual_seed(tensor_seed(seed, spec.name))
    remaining = spec.numel
    while remaining:
        count = min(remaining, CHUNK_ELEMENTS)
        if spec.init == "normal":
            chunk = torch.empty(count, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator).to(dtype)
        elif spec.init == "ones":
            chunk = torch.ones(count, dtype=dtype)
        else:
            chunk = torch.zeros(count, dtype=dtype)
        # numpy has no bfloat16: reinterpret as same-width integers, which numpy exposes as a raw buffer.
        width = SAFETENSORS_DTYPES[spec.dtype][1]
        view_dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
        yield memoryview(chunk.view(view_dtype).numpy()).cast("B")
        remaining -= count


def safetensors_header(specs: Sequence[TensorSpec], metadata: dict[str, str]) -> bytes:
    """Header bytes (length prefix included) for tensors laid out back to back in `specs` order."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype][0], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header so tensor data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text


class Progress:
    """Bytes written and rate, printed at most every `every` seconds and at each shard's end."""

    def __init__(self, total: int, label: str, every: float = 5.0) -> None:
        self.total, self.label, self.every = total, label, every
        self.done = 0
        self.started = self.last = time.perf_counter()

    def add(self, count: int, force: str | None = None) -> None:
        self.done += count
        now = time.perf_counter()
        if force is None and now - self.last < self.every:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        print(f"[{self.label}] {human(self.done)} / {human(self.total)} ({100 * self.done / max(self.total, 1):.0f}%) "
              f"in {elapsed:.1f} s, {human(self.done / elapsed)}/s, peak RSS {human(peak_rss_bytes())}"
              + (f"  {force}" if force else ""), flush=True)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_shard(path: Path, specs: Sequence[TensorSpec], seed: int, progress: Progress, sparse: bool = False) -> int:
    """Stream one shard to `path` (via a temporary name, so an interrupted run never leaves a valid-looking file)."""
    partial = path.with_name(path.name + ".partial")
    written = 0
    with open(partial, "wb") as handle:
        handle.write(safetensors_header(specs, {"format": "pt"}))
        if sparse:
            handle.truncate(handle.tell() + sum(spec.nbytes for spec in specs))
            specs = []
        for spec in specs:
            for chunk in tensor_chunks(spec, seed):
                handle.write(chunk)
                written += len(chunk)
                progress.add(len(chunk))
    partial.replace(path)
    return written


def write_weights(component: str, folder: Path, specs: Sequence[TensorSpec], seed: int, shard_size: int,
                  sparse: bool = False) -> dict[str, Any]:
    """All shards of one component plus, when there are several, the `*.safetensors.index.json` weight map."""
    prefix = WEIGHTS_PREFIX[component]
    shards = plan_shards(specs, shard_size)
    names = shard_names(prefix, len(shards))
    total = sum(spec.nbytes for spec in specs)
    progress = Progress(total, component)
    started = time.perf_counter()
    for name, shard in zip(names, shards, strict=True):
        write_shard(folder / name, shard, seed, progress, sparse)
        progress.add(0, force=f"wrote {name}")
    if len(shards) > 1:
        metadata: dict[str, Any] = {"total_size": total}
        if component == "text_encoder":
            metadata["total_parameters"] = sum(spec.numel for spec in specs)
        weight_map = {spec.name: name for name, shard in zip(names, shards, strict=True) for spec in shard}
        index = {"metadata": metadata, "weight_map": dict(sorted(weight_map.items()))}
        (folder / f"{prefix}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    seconds = time.perf_counter() - started
    return {"bytes": total, "parameters": sum(spec.numel for spec in specs), "shards": len(shards),
            "seconds": round(seconds, 2), "bytes_per_second": round(total / max(seconds, 1e-9))}


def write_component(component: str, out: Path, config: dict[str, Any], seed: int, shard_size: int,
                    sparse: bool = False) -> dict[str, Any]:
    folder = out / component
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("*.safetensors")) + list(folder.glob("*.safetensors.index.json")):
        stale.unlink()  # a rerun with another shard size must not leave old shards that check_weights would read
    model, save_config = meta_model(component, config)
    save_config(folder)
    specs = tensor_plan(component, model)
    del model
    return write_weights(component, folder, specs, seed, shard_size, sparse)


def write_tokenizer(out: Path) -> None:
    """The forge's offline rebuild of the real Qwen2.5-VL tokenizer (as save_tiny_checkpoint ships it)."""
    tokenizer_module = project_module("tokenizer")
    folder = out / tokenizer_module.TOKENIZER_SUBFOLDER
    tokenizer_module.build_qwen_tokenizer().save_pretrained(folder)


def write_scheduler(out: Path) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = project_module("pipeline").RELEASED_SCHEDULER_CONFIG
    FlowMatchEulerDiscreteScheduler(**config).save_config(out / "scheduler")


def write_model_index(out: Path) -> None:
    import diffusers

    index = {"_class_name": "QwenImagePipeline", "_diffusers_version": diffusers.__version__, **MODEL_INDEX_CLASSES}
    (out / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def generate(out: Path, preset: str = "release", layers: int | None = None, text_layers: int | None = None,
             vision_layers: int | None = None, seed: int = 0, shard_size: int | str = DEFAULT_SHARD_SIZE,
             components: Sequence[str] = COMPONENTS, sparse: bool = False) -> dict[str, Any]:
    """Write the checkpoint; returns per-component figures (bytes, parameters, shards, seconds, rate).

    `sparse`: headers only, tensor data left as holes (reads as zeros, takes no disk): the release shapes for
    work that reads headers and graphs but never the weights (fit checks, tracing on meta)."""
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {', '.join(COMPONENTS)}")
    out.mkdir(parents=True, exist_ok=True)
    configs = component_configs(preset, layers, text_layers, vision_layers)
    size = parse_size(shard_size)
    report: dict[str, Any] = {}
    write_model_index(out)
    for component in COMPONENTS:
        if component not in components:
            continue
        started = time.perf_counter()
        if component in configs:
            report[component] = write_component(component, out, configs[component], seed, size, sparse)
        elif component == "tokenizer":
            write_tokenizer(out)
            report[component] = {"seconds": round(time.perf_counter() - started, 2)}
        else:
            write_scheduler(out)
            report[component] = {"seconds": round(time.perf_counter() - started, 2)}
    report["peak_rss_bytes"] = peak_rss_bytes()
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    parser.add_argument("--config", choices=("release", "tiny"), default="release",
                        help="release: Qwen/Qwen-Image widths; tiny: the forge's test-size configs (fast)")
    parser.add_argument("--layers", type=int, help="transformer blocks (release: 60)")
    parser.add_argument("--text-layers", type=int, help="Qwen2.5-VL decoder layers (release: 28)")
    parser.add_argument("--vision-layers", type=int, help="Qwen2.5-VL vision blocks (release: 32; the forge never runs them)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default=DEFAULT_SHARD_SIZE, type=parse_size,
                        help="max bytes per safetensors shard, e.g. 5GB (default), 500MB, 64KiB")
    parser.add_argument("--components", default=",".join(COMPONENTS),
                        help=f"comma-separated subset of {','.join(COMPONENTS)} (model_index.json is always written)")
    parser.add_argument("--sparse", action="store_true",
                        help="headers only, data as file holes: release shapes without writing the weights")
    args = parser.parse_args(argv)
    for name in ("layers", "text_layers", "vision_layers"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    components = [part.strip() for part in args.components.split(",") if part.strip()]
    try:
        report = generate(args.out, args.config, args.layers, args.text_layers, args.vision_layers, args.seed,
                          args.shard_size, components, args.sparse)
    except ValueError as error:
        parser.error(str(error))
    for component, figures in report.items():
        if isinstance(figures, dict) and "bytes" in figures:
            print(f"{component}: {figures['parameters'] / 1e6:.1f} M params, {human(figures['bytes'])} in "
                  f"{figures['shards']} shard(s), {figures['seconds']} s ({human(figures['bytes_per_second'])}/s)")
    print(f"peak RSS {human(report['peak_rss_bytes'])}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
