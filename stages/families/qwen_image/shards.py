"""One module's weights at a time from a component's safetensors shards (block-wise validation at scale)."""

from __future__ import annotations

from pathlib import Path

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
