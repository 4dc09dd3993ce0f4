"""Will each engine fit the recipe's GPU? Checked from the checkpoint's headers before any task runs.

The arithmetic lives in stages.targets.memory_fit and what each engine holds in the family (its `fit` module); this
module applies them to a recipe: each component's weights priced by its precision plan, activations at the
profile's largest shape, and `build.weight_streaming`
(whose budget must leave room for the activations) as the way a too-large engine is accepted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from stages.errors import fail
from stages.graphs import parts
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


def part_pricer(recipe: Recipe, checkpoint: Path, component: str) -> Callable[[int], list[int]]:
    """`count -> bytes of each part` of an engine split into `count` block ranges (:func:`estimated_engine_bytes` per
    part), the checkpoint headers read once for every count asked."""
    arithmetic = recipe.family_spec.fit()
    plan = arithmetic.precision_plan(component, recipe.components[component])
    blocks = list(range(arithmetic.block_count(checkpoint, component)))
    tensors = arithmetic.engine_tensors(checkpoint, component)

    def price(count: int) -> list[int]:
        ranges = parts.block_ranges(blocks, count)
        return [e.total for e in arithmetic.part_weight_bytes(tensors, component, plan, ranges)]

    return price


def estimated_part_bytes(recipe: Recipe, checkpoint: Path, component: str, count: int) -> list[int]:
    """:func:`estimated_engine_bytes` of each part of an engine split into `count` block ranges."""
    return part_pricer(recipe, checkpoint, component)(count)


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


def pipeline_check_refusal(recipe: Recipe) -> str | None:
    """Why the pipeline check cannot run with this checkpoint within `pipeline_check.memory_gib` (None: it can):
    its reference is the whole pipeline in fp32, every component loaded at once."""
    check = recipe.pipeline_check
    if check is None or recipe.model.is_tiny:
        return None
    needed = recipe.family_spec.fit().pipeline_reference_bytes(Path(recipe.model.path))
    if needed <= check.memory_gib * memory_fit.GIB:
        return None
    return (f"the fp32 reference pipeline needs ~{memory_fit.gib(needed)} (pipeline_check.memory_gib "
            f"{check.memory_gib:g}); raise it on a machine with that much RAM")


@dataclass(frozen=True)
class PartsChoice:
    """How a component's engine is split: the part count and, from the checkpoint headers, each part's weight
    bytes and expected builder peak (None for the tiny model, whose checkpoint is built by the first task)."""

    count: int
    requested: str | int
    host_memory_bytes: int
    estimated_bytes: tuple[int, ...] | None = None
    builder_peak_bytes: tuple[int, ...] | None = None


def resolve_parts(path: Path, recipe: Recipe) -> dict[str, PartsChoice]:
    """`build.parts` of every component as a count: `auto` is the fewest parts whose builder peak stays under
    `build.host_memory_gib` (default 60% of this machine's RAM: the rest is the OS's, the doit process's and its
    page cache's; on a 24 GB machine parts then peak under 16 GB). Refused in one line when impossible."""
    arithmetic = recipe.family_spec.fit()
    backend = BACKENDS[recipe.target.backend]
    checkpoint = None if recipe.model.is_tiny else Path(recipe.model.path)
    choices = {}
    for name, section in recipe.components.items():
        build, key = section.build, f"components.{name}.build"
        memory = (int(build.host_memory_gib * memory_fit.GIB) if build.host_memory_gib is not None
                  else memory_fit.physical_memory_bytes() * 3 // 5)
        if memory <= backend.builder_fixed_bytes:
            raise fail(path, f"{key}.host_memory_gib", f"{memory / memory_fit.GIB:g} GiB is less than the builder's "
                       f"own ~{memory_fit.gib(backend.builder_fixed_bytes)}; allowed: more than "
                       f"{backend.builder_fixed_bytes / memory_fit.GIB:.2f}")
        if not recipe.family_spec.components[name].block_pattern:
            choices[name] = PartsChoice(1, build.parts, memory)
            continue
        blocks = list(range(arithmetic.block_count(checkpoint, name)))
        if build.parts != "auto" and build.parts > len(blocks):
            raise fail(path, f"{key}.parts", f"{build.parts} parts for {name}'s {len(blocks)} blocks; allowed: auto "
                       f"or 1 to {len(blocks)}")
        if checkpoint is None:
            choices[name] = PartsChoice(1 if build.parts == "auto" else build.parts, build.parts, memory)
            continue
        price = part_pricer(recipe, checkpoint, name)
        whole = sum(price(1))
        fewest = min(len(blocks), max(1, math.ceil(backend.builder_bytes_per_weight_byte * whole
                                                    / (memory - backend.builder_fixed_bytes))))
        for count in ([build.parts] if build.parts != "auto" else range(fewest, len(blocks) + 1)):
            sizes = tuple(price(count))
            peaks = tuple(backend.builder_peak_bytes(size) for size in sizes)
            if build.parts != "auto" or max(peaks) <= memory:
                choices[name] = PartsChoice(count, build.parts, memory, sizes, peaks)
                break
        else:
            raise fail(path, f"{key}.host_memory_gib", f"{memory / memory_fit.GIB:g} GiB cannot build {name} even one "
                       f"block per part (~{memory_fit.gib(max(peaks))} of builder RAM for the largest part); allowed: "
                       f"at least {max(peaks) / memory_fit.GIB:.1f}, or a machine with more RAM")
    return choices
