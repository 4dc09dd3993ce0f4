"""Weights referenced in place: export writes no weight bytes, graph stages never load or convert them."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stages.families.qwen_image import transformer as qwen_image
from stages.graphs.weights import checkpoint_tensors, external_location, place_checkpoint_file
from stages.store.digests import sha256_file
from stages.store.local import KNOWN_DIGESTS, Store
from stages.tasks.actions import shared_weights_copy

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "synthetic_checkpoint.py"
SHARD = "transformer/diffusion_pytorch_model.safetensors"


def external_initializers(path: Path) -> dict[str, str]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return {t.name: external_location(t) for t in graph.initializer if external_location(t)}


def test_export_writes_no_weight_bytes(exported_onnx: Path, tiny_checkpoint: Path) -> None:
    """Every parameter points into the checkpoint's own shard, hard-linked: the entry's new bytes are the graph."""
    folder = exported_onnx.parent
    located = external_initializers(exported_onnx)
    tensors = checkpoint_tensors(tiny_checkpoint / "transformer")
    assert located and set(located.values()) == {"diffusion_pytorch_model.safetensors"}
    assert {name.removeprefix("model.") for name in located} <= set(tensors)
    shard, original = folder / "diffusion_pytorch_model.safetensors", tiny_checkpoint / SHARD
    assert shard.stat().st_ino == original.stat().st_ino and shard.stat().st_nlink > 1
    new_files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in folder.rglob("*")
                 if p.is_file() and p.stat().st_nlink == 1}
    shipped = {"config.json", "scheduler/scheduler_config.json"}  # what a runtime reads instead of the checkpoint
    assert set(new_files) == {"model.onnx", *shipped} and sum(new_files[f] for f in shipped) < 4096
    assert new_files["model.onnx"] == exported_onnx.stat().st_size < 400_000  # graph + small constants (no RoPE tables)
    assert not (folder / "model.onnx.data").exists()


def test_graph_stages_link_the_same_shard(exported_onnx: Path, surgery_output: tuple[Path, dict],
                                          fp16_output: tuple[Path, dict]) -> None:
    """Surgery and fp16 conversion leave every weight referenced, unconverted: Casts compute the dtype."""
    inode = (exported_onnx.parent / "diffusion_pytorch_model.safetensors").stat().st_ino
    for path in (surgery_output[0], fp16_output[0]):
        assert (path.parent / "diffusion_pytorch_model.safetensors").stat().st_ino == inode
        assert set(external_initializers(path).values()) == {"diffusion_pytorch_model.safetensors"}
        assert [p.name for p in path.parent.iterdir() if p.stat().st_nlink == 1] == ["model.onnx"]
    graph = onnx.load(str(fp16_output[0]), load_external_data=False).graph
    weights = {t.name for t in graph.initializer if external_location(t)}
    assert {t.data_type for t in graph.initializer if t.name in weights} == {onnx.TensorProto.FLOAT}
    casts = [n for n in graph.node if n.op_type == "Cast" and n.input[0] in weights]
    assert casts and all(a.i == onnx.TensorProto.FLOAT16 for n in casts for a in n.attribute if a.name == "to")


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses look their module up while the script is executed
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bf16_surgery(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A release-shaped (bf16, sharded, indexed) tiny transformer checkpoint, exported and through the recipe's
    surgery passes (text length 32), by the stage classes themselves: (checkpoint, surgery graph, report)."""
    from stages.export import ExportOnnx
    from stages.surgery import GraphSurgery

    root = tmp_path_factory.mktemp("bf16-sharded")
    synth = load_script()
    checkpoint = root / "checkpoint"
    synth.write_component("transformer", checkpoint, synth.component_configs("tiny", None, None, None)["transformer"],
                          0, 200_000)
    folders = {name: root / name for name in ("export", "surgery")}
    for folder in folders.values():
        folder.mkdir()
    ExportOnnx("transformer", checkpoint, 32, 20)(folders["export"])
    passes = ("fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup")
    surgery = GraphSurgery("transformer", folders["export"] / "model.onnx", passes, 32)(folders["surgery"])
    return checkpoint, folders["surgery"] / "model.onnx", surgery


