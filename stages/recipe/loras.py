"""`lora=FILE[:SCALE][,FILE2[:SCALE2]]`, checked before any task runs from the files' safetensors headers (stdlib):
`doit build` (a recipe's pipeline check with a LoRA bound) and `doit generate` read it the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.errors import fail
from stages.safetensors import read_header

SOURCE = "command line"


def no_lora_inputs(source: str = SOURCE) -> Exception:
    return fail(source, "lora", "the transformer engine has no LoRA inputs (components.transformer.lora is not set); "
                "allowed: a recipe with a lora section, e.g. a10-fp16")


def parse_lora(text: str, settings: Any, source: str = SOURCE) -> tuple[tuple[Path, float], ...]:
    """`FILE[:SCALE][,FILE2[:SCALE2]]` -> ((path, scale), ...), each file a readable .safetensors whose LoRA ranks
    (read from its header) fit the engine's `lora.max_rank`; one line naming what is wrong otherwise."""
    if settings is None:
        raise no_lora_inputs(source)
    found = []
    for item in [part.strip() for part in text.split(",")]:
        if not item:
            raise fail(source, "lora", f"{text!r} has an empty entry; allowed: FILE[:SCALE][,FILE2[:SCALE2]]")
        name, scale = item, 1.0
        head, _, tail = item.rpartition(":")
        if head and not Path(item).exists():
            try:
                name, scale = head, float(tail)
            except ValueError:
                raise fail(source, "lora", f"{item!r}: scale {tail!r} is not a number; allowed: FILE[:SCALE]") from None
        if not scale == scale or abs(scale) == float("inf"):
            raise fail(source, "lora", f"{item!r}: the scale must be a finite number")
        path = Path(name)
        if not path.is_file():
            raise fail(path, "lora", "no such file; allowed: a LoRA .safetensors file")
        if path.suffix != ".safetensors":
            raise fail(path, "lora", f"'{path.suffix}' files are not read; allowed: .safetensors (no pickles)")
        try:
            _, header = read_header(path)
        except (OSError, ValueError) as error:
            raise fail(path, "lora", f"not a safetensors file ({error})") from None
        ranks = {key: info["shape"][0] for key, info in header.items() if key != "__metadata__"
                 and ("lora_A" in key or "lora_down" in key) and len(info.get("shape", [])) == 2}
        if not ranks:
            raise fail(path, "lora", "holds no lora_A / lora_down weights; allowed: a LoRA file")
        key, rank = max(ranks.items(), key=lambda item: item[1])
        if rank > settings.max_rank:
            raise fail(path, key, f"rank {rank} is above the engine's {settings.max_rank} "
                       f"(components.transformer.lora.max_rank); allowed: rank 1..{settings.max_rank}")
        found.append((path, scale, rank))
    total = sum(rank for _, _, rank in found)
    if total > settings.max_rank:
        raise fail(source, "lora", f"{' + '.join(f'{p.name} (rank {r})' for p, _, r in found)} = rank {total} "
                   f"together, above the engine's {settings.max_rank} (components.transformer.lora.max_rank); "
                   "allowed: LoRAs whose ranks sum to at most that")
    return tuple((path, scale) for path, scale, _ in found)


