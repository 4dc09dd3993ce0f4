"""Block-wise validation of the text encoder: chained decoder-layer segments are the whole graph, and the lazy
reference (one layer's weights in memory) is the stock transformers forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from stages.families.qwen_image import FAMILY
from stages.families.qwen_image import text_encoder as te
from stages.graphs import blockwise
from stages.graphs.runners import OnnxRuntimeRunner
from stages.recipe.load import load_recipe
from stages.validate import ValidateAgainstPytorch
from tests.conftest import forget_symbolic_dims

PATTERN = FAMILY.components["text_encoder"].block_pattern
TEXT_LENGTH = 256
BLOCKWISE = {"components.text_encoder.validate.blockwise": "true"}


@pytest.fixture(scope="module")
def cases(tiny_checkpoint: Path) -> list[dict[str, Any]]:
    settings = load_recipe("a10-fp16").recipe.components["text_encoder"].validate_
    return te.validation_cases(te.load_meta(tiny_checkpoint), settings, TEXT_LENGTH)


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.export import ExportOnnx

    out = tmp_path_factory.mktemp("text_encoder_export")
    ExportOnnx("text_encoder", tiny_checkpoint, TEXT_LENGTH, 20)(out)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def fp16_graph(exported: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a10-fp16's text-encoder surgery and precision, run by the stage classes themselves."""
    from stages.precision import ConvertPrecision
    from stages.surgery import GraphSurgery

    plan = load_recipe("a10-fp16").recipe.components["text_encoder"]
    surgery, precision = tmp_path_factory.mktemp("te_surgery"), tmp_path_factory.mktemp("te_precision")
    report = GraphSurgery("text_encoder", exported, tuple(plan.surgery.passes), TEXT_LENGTH)(surgery)
    ConvertPrecision("text_encoder", surgery / "model.onnx", plan.precision.dtype, plan.precision.high_precision,
                     tuple(report["frozen_nodes"]), ())(precision)
    return precision / "model.onnx"


def test_lazy_reference_is_the_stock_forward(tiny_checkpoint: Path, cases: list[dict[str, Any]]) -> None:
    model = te.load(tiny_checkpoint)
    layers = model.config.text_config.num_hidden_layers
    for case in (cases[0], cases[-1]):
        blocks, final = te.blockwise_reference(tiny_checkpoint, case)
        assert np.array_equal(final["hidden_states"], te.reference_outputs(model, case)["hidden_states"])
        assert len(blocks) == layers
        with torch.no_grad():
            stock = model(**case["call"], output_hidden_states=True).hidden_states
        for index, block in enumerate(blocks[:-1]):  # the stock last entry is after the final norm
            assert np.array_equal(block["hidden_states"], stock[index + 1].numpy())


