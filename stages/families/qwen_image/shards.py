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

    def load(self, module: nn.Module, prefix: str) -> None:
        from safetensors import safe_open

        wanted = [key for key in self.where if key.startswith(prefix)]
        state = {}
        for shard in sorted({self.where[key] for key in wanted}):
            with safe_open(str(shard), framework="pt") as handle:
                state.update({key[len(prefix):]: handle.get_tensor(key).float()
                              for key in wanted if self.where[key] == shard})
        module.load_state_dict(state, strict=True, assign=True)


@contextlib.contextmanager
def one_block_at_a_time(reader: ShardReader, blocks: Sequence[nn.Module], prefix: str,
                        streams: Callable[[Any], dict[str, Any]]) -> Iterator[list[dict[str, Any]]]:
    """While the block, each block's weights are read just before it runs (`<prefix><index>.` keys) and dropped
    to meta right after; yields the list that collects `streams(output)` of every block, in order."""
    captured: list[dict[str, Any]] = []

    def release(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(streams(output))
        module.to("meta")

    handles = []
    for index, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda module, args, p=f"{prefix}{index}.": reader.load(module, p)))
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
