"""Weights referenced in place: ONNX initializers that point into the checkpoint's safetensors shards.

Why: the release transformer is 41 GB of bf16. A graph stage that loads, upcasts or rewrites it needs that much
RAM and disk per stage and per recipe. Instead every checkpoint tensor becomes an external-data TensorProto
(location = the shard's file name, offset = 8 + header length + data_offsets[0], length) and the shard itself
is hard-linked into the store entry beside `model.onnx`: ONNX Runtime and TensorRT-RTX read it there (they
refuse files outside the model's directory and symlinks escaping it, but accept hard links; only
`onnx.checker`'s full check refuses hard links, so it is never run on these graphs). A checkpoint on another
filesystem is copied once into a shared `store/weights/<sha256>/` entry and linked from there.

Graph stages never see weights: :func:`hide_weights` turns every external initializer into a graph input of
the same name, dtype and shape (constant folding cannot touch it, shape inference and AutoCast read only the
small graph) and :func:`restore_weights` turns them back into the very same references.

The store hashes every output file when it commits an entry. Rehashing a 5 GB shard in every entry would cost
minutes, so a stage records the digest it already knows (the checkpoint's memoised sha256, or the upstream
entry's record) in a sidecar :data:`stages.store.local.KNOWN_DIGESTS`, together with the file's stat signature; the
store trusts it only while size, mtime and inode are unchanged (the same rule as its own stat cache).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages import safetensors
from stages.store.digests import sha256_file, signature
from stages.store.local import KNOWN_DIGESTS, RECORD


# safetensors dtype -> onnx.TensorProto data type
ONNX_TYPES = {"F32": 1, "U8": 2, "I8": 3, "U16": 4, "I16": 5, "I32": 6, "I64": 7, "BOOL": 9, "F16": 10, "F64": 11,
              "BF16": 16, "F8_E4M3": 17, "F8_E5M2": 19}


@dataclass(frozen=True)
class TensorLocation:
    """Where a checkpoint tensor's raw little-endian bytes lie: file (name within its folder), offset, length."""

    file: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int

    @property
    def onnx_type(self) -> int:
        return ONNX_TYPES[self.dtype]


