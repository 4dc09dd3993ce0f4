"""Block-wise validation: the chained block segments are the whole graph, the lazy reference is the stock model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from stages.families.qwen_image import FAMILY
from stages.families.qwen_image import transformer as qwen_image
from stages.graphs import blockwise
from stages.graphs.runners import OnnxRuntimeRunner
from stages.recipe.load import load_recipe
from stages.validate import ValidateAgainstPytorch

PATTERN = FAMILY.components["transformer"].block_pattern
SMALL = {"components.transformer.validate.sizes": "[[512, 512], [512, 768]]",
         "components.transformer.validate.timesteps": "[1.0, 0.3]"}


@pytest.fixture(scope="module")
def cases(tiny_checkpoint: Path) -> list[dict]:
    settings = load_recipe("a10-fp16", SMALL).recipe.components["transformer"].validate_
    return qwen_image.validation_cases(qwen_image.load_meta(tiny_checkpoint), settings, 256)


def test_segments_cover_the_graph_in_order(surgery_output: tuple[Path, dict]) -> None:
    model = onnx.load(str(surgery_output[0]), load_external_data=False)
    part = blockwise.partition(model, PATTERN)
    assert [s.name for s in part.segments] == ["prologue", "block 0", "block 1", "epilogue"]
    assert sum(s.nodes for s in part.segments) == len(model.graph.node)
    assert part.segments[-1].outputs == ("sample",)


def test_heavy_blocks_are_cut_into_pieces_under_the_weight_limit(surgery_output: tuple[Path, dict]) -> None:
    """What ModelOpt is handed at once at release width (one GEMM, not a block): each piece reads at most the limit
    in weights unless one node alone reads more, every weight still feeds its reader inside the piece."""
    model = onnx.load(str(surgery_output[0]), load_external_data=False)
    sizes = {t.name: next(int(e.value) for e in t.external_data if e.key == "length")
             for t in model.graph.initializer if t.external_data}
    whole = blockwise.partition(model, PATTERN)
    limit = max(sizes.values()) // 2 + 1
    part = blockwise.partition(model, PATTERN, limit)
    names = [s.name for s in part.segments]
    assert len(names) > len(whole.segments) and "block 0 (2/" in " ".join(names)
    assert [s.block for s in part.segments if s.block is not None] == sorted(s.block for s in part.segments
                                                                            if s.block is not None)
    assert sum(s.nodes for s in part.segments) == len(model.graph.node)
    nodes = list(model.graph.node)
    for segment in part.segments:
        members = [nodes[p] for p in segment.members]
        held = sum(sizes.get(i, 0) for n in members for i in n.input)
        heaviest = max((sum(sizes.get(i, 0) for i in n.input) for n in members), default=0)
        assert held <= max(limit, heaviest) or len([n for n in members if any(i in sizes for i in n.input)]) == 1
        assert not set(segment.inputs) & set(sizes), "a weight never crosses a cut as an activation"


@pytest.mark.parametrize("limit", [None, 4096], ids=["blocks", "pieces"])
def test_chained_segments_give_the_whole_graph_output(surgery_output: tuple[Path, dict], cases: list[dict],
                                                      tmp_path: Path, limit: int | None) -> None:
    onnx_path = surgery_output[0]
    part = blockwise.partition(onnx.load(str(onnx_path), load_external_data=False), PATTERN, limit)
    paths = blockwise.write_segments(onnx_path, part, tmp_path)
    for case in cases[:2]:
        chained = list(blockwise.run_chained(paths, part, case["feed"], optimize=False))[-1][1]["sample"]
        with OnnxRuntimeRunner(onnx_path, optimize=False) as whole:
            expected = whole.infer(case["feed"])["sample"]
        assert np.array_equal(chained, expected), "fp32 graph, no graph rewrites: bit-identical"


def test_lazy_reference_is_the_stock_forward(tiny_checkpoint: Path, cases: list[dict]) -> None:
    model = qwen_image.load(tiny_checkpoint)
    blocks, final = qwen_image.blockwise_reference(tiny_checkpoint, cases[0])
    assert np.array_equal(final["sample"], qwen_image.reference_outputs(model, cases[0])["sample"])
    assert len(blocks) == model.config.num_layers and blocks[0]["image"].shape[1] == 1024


def test_blockwise_validation_reports_every_block(tiny_checkpoint: Path, fp16_output: tuple[Path, dict],
                                                  tmp_path: Path) -> None:
    loaded = load_recipe("a10-fp16", {**SMALL, "components.transformer.validate.blockwise": "true"})
    settings = loaded.recipe.components["transformer"].validate_

    def validate(blockwise_on: bool, out: Path) -> dict:
        out.mkdir()
        return ValidateAgainstPytorch(
            component="transformer", checkpoint_dir=tiny_checkpoint, onnx_path=fp16_output[0],
            engine_paths=(Path("unused.plan"),), compute_capability=(8, 6), backend="tensorrt-rtx", settings=settings,
            text_length=256, blockwise=blockwise_on)(out)

    whole, blocks = validate(False, tmp_path / "whole"), validate(True, tmp_path / "blocks")
    assert blocks["passed"] and blocks["blockwise"] and "blocks" not in whole
    assert [b["block"] for b in blocks["blocks"]] == [0, 1]
    assert "text_cosine" in blocks["blocks"][0] and "text_cosine" not in blocks["blocks"][1], "last text branch is dead"
    assert all(0.999 < b["cosine"] <= 1 and 0 < b["max_abs_diff"] < 0.05 for b in blocks["blocks"])
    final, reference = blocks["comparisons"][0], whole["comparisons"][0]
    assert abs(final["max_abs_diff"] - reference["max_abs_diff"]) < 0.5 * reference["max_abs_diff"], \
        "same graph, same cases: block-wise and whole-graph runs differ only by CPU fp16 rounding at the cuts"
    assert blocks["blocks"][-1]["max_abs_diff"] > 0


def test_max_cases_validates_the_first_cases_only(tiny_checkpoint: Path, fp16_output: tuple[Path, dict],
                                                  cases: list[dict], tmp_path: Path) -> None:
    """What a release-size run on CPU uses: one small case, named in the report."""
    loaded = load_recipe("a10-fp16", {**SMALL, "components.transformer.validate.max_cases": "1"})
    report = ValidateAgainstPytorch(
        component="transformer", checkpoint_dir=tiny_checkpoint, onnx_path=fp16_output[0],
        engine_paths=(Path("unused.plan"),), compute_capability=(8, 6), backend="tensorrt-rtx",
        settings=loaded.recipe.components["transformer"].validate_, text_length=256, blockwise=True)(tmp_path)
    assert len(cases) > 1 and report["cases"] == [cases[0]["description"]]
    assert report["passed"] and [b["block"] for b in report["blocks"]] == [0, 1]