def test_lazy_reference_reads_one_layer_at_a_time_and_no_vision_tower(
        tiny_checkpoint: Path, cases: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    read, layers = [], []
    original = te.ShardReader.load

    def load(reader: te.ShardReader, module: torch.nn.Module, prefix: str, extra: Any = None) -> None:
        assert all(p.is_meta for layer in layers for p in layer.parameters()), "the previous layer was dropped"
        original(reader, module, prefix, extra)
        read.append(prefix)
        if ".layers." in prefix:
            layers.append(module)

    monkeypatch.setattr(te.ShardReader, "load", load)
    te.blockwise_reference(tiny_checkpoint, cases[0])
    assert read == ["model.embed_tokens.", "model.norm.", "model.layers.0.", "model.layers.1."]
    assert all(p.is_meta for layer in layers for p in layer.parameters())


def test_lazy_reference_reads_the_module_named_layout(tiny_checkpoint: Path, cases: list[dict[str, Any]],
                                                     tmp_path: Path) -> None:
    """Checkpoints saved under transformers' module names (`model.language_model.*`) work as the released layout."""
    source = tiny_checkpoint / te.TEXT_ENCODER_SUBFOLDER
    target = tmp_path / te.TEXT_ENCODER_SUBFOLDER
    target.mkdir()
    (target / "config.json").write_bytes((source / "config.json").read_bytes())
    renamed = {key.replace("model.", "model.language_model.", 1) if key.startswith("model.") else key: tensor
               for key, tensor in load_file(source / "model.safetensors").items()}
    save_file(renamed, target / "model.safetensors", metadata={"format": "pt"})
    _, expected = te.blockwise_reference(tiny_checkpoint, cases[0])
    _, final = te.blockwise_reference(tmp_path, cases[0])
    assert np.array_equal(final["hidden_states"], expected["hidden_states"])


def test_chained_segments_give_the_whole_graph_output(exported: Path, cases: list[dict[str, Any]],
                                                      tmp_path: Path) -> None:
    model = onnx.load(str(exported), load_external_data=False)
    part = blockwise.partition(model, PATTERN)
    assert [s.name for s in part.segments] == ["prologue", "block 0", "block 1", "epilogue"]
    assert sum(s.nodes for s in part.segments) == len(model.graph.node)
    assert part.segments[-1].outputs == ("hidden_states",)
    paths = blockwise.write_segments(exported, part, tmp_path)
    for case in (cases[0], cases[-1]):
        chained = list(blockwise.run_chained(paths, part, case["feed"], optimize=False))[-1][1]["hidden_states"]
        with OnnxRuntimeRunner(exported, optimize=False) as whole:
            expected = whole.infer(case["feed"])["hidden_states"]
        assert np.array_equal(chained, expected), "fp32 graph, no graph rewrites: bit-identical"


def test_blockwise_validation_reports_every_layer(tiny_checkpoint: Path, fp16_graph: Path, tmp_path: Path) -> None:
    settings = load_recipe("a10-fp16", BLOCKWISE).recipe.components["text_encoder"].validate_

    def validate(blockwise_on: bool, out: Path) -> dict[str, Any]:
        out.mkdir()
        return ValidateAgainstPytorch(
            component="text_encoder", checkpoint_dir=tiny_checkpoint, onnx_path=fp16_graph,
            engine_paths=(Path("unused.plan"),), compute_capability=(8, 6), backend="tensorrt-rtx", settings=settings,
            text_length=TEXT_LENGTH, blockwise=blockwise_on)(out)

    whole, blocks = validate(False, tmp_path / "whole"), validate(True, tmp_path / "blocks")
    assert blocks["passed"] and blocks["blockwise"] and "blocks" not in whole
    assert blocks["cases"] == whole["cases"]
    assert [b["block"] for b in blocks["blocks"]] == [0, 1]
    assert all(0.999 < b["cosine"] <= 1 and 0 < b["max_abs_diff"] < 0.05 for b in blocks["blocks"])
    final, reference = blocks["comparisons"][0], whole["comparisons"][0]
    # ONNX Runtime's CPU runs chains of fp16 nodes in fp32 inside one session, while every cut rounds the residual
    # stream (and the shared mask and RoPE tables) to fp16: same order of error, not the same error
    assert reference["max_abs_diff"] / 4 < final["max_abs_diff"] < 4 * reference["max_abs_diff"]


def test_parts_profiles_survive_the_mask_range_losing_the_batch(fp16_graph: Path) -> None:
    """The release text encoder split in parts: ONNX's shape inference loses the batch at the causal mask's `Range`
    and leaves the residual stream handed between parts as `[unk, 290, 3584]`; its profile then comes from ONNX
    Runtime's symbolic shape inference, and equals the symbolic dims' (found at release width, docs/scale.md)."""
    from stages.graphs import parts

    model = onnx.load(str(fp16_graph), load_external_data=False)
    profile = load_recipe("a10-fp16").recipe.components["text_encoder"].profile
    shapes = te.profile_shapes(profile, TEXT_LENGTH, {})
    plan = parts.plan_parts(model, PATTERN, 2)[1]
    expected = parts.input_profiles(model, plan, shapes)
    handed = [name for name in plan.inputs if name not in shapes]
    assert handed and all(expected[name][0][0] == profile.batch.min and expected[name][2][0] == profile.batch.max
                          for name in handed if len(expected[name][0]) == 3)
    forget_symbolic_dims(model, handed)
    assert parts.input_profiles(model, plan, shapes) == expected
