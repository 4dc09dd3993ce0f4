"""Qwen-Image LoRA files, read with diffusers' own loader, bound to an engine's LoRA inputs (stages.graphs.lora).

`QwenImagePipeline.lora_state_dict` reads the file and converts every key format `load_lora_weights` accepts
(diffusers/PEFT `lora_A`/`lora_B`, kohya/ComfyUI `lora_down`/`lora_up` with `alpha`, `diffusion_model.` and
`lora_unet_` prefixes) to diffusers keys, folding a file's alphas into the weights as diffusers does; a PEFT file's
`lora_alpha`/`rank_pattern`/`alpha_pattern` metadata gives each module its scaling through diffusers'
`_create_lora_config` and PEFT's pattern matching, exactly as `load_lora_adapter` configures PEFT. What the engine
adds per linear is then `scale * scaling * x A^T B^T`, which is what PEFT computes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.errors import fail
from stages.graphs.lora import SCALE_INPUT, Branch, down_input, up_input
from stages.safetensors import read_header
from stages.store.digests import sha256_file

PREFIX = "transformer."  # diffusers loads a Qwen-Image LoRA's keys under the pipeline's transformer
RANKS_KEY = "components.transformer.lora.max_rank"
TARGETS_KEY = "components.transformer.lora.targets"


@dataclass
class LoraFile:
    """One LoRA: per module its `A` [r, in], `B` [out, r] already multiplied by PEFT's scaling (alpha / r)."""

    path: Path
    sha256: str
    modules: dict[str, tuple[np.ndarray, np.ndarray]] = field(repr=False)

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _ in self.modules.values())


def read_lora(path: str | Path) -> LoraFile:
    """A LoRA file through diffusers' loader and key conversion; refuses what diffusers would not load as LoRA."""
    from diffusers import QwenImagePipeline
    from diffusers.utils.peft_utils import _create_lora_config
    from peft.utils.other import get_pattern_key

    path = Path(path)
    if not path.is_file():
        raise fail(path, None, "no such LoRA file")
    if path.suffix != ".safetensors":
        raise fail(path, "format", f"'{path.suffix}' is not allowed; LoRA files must be .safetensors (no pickles)")
    try:
        read_header(path)
    except Exception as error:  # noqa: BLE001 - any unreadable header is the same user error
        raise fail(path, "format", f"not a safetensors file ({error})") from None
    try:
        state, metadata = QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
    except ValueError as error:
        raise fail(path, "keys", f"diffusers cannot convert it: {str(error).splitlines()[0]}") from None
    if any(".lokr_" in key for key in state) or any("lora_magnitude_vector" in key for key in state):
        raise fail(path, "keys", "LoKr/DoRA adapters are not LoRA; allowed: lora_A/lora_B or lora_down/lora_up keys")
    ours = {key[len(PREFIX):]: value for key, value in state.items() if key.startswith(PREFIX)}
    if not ours:
        raise fail(path, "keys", f"no keys under '{PREFIX}' (diffusers loads nothing from it into the transformer); "
                   f"first keys: {sorted(state)[:3]}")
    if metadata is not None:  # as load_lora_adapter keeps it: the transformer's entries, prefix removed
        metadata = {k[len(PREFIX):]: v for k, v in metadata.items() if k.startswith(PREFIX)}
    for key in ours:
        if not (key.endswith(".lora_A.weight") or key.endswith(".lora_B.weight")):
            raise fail(path, key, "not a LoRA weight; allowed: <module>.lora_A.weight and <module>.lora_B.weight "
                       "(bias and other adapter tensors have no engine input)")
    ranks = {f"^{k}": v.shape[1] for k, v in ours.items() if "lora_B" in k and v.ndim > 1}
    config = _create_lora_config(ours, None, metadata, ranks)
    modules = {}
    for key in sorted(ours):
        if not key.endswith(".lora_A.weight"):
            continue
        module = key[: -len(".lora_A.weight")]
        a, b = ours[key], ours.get(f"{module}.lora_B.weight")
        if b is None:
            raise fail(path, f"{module}.lora_B.weight", "missing: every lora_A needs its lora_B")
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise fail(path, PREFIX + key, f"shapes {list(a.shape)} and {list(b.shape)} are not lora_A [r, in] and "
                       "lora_B [out, r] of one rank")
        rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
        modules[module] = (a.float().numpy(), (b.float() * scaling).numpy())
    return LoraFile(path, sha256_file(path), modules)


