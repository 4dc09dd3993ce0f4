"""One module's weights at a time from a component's safetensors shards (block-wise validation at scale)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from torch import nn


class ShardReader:
    """Tensors by name from a folder's safetensors shards, read one module at a time, as fp32."""

    def __init__(self, folder: Path) -> None:
        from safetensors import safe_open

        self.where: dict[str, Path] = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                self.where.update({key: shard for key in handle.keys()})

    def load(self, module: nn.Module, prefix: str, extra: dict[str, Any] | None = None) -> None:
        """The module's `<prefix>*` tensors, assigned; a linear PEFT wrapped takes its weights as `base_layer`, and
        `extra` ({parameter name: tensor}, e.g. the LoRA weights) is assigned with them (strict: all or none)."""
        from safetensors import safe_open

        wanted = [key for key in self.where if key.startswith(prefix)]
        state = {}
        for shard in sorted({self.where[key] for key in wanted}):
            with safe_open(str(shard), framework="pt") as handle:
                state.update({key[len(prefix):]: handle.get_tensor(key).float()
                              for key in wanted if self.where[key] == shard})
        names = set(module.state_dict())
        state = {_peft_base(key, names): value for key, value in state.items()}
        module.load_state_dict({**state, **(extra or {})}, strict=True, assign=True)


def _peft_base(key: str, names: set[str]) -> str:
    """A checkpoint key as the module names it: `<linear>.base_layer.<param>` where PEFT wrapped that linear."""
    if key in names or "." not in key:
        return key
    wrapped = "{}.base_layer.{}".format(*key.rsplit(".", 1))
    return wrapped if wrapped in names else key


@contextlib.contextmanager
def one_block_at_a_time(reader: ShardReader, blocks: Sequence[nn.Module], prefix: str,
                        streams: Callable[[Any], dict[str, Any]],
                        extra: Callable[[str], dict[str, Any]] | None = None) -> Iterator[list[dict[str, Any]]]:
    """While the block, each block's weights are read just before it runs (`<prefix><index>.` keys, with
    `extra(<prefix><index>.)`) and dropped to meta right after; yields the list that collects `streams(output)` of
    every block, in order."""
    captured: list[dict[str, Any]] = []

    def release(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(streams(output))
        module.to("meta")

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(
            lambda module, args, p=f"{prefix}{index}.": reader.load(module, p, extra(p) if extra else None)))
        handles.append(block.register_forward_hook(release))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def ship_files(checkpoint_dir: str | Path, out_dir: Path, files: dict[str, str]) -> list[str]:
    """Copy small checkpoint files (configs) into a stage's output: `{checkpoint path: output path}`; returns the
    output paths copied. A built recipe then runs without its checkpoint; one a component-only checkpoint lacks
    (no scheduler/ beside a lone transformer) is left out, and the runtime says so if it needs it."""
    import shutil

    shipped = []
    for source, target in files.items():
        if not (Path(checkpoint_dir) / source).is_file():
            continue
        (out_dir / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(Path(checkpoint_dir) / source, out_dir / target)
        shipped.append(target)
    return sorted(shipped)