def checkpoint_tensors(folder: Path) -> dict[str, TensorLocation]:
    """Every tensor of a checkpoint folder (sharded with an index, or single files) by its checkpoint key."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    files = sorted({*json.loads(indexes[0].read_text())["weight_map"].values()}) if indexes else \
        sorted(p.name for p in folder.glob("*.safetensors"))
    found: dict[str, TensorLocation] = {}
    for name in files:
        length, header = safetensors.read_header(folder / name)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            start, end = meta["data_offsets"]
            found[key] = TensorLocation(name, meta["dtype"], tuple(meta["shape"]), 8 + length + start, end - start)
    return found


def external_initializer(name: str, location: TensorLocation) -> Any:
    """A TensorProto holding no bytes: it names the shard, offset and length its data lies at."""
    import onnx

    tensor = onnx.TensorProto(name=name, data_type=location.onnx_type, dims=list(location.shape))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in (("location", location.file), ("offset", str(location.offset)), ("length", str(location.length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


def external_location(tensor: Any) -> str | None:
    if tensor.data_location != tensor.EXTERNAL:
        return None
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def external_files(model: Any) -> list[str]:
    """Files the model's external initializers name (relative to the model's directory)."""
    return sorted({loc for t in model.graph.initializer if (loc := external_location(t)) is not None})


# -- placing files: hard links, a shared copy across filesystems, and the digests the store may trust -------------


def note_known_digest(out_dir: Path, name: str, sha256: str) -> None:
    """Tell the store the sha256 of `out_dir/name` (valid while its size, mtime and inode stay the same)."""
    sidecar = out_dir / KNOWN_DIGESTS
    known = json.loads(sidecar.read_text()) if sidecar.exists() else {}
    known[name] = {"sha256": sha256, "signature": signature((out_dir / name).stat())}
    sidecar.write_text(json.dumps(known, sort_keys=True))


def hard_link(source: Path, target: Path) -> bool:
    """Hard-link `source` at `target`; False when they lie on different filesystems."""
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno in (errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK):
            return False
        raise
    return True


SharedCopy = Callable[[Path, str], Path]  # (checkpoint file, its sha256) -> the store's one copy of it


def place_checkpoint_file(source: Path, target: Path, sha256: str | None, shared_copy: SharedCopy | None) -> str:
    """Put checkpoint file `source` at `target` without copying when possible; returns how ("hardlink", ...).

    Same filesystem: a hard link. Otherwise the file is copied once into the store, by `shared_copy` (the action
    layer's, which commits a `weights` entry keyed by its sha256 that all recipes and stages link); without one
    (a stage run by hand) it is copied beside the graph.
    """
    if hard_link(source, target):
        return "hardlink"
    if shared_copy is None:
        shutil.copyfile(source, target)
        return "copy"
    digest = sha256 or sha256_file(source)
    shared = shared_copy(source, digest)
    if not hard_link(shared, target):
        shutil.copyfile(shared, target)
        return "copy"
    return "hardlink to shared copy"


def link_upstream_files(model: Any, source_dir: Path, out_dir: Path) -> dict[str, str]:
    """Hard-link every external-data file the model names from the upstream entry into `out_dir`.

    Digests come from the upstream entry's record (when it has one), so the store does not rehash them."""
    recorded: Mapping[str, Any] = {}
    if (source_dir / RECORD).is_file():
        recorded = json.loads((source_dir / RECORD).read_text()).get("outputs", {})
    placed = {}
    for name in external_files(model):
        target = out_dir / name
        if target.exists():
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        placed[name] = "hardlink" if hard_link(source_dir / name, target) else "copy"
        if placed[name] == "copy":
            shutil.copyfile(source_dir / name, target)
        if name in recorded:
            note_known_digest(out_dir, name, recorded[name]["sha256"])
    return placed


# -- reading weights where a tool needs them in memory ------------------------------------------------------------
# onnx >= 1.23 refuses to read external data from a file with several hard links ("hardlink attack"), which is
# every shard linked in place; the forge reads those bytes itself (plain reads at offset, nothing else).


def external_bytes(tensor: Any, base_dir: Path) -> bytes:
    """The raw bytes an external-data tensor references (file relative to `base_dir`)."""
    info = {e.key: e.value for e in tensor.external_data}
    with open(base_dir / info["location"], "rb") as handle:
        handle.seek(int(info.get("offset", 0)))
        return handle.read(int(info["length"])) if "length" in info else handle.read()


def materialize(model: Any, base_dir: Path) -> int:
    """Read every external initializer into `raw_data` (for tools that need weights in memory); bytes read."""
    import onnx

    total = 0
    for tensor in model.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        tensor.raw_data = external_bytes(tensor, base_dir)
        total += len(tensor.raw_data)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT
    return total


def load_with_weights(path: Path) -> Any:
    """`onnx.load` with its weights read in, also from shards linked in place (which onnx.load refuses)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    materialize(model, Path(path).parent)
    return model


def reference_unchanged(model: Any, source: Any, base_dir: Path) -> int:
    """Where a tool returned a weight byte for byte as the source graph referenced it, reference it again.

    Returns the number of tensors now referenced instead of written."""
    import onnx

    references = {t.name: t for t in source.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    count = 0
    for index, tensor in enumerate(model.graph.initializer):
        reference = references.get(tensor.name)
        if reference is None or tensor.data_type != reference.data_type or list(tensor.dims) != list(reference.dims):
            continue
        if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.raw_data != external_bytes(reference, base_dir):
            continue
        model.graph.initializer[index].CopyFrom(reference)
        count += 1
    return count


def reference_casts(model: Any, source: Any, base_dir: Path) -> int:
    """Where a tool returned a weight as an exact fp16/fp32 cast of the bf16/fp32 tensor the source graph
    referenced (ModelOpt's quantizer converts what it leaves unquantized to its high precision), reference the
    source tensor again and read it through a Cast: TensorRT folds the Cast, and no copy is written.

    Returns the number of tensors now referenced instead of written."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    references = {t.name: t for t in source.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    widen = {onnx.TensorProto.BFLOAT16: lambda raw: (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32),
             onnx.TensorProto.FLOAT: lambda raw: np.frombuffer(raw, np.float32)}
    narrow = {onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.FLOAT: np.float32}
    casts, count = [], 0
    for index, tensor in enumerate(model.graph.initializer):
        reference = references.get(tensor.name)
        if (reference is None or tensor.data_location == onnx.TensorProto.EXTERNAL or reference.data_type not in widen
                or tensor.data_type not in narrow or tensor.data_type == reference.data_type
                or list(tensor.dims) != list(reference.dims)):
            continue
        expected = widen[reference.data_type](external_bytes(reference, base_dir)).astype(narrow[tensor.data_type])
        if expected.tobytes() != numpy_helper.to_array(tensor).tobytes():
            continue
        cast_name = f"{tensor.name}::{onnx.TensorProto.DataType.Name(tensor.data_type).lower()}"
        for node in model.graph.node:
            node.input[:] = [cast_name if name == tensor.name else name for name in node.input]
        casts.append(onnx.helper.make_node("Cast", [tensor.name], [cast_name], name=f"{cast_name}/Cast",
                                           to=tensor.data_type))
        model.graph.initializer[index].CopyFrom(reference)
        count += 1
    nodes = [*casts, *model.graph.node]  # a Cast reads only an initializer: first is a valid topological place
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return count


# -- graph stages without weights --------------------------------------------------------------------------------


def hide_weights(model: Any, only: set[str] | None = None) -> dict[str, Any]:
    """Turn every external-data initializer (or those named in `only`) into a graph input (same name, dtype,
    shape); returns them by name.

    The remaining model holds only the graph and small inline constants: folding cannot materialise anything
    computed from a weight, and shape inference and serialisation stay far below protobuf's 2 GB limit."""
    import onnx

    hidden = {t.name: t for t in model.graph.initializer
              if t.data_location == onnx.TensorProto.EXTERNAL and (only is None or t.name in only)}
    if not hidden:
        return {}
    kept = [t for t in model.graph.initializer if t.name not in hidden]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for tensor in hidden.values():
        model.graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return hidden


def restore_weights(model: Any, hidden: Mapping[str, Any]) -> list[str]:
    """Undo :func:`hide_weights`: inputs named like a hidden weight become its reference again.

    Weights no node reads any more (removed by a pass) are dropped. Returns the weights whose input dtype a
    tool changed (that would mean it expects converted data: an error for the caller to report)."""
    used = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    changed = []
    inputs = []
    for value in model.graph.input:
        tensor = hidden.get(value.name)
        if tensor is None:
            inputs.append(value)
            continue
        if value.type.tensor_type.elem_type != tensor.data_type:
            changed.append(value.name)
        if value.name in used:
            model.graph.initializer.append(tensor)
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return changed