def check_fits(lora: LoraFile, branches: Sequence[Branch], max_rank: int, pruned: Collection[str] = ()) -> None:
    """Every module of the file has a branch of its shape, within the engine's rank (`pruned`: targeted linears
    that reach no output, whose weights are accepted and change nothing)."""
    by_module = {branch.module: branch for branch in branches}
    for module, (a, b) in lora.modules.items():
        if module in pruned:
            continue
        branch = by_module.get(module)
        if branch is None:
            allowed = sorted({m.split(".", 2)[2] for m in by_module if m.count(".") >= 2})
            raise fail(lora.path, f"{PREFIX}{module}", f"the engine has no LoRA branch for {module}; its branches: "
                       f"{', '.join(allowed) or 'none'} in each block ({TARGETS_KEY})")
        if a.shape[0] > max_rank:
            raise fail(lora.path, f"{PREFIX}{module}", f"rank {a.shape[0]} is above the engine's {max_rank} "
                       f"({RANKS_KEY}); allowed: rank 1..{max_rank}")
        if a.shape[1] != branch.in_features or b.shape[0] != branch.out_features:
            raise fail(lora.path, f"{PREFIX}{module}", f"lora_A {list(a.shape)} / lora_B {list(b.shape)} do not fit "
                       f"{module} ({branch.in_features} in, {branch.out_features} out): allowed lora_A "
                       f"[r, {branch.in_features}], lora_B [{branch.out_features}, r]")


def bind(loras: Sequence[tuple[LoraFile, float]], branches: Sequence[Branch], max_rank: int,
         pruned: Collection[str] = ()) -> dict[str, np.ndarray]:
    """The LoRA inputs of an engine for these (file, scale) pairs: each LoRA in rank slots of its own, zero-padded."""
    total = sum(lora.rank for lora, _ in loras)
    if total > max_rank:
        names = " + ".join(f"{lora.path.name} (rank {lora.rank})" for lora, _ in loras)
        raise fail(", ".join(str(lora.path) for lora, _ in loras), "lora",
                   f"{names} = rank {total} together, above the engine's {max_rank} ({RANKS_KEY})")
    for lora, _ in loras:
        check_fits(lora, branches, max_rank, pruned)
    feed: dict[str, np.ndarray] = {SCALE_INPUT: np.zeros(max_rank, np.float32)}
    for branch in branches:
        feed[down_input(branch.module)] = np.zeros((branch.in_features, max_rank), np.float16)
        feed[up_input(branch.module)] = np.zeros((max_rank, branch.out_features), np.float16)
    offset = 0
    for lora, scale in loras:
        feed[SCALE_INPUT][offset: offset + lora.rank] = scale
        for module, (a, b) in lora.modules.items():
            if module in pruned:
                continue
            rank = a.shape[0]
            feed[down_input(module)][:, offset: offset + rank] = a.T
            feed[up_input(module)][offset: offset + rank, :] = b.T
        offset += lora.rank
    return feed


def apply_with_peft(model: Any, loras: Sequence[tuple[str | Path, float]]) -> Any:
    """The reference: diffusers loads each file into the PyTorch transformer through PEFT, at its scale."""
    _load_adapters(model, _read_for_peft(loras), low_cpu_mem_usage=False)
    return model


def inject_on_meta(model: Any, loras: Sequence[tuple[str | Path, float]]) -> Callable[[str], dict[str, torch.Tensor]]:
    """`apply_with_peft` on a meta-device model (block-wise references): PEFT's layers, scalings and scales are made,
    their weights stay meta. Returns `weights(prefix)`: one module's PEFT parameters
    (`<linear>.lora_A.<adapter>.weight`, ...) relative to `prefix`, in fp32, from the same reading of each file, to
    be assigned block by block."""
    read = _read_for_peft(loras)
    _load_adapters(model, read, low_cpu_mem_usage=True)
    states = [(adapter, {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)})
              for adapter, state, _, _ in read]

    def weights(prefix: str) -> dict[str, torch.Tensor]:
        return {re.sub(r"\.(lora_[AB])\.weight$", rf".\1.{adapter}.weight", key[len(prefix):]): value.float()
                for adapter, state in states for key, value in state.items() if key.startswith(prefix)}

    return weights


