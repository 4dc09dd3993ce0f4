"""Will each engine fit the recipe's GPU? Checked from the checkpoint's headers before any task runs.

The arithmetic lives in stages.targets.memory_fit and what each engine holds in the family (its `fit` module); this
module applies them to a recipe: each component's weights priced by its precision plan, activations at the
profile's largest shape, and `build.weight_streaming`
(whose budget must leave room for the activations) as the way a too-large engine is accepted.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages.errors import fail
from stages.targets import memory_fit
from stages.targets.backends import BACKENDS
from stages.targets.gpus import GPUS

if TYPE_CHECKING:
    from stages.recipe.schema import Recipe


def estimated_engine_bytes(recipe: Recipe, checkpoint: Path, component: str) -> int:
    """The weight bytes the component's engine holds under the recipe's plan, from the checkpoint's headers: what
    the fit check prices before any task runs, and what the manifest compares with the built engine."""
    arithmetic = recipe.family_spec.fit()
    plan = arithmetic.precision_plan(component, recipe.components[component])
    return arithmetic.engine_weight_bytes(checkpoint, component, plan).total


def check_recipe_fits(path: Path, recipe: Recipe) -> None:
    """Refuse an engine that cannot fit the GPU unless weight streaming is on with a workable budget."""
    checkpoint = Path(recipe.model.path)
    gpu = recipe.target.gpu
    targets = BACKENDS[recipe.target.backend].compute_capabilities
    candidates = [name for name, cc in GPUS.items() if cc in targets]
    family = recipe.family_spec
    arithmetic = family.fit()
    for name, section in recipe.components.items():
        weights = estimated_engine_bytes(recipe, checkpoint, name)
        activations = arithmetic.activation_bytes(name, section, checkpoint, recipe.text_length)
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
