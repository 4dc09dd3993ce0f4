"""Will each engine fit the recipe's GPU? Checked from the checkpoint's headers before any task runs.

The arithmetic lives in stages.memory_fit; this module applies it to a recipe: each component's weights
priced by its precision plan, activations at the profile's largest shape, and `build.weight_streaming`
(whose budget must leave room for the activations) as the way a too-large engine is accepted.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from stages import memory_fit
from stages.errors import fail

if TYPE_CHECKING:
    from stages.recipe import Component, Recipe


def activation_bytes(component: str, section: Component, checkpoint: Path, text_length: int) -> int:
    profile = section.profile
    batch = profile.batch.max
    if component == "transformer" and profile.height and profile.width:
        config = json.loads((checkpoint / "transformer" / "config.json").read_text())
        return memory_fit.transformer_activation_bytes(config, batch, profile.height.max, profile.width.max, text_length)
    if component == "text_encoder":
        config = json.loads((checkpoint / "text_encoder" / "config.json").read_text())
        text = config.get("text_config", config)
        return memory_fit.text_encoder_activation_bytes(text, batch, text_length + 34)
    if component == "vae_decoder" and profile.height and profile.width:
        config = json.loads((checkpoint / "vae" / "config.json").read_text())
        return memory_fit.vae_decoder_activation_bytes(config, batch, profile.height.max, profile.width.max)
    return 0


def check_recipe_fits(path: Path, recipe: Recipe) -> None:
    """Refuse an engine that cannot fit the GPU unless weight streaming is on with a workable budget."""
    from stages.backends import BACKENDS
    from stages.gpus import GPUS

    checkpoint = Path(recipe.model.path)
    gpu = recipe.target.gpu
    targets = BACKENDS[recipe.target.backend].compute_capabilities
    candidates = [name for name, cc in GPUS.items() if cc in targets]
    for name, section in recipe.components.items():
        if name not in memory_fit.COMPONENT_WEIGHTS:
            continue
        plan = section.precision
        weights = memory_fit.component_weight_bytes(checkpoint, name, memory_fit.PrecisionPlan(
            dtype=plan.dtype, weight_only=plan.weight_only, high_precision=plan.high_precision)).total
        activations = activation_bytes(name, section, checkpoint, recipe.text_length)
        key = f"components.{name}.build.weight_streaming"
        streaming = section.build.weight_streaming
        if streaming is None:
            refusal = memory_fit.check_fit(gpu, weights, activations, name, candidates)
            if refusal:
                raise fail(path, key, refusal)
            continue
        room = memory_fit.usable_bytes(gpu) - activations - memory_fit.WORKSPACE_BYTES
        if streaming.budget_gib * memory_fit.GIB > room:
            raise fail(path, f"{key}.budget_gib", f"{streaming.budget_gib:g} GiB of weights on {gpu} leaves no room "
                       f"for ~{memory_fit.gib(activations)} of {name} activations; allowed: at most "
                       f"{max(room, 0) / memory_fit.GIB:.1f}")