def _read_for_peft(loras: Sequence[tuple[str | Path, float]]) -> list[tuple[str, dict[str, Any], Any, float]]:
    """(adapter name, diffusers' converted state dict, its metadata, scale) per file, read once."""
    from diffusers import QwenImagePipeline

    read = []
    for index, (path, scale) in enumerate(loras):
        state, metadata = QwenImagePipeline.lora_state_dict(str(path), return_lora_metadata=True)
        read.append((f"lora{index}", state, metadata, float(scale)))
    return read


def _load_adapters(model: Any, read: Sequence[tuple[str, dict[str, Any], Any, float]],
                   low_cpu_mem_usage: bool) -> None:
    from diffusers import QwenImagePipeline

    for adapter, state, metadata, _ in read:
        QwenImagePipeline.load_lora_into_transformer(dict(state), transformer=model, adapter_name=adapter,
                                                     metadata=metadata, low_cpu_mem_usage=low_cpu_mem_usage)
    model.set_adapters([adapter for adapter, *_ in read], [scale for *_, scale in read])


# -- synthetic LoRAs of the published shapes (tests, CI, scripts/synthetic_lora.py) -------------------------------------

FORMATS = ("peft", "kohya", "lightning")


def write_synthetic(path: Path, shapes: dict[str, tuple[int, int]], rank: int, seed: int, fmt: str = "peft",
                    alpha: float | None = None, magnitude: float = 0.1, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A random LoRA over these modules ({module: (in, out)}) in one of the published key layouts.

    `peft`: diffusers' `save_lora_weights` keys (`transformer.<module>.lora_A.weight`), `alpha` as its PEFT metadata;
    `kohya`: `lora_unet_transformer_blocks_<i>_<module_with_underscores>.lora_down/lora_up.weight` + `.alpha`;
    `lightning`: Qwen-Image-Lightning's `transformer_blocks.<i>.<module>.lora_down/lora_up.weight` + `.alpha`.
    The update `scaling * B A` has entries of about `magnitude / sqrt(in)` (diffusers' linears start at
    ~0.58 / sqrt(in)), whatever the alpha."""
    import json

    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r}: allowed {', '.join(FORMATS)}")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    scaling = (alpha if alpha is not None else rank) / rank
    for module, (features_in, features_out) in shapes.items():
        a = torch.randn(rank, features_in, generator=generator) / math.sqrt(features_in)
        b = torch.randn(features_out, rank, generator=generator) * magnitude / math.sqrt(rank) / scaling
        if fmt == "peft":
            tensors[f"{PREFIX}{module}.lora_A.weight"] = a.to(dtype)
            tensors[f"{PREFIX}{module}.lora_B.weight"] = b.to(dtype)
            continue
        key = f"lora_unet_{module.replace('.', '_')}" if fmt == "kohya" else module
        tensors[f"{key}.lora_down.weight"] = a.to(dtype)
        tensors[f"{key}.lora_up.weight"] = b.to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(float(alpha if alpha is not None else rank))
    metadata = {"format": "pt"}
    if fmt == "peft" and alpha is not None:
        config = {"r": rank, "lora_alpha": alpha, "target_modules": sorted(shapes)}
        metadata["lora_adapter_metadata"] = json.dumps({f"{PREFIX}{k}": v for k, v in config.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def linear_shapes(model: Any, targets: Sequence[str]) -> dict[str, tuple[int, int]]:
    """{module: (in, out)} of every block's targeted linears in a (meta or real) transformer."""
    shapes = {}
    for name, module in model.named_modules():
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "transformer_blocks" and parts[2] in targets:
            shapes[name] = (int(module.in_features), int(module.out_features))
    return shapes