def test_bf16_sharded_checkpoint_stays_bf16_through_fp16_plan(bf16_surgery: tuple[Path, Path, dict],
                                                              tmp_path: Path) -> None:
    """A release-shaped (bf16, sharded, indexed) checkpoint at tiny size: weights stay bf16 in place; the
    frozen text branch reads them through Casts to fp32, the rest through Casts to fp16; output as PyTorch's."""
    from stages.precision import ConvertPrecision

    checkpoint, source, surgery = bf16_surgery
    shards = sorted(p.name for p in (checkpoint / "transformer").glob("*.safetensors"))
    assert len(shards) > 1
    folders = {"precision": tmp_path / "precision"}
    folders["precision"].mkdir()
    ConvertPrecision("transformer", source, "fp16", "fp32",
                     tuple(surgery["frozen_nodes"]), ())(folders["precision"])
    path = folders["precision"] / "model.onnx"
    graph = onnx.load(str(path), load_external_data=False).graph
    weights = {t.name: t for t in graph.initializer if external_location(t)}
    assert set(map(external_location, weights.values())) == set(shards)
    assert {t.data_type for t in weights.values()} == {onnx.TensorProto.BFLOAT16}
    for shard in shards:
        assert (folders["precision"] / shard).stat().st_ino == (checkpoint / "transformer" / shard).stat().st_ino
    cast_to = {n.input[0]: next(a.i for a in n.attribute if a.name == "to") for n in graph.node
               if n.op_type == "Cast" and n.input[0] in weights}
    assert cast_to["model.txt_in.weight"] == onnx.TensorProto.FLOAT  # fp32 island, exact bf16 values
    assert cast_to["model.transformer_blocks.0.img_mlp.net.2.weight"] == onnx.TensorProto.FLOAT16

    model = qwen_image.load(checkpoint)
    generator = torch.Generator().manual_seed(3)
    mask = torch.ones(1, 32, dtype=torch.int64)
    mask[0, 20:] = 0
    call = {"hidden_states": torch.randn(1, 96, 16, generator=generator),
            "encoder_hidden_states": torch.randn(1, 32, 16, generator=generator),
            "encoder_hidden_states_mask": mask, "timestep": torch.tensor([0.6]), "img_shapes": [(1, 8, 12)]}
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0].numpy()
    feed = qwen_image.transformer_engine_inputs(**call, axes_dims_rope=model.config.axes_dims_rope)
    (actual,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
    np.testing.assert_allclose(actual, expected, atol=2e-3)


def test_store_trusts_a_known_digest_only_while_the_file_is_unchanged(tmp_path: Path) -> None:
    source = tmp_path / "shard.safetensors"
    source.write_bytes(b"\0" * 4096)
    source.chmod(0o644)
    store = Store(tmp_path / "artifacts")
    for key, claimed, touch in (("a" * 32, "f" * 64, False), ("b" * 32, "f" * 64, True)):
        with store.scratch(key) as scratch:
            os.link(source, scratch / source.name)
            stat = source.stat()
            (scratch / KNOWN_DIGESTS).write_text(json.dumps(
                {source.name: {"sha256": claimed, "signature": [stat.st_size, stat.st_mtime_ns, stat.st_ino]}}))
            if touch:
                os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
            entry = store.commit(scratch, "export", key, {}, {})
        recorded = entry.outputs[source.name]["sha256"]
        assert recorded == (sha256_file(source) if touch else claimed)  # trusted without rehashing, else rehashed
        assert KNOWN_DIGESTS not in entry.outputs and not (entry.path / KNOWN_DIGESTS).exists()
    assert source.stat().st_mode & 0o777 == 0o444  # rehashed (untrusted) files are sealed like any output


def test_checkpoint_on_another_filesystem_is_copied_once(tmp_path: Path) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("needs a second filesystem (/dev/shm)")
    folder = shm / f"forge-test-{os.getpid()}"
    folder.mkdir()
    try:
        source = folder / "model.safetensors"
        source.write_bytes(os.urandom(8192))
        digest = sha256_file(source)
        placed = []
        for name in ("export-a", "export-b"):
            (tmp_path / name).mkdir()
            how = place_checkpoint_file(source, tmp_path / name / source.name, digest,
                                        functools.partial(shared_weights_copy, tmp_path / "artifacts"))
            placed.append((tmp_path / name / source.name).stat().st_ino)
            assert how == "hardlink to shared copy"
        copies = list((tmp_path / "artifacts" / "store" / "weights").iterdir())
        assert len(copies) == 1 and placed[0] == placed[1] == (copies[0] / source.name).stat().st_ino
        assert json.loads((copies[0] / "record.json").read_text())["outputs"][source.name]["sha256"] == digest
    finally:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()


def test_weight_only_int8_of_a_bf16_checkpoint_writes_only_int8(bf16_surgery: tuple[Path, Path, dict],
                                                                 tmp_path: Path) -> None:
    """ModelOpt hands back what it leaves unquantized (the frozen text branch) as fp16 copies of the bf16 weights:
    the stage references the bf16 tensors again through Casts, so it writes the INT8 weights and nothing else."""
    from stages.quantize import QUANTIZED_WEIGHTS, QuantizePrecision
    from stages.graphs.runners import onnxruntime_session

    _, source, surgery = bf16_surgery
    folders = {name: tmp_path / name for name in ("whole", "blocks")}
    for folder in folders.values():
        folder.mkdir()
    checkpoint_weights = {t.name for t in onnx.load(str(source), load_external_data=False).graph.initializer
                          if external_location(t)}
    for name, pattern in (("whole", None), ("blocks", r"^/transformer_blocks/(\d+)/")):
        QuantizePrecision("transformer", source, "int8_weight_only", "max", "fp16", tuple(surgery["frozen_nodes"]), (),
                          block_pattern=pattern)(folders[name])
        graph = onnx.load(str(folders[name] / "model.onnx"), load_external_data=False).graph
        rewritten = [t.name for t in graph.initializer if t.name in checkpoint_weights
                     and external_location(t) in (None, QUANTIZED_WEIGHTS)]
        assert not rewritten, f"{name}: {rewritten[:3]}"
        assert any(t.data_type == onnx.TensorProto.BFLOAT16 and "txt_" in t.name for t in graph.initializer)
        onnxruntime_session(folders[name] / "model.onnx")  # the Casts make a valid graph ONNX Runtime loads
