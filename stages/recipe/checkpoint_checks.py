"""Check a diffusers-layout checkpoint directory before any task runs: folders, configs, safetensors headers.

Reads only config files and safetensors headers (a few KB per shard), so it is cheap even for 57 GB of
weights, and a truncated shard or malformed config is reported as one line before anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import safetensors
from stages.errors import ForgeError, fail

if TYPE_CHECKING:
    from stages.recipe.schema import Recipe



def check_checkpoint(source: Path | str, key: str, directory: str, folders: dict[str, str],
                     config_folders: tuple[str, ...], pipeline_parts: tuple[str, ...]) -> None:
    """`folders`: folder -> the component needing it; `pipeline_parts`: files and folders the whole pipeline
    reads when it is loaded (the pipeline check, calibration), else empty."""
    root = Path(directory)

    def error(message: str) -> ForgeError:
        return fail(source, key, f"{directory!r}: {message}")

    if not root.exists():
        raise error("does not exist (use `tiny` or a diffusers checkpoint directory)")
    if not root.is_dir():
        raise error("is a file, not a checkpoint directory (use `tiny` or a diffusers checkpoint directory)")
    needed = dict(folders)
    needed.update({part: "the pipeline check / calibration" for part in pipeline_parts})
    for name, user in needed.items():
        path = root / name
        if name.endswith(".json"):
            _json_object(path, error, f"needed by {user}", root)
        elif not path.exists():
            raise error(f"missing {name}/ (needed by {user}); not a diffusers Qwen-Image checkpoint")
        elif not path.is_dir():
            raise error(f"{name} is a file, not a folder (needed by {user})")
    for folder in config_folders:
        _json_object(root / folder / "config.json", error, f"the {folder} config", root)
        check_weights(root / folder, error)


def _json_object(path: Path, error: Any, what: str, root: Path | None = None) -> dict[str, Any]:
    relative = str(path.relative_to(root)) if root else f"{path.parent.name}/{path.name}"
    if not path.is_file():
        raise error(f"missing {relative} ({what})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as problem:
        raise error(f"{relative} is not valid JSON ({str(problem).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise error(f"{relative} must hold a JSON object")
    return data


def safetensors_header(path: Path) -> dict[str, Any]:
    """The parsed header; ValueError saying what is wrong (truncated, not safetensors, offsets out of range)."""
    length, header = safetensors.read_header(path)
    size = path.stat().st_size
    data_bytes = size - 8 - length
    end = 0
    for name, tensor in header.items():
        if name == safetensors.METADATA:
            continue
        offsets = tensor.get("data_offsets") if isinstance(tensor, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ValueError(f"tensor {name!r} lies outside the file's {data_bytes} data bytes (truncated?)")
        end = max(end, offsets[1])
    if end != data_bytes:
        raise ValueError(f"tensors end at byte {end} of {data_bytes} data bytes (truncated or padded)")
    return header


def check_weights(folder: Path, error: Any) -> None:
    """Every shard's header readable and consistent with its size; an index, if present, agreeing with them."""
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise error(f"no {folder.name}/*.safetensors weights")
    tensors: dict[str, str] = {}
    for shard in shards:
        try:
            header = safetensors_header(shard)
        except (OSError, ValueError) as problem:
            raise error(f"{folder.name}/{shard.name}: {problem}") from None
        tensors.update({name: shard.name for name in header if name != "__metadata__"})
    for index in sorted(folder.glob("*.safetensors.index.json")):
        weight_map = _json_object(index, error, "the shard index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise error(f"{folder.name}/{index.name}: no weight_map object")
        wrong = [(n, f) for n, f in weight_map.items() if tensors.get(n) != f]
        if wrong:
            name, shard = wrong[0]
            where = tensors.get(name)
            raise error(f"{folder.name}/{index.name}: {len(wrong)} entries disagree with the shards, e.g. {name!r} "
                        f"-> {shard} but " + (f"it is in {where}" if where else "no shard holds it"))


def check_model_dir(path: Path, recipe: Recipe, from_command_line: bool) -> None:
    """The checkpoint directory, checked folder by folder and header by header before any task runs; errors
    name `model=` when the directory came from the command line."""
    family = recipe.family_spec
    folders = {folder: f"component {name}" for name in recipe.components
               for folder in family.components[name].checkpoint_folders}
    configs = tuple(dict.fromkeys(family.components[name].config_folder for name in recipe.components))
    pipeline = recipe.pipeline_check is not None or any(c.precision.needs_calibration for c in recipe.components.values())
    if pipeline:
        folders.update({folder: "the pipeline check / calibration" for folder in family.checkpoint_folders()
                        if folder not in folders and folder not in family.pipeline_files})
        configs = tuple(dict.fromkeys((*configs, *(info.config_folder for info in family.components.values()))))
    source, key = ("command line", "model=") if from_command_line else (path, "model.path")
    check_checkpoint(source, key, recipe.model.path, folders, configs, family.pipeline_files if pipeline else ())
