"""Which Qwen-Image transformer linears may take a LoRA branch, and which do by default (stdlib only: the recipe
checks read it while a recipe loads, the surgery stage when it adds the branches).

The defaults are the twelve linears of every block that the published Qwen-Image LoRAs train: Qwen-Image-Lightning
(8- and 4-step, rank 64, alpha 8: 720 tensors = 60 blocks x 12) and the diffusers/DiffSynth training scripts'
`to_q, to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out, img_mlp.net.0.proj, img_mlp.net.2,
txt_mlp.net.0.proj, txt_mlp.net.2`. The modulation linears (`img_mod.1`, `txt_mod.1`) may be added.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

DEFAULT_TARGETS: tuple[str, ...] = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
BLOCK_LINEARS: tuple[str, ...] = (*DEFAULT_TARGETS, "img_mod.1", "txt_mod.1")
BLOCKS = "transformer_blocks"


def block_linear_shapes(width: int) -> dict[str, tuple[int, int]]:
    """(in, out) of every block linear at a transformer width (heads x head dim): the MLPs widen 4x, the
    modulations give 6 shifts/scales/gates."""
    wide = {"img_mlp.net.0.proj": (width, 4 * width), "txt_mlp.net.0.proj": (width, 4 * width),
            "img_mlp.net.2": (4 * width, width), "txt_mlp.net.2": (4 * width, width),
            "img_mod.1": (width, 6 * width), "txt_mod.1": (width, 6 * width)}
    return {target: wide.get(target, (width, width)) for target in BLOCK_LINEARS}


def lora_modules(weight_names: Iterable[str], targets: Sequence[str]) -> tuple[list[str], list[str]]:
    """(present, absent) module paths `transformer_blocks.<i>.<target>` of a graph's blocks, by its weight names,
    block by block in the targets' order; absent: targeted linears the export left out (the last block's text
    stream reaches no output), whose LoRA weights change nothing."""
    pattern = re.compile(rf"(?:^|\.)({BLOCKS}\.(\d+)\.(.+))\.weight$")
    order = {target: index for index, target in enumerate(targets)}
    found: dict[tuple[int, int], str] = {}
    blocks = set()
    for name in weight_names:
        match = pattern.search(name)
        if match:
            blocks.add(int(match.group(2)))
            if match.group(3) in order:
                found[(int(match.group(2)), order[match.group(3)])] = match.group(1)
    present = [found[key] for key in sorted(found)]
    every = [f"{BLOCKS}.{block}.{target}" for block in sorted(blocks) for target in targets]
    kept = set(present)
    return present, [module for module in every if module not in kept]
