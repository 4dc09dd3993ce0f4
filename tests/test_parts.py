"""Engines split by block ranges (stages.graphs.parts): the chained part graphs are the whole graph, each part is a
real engine, and a split build lists its parts, validates them chained and rebuilds a damaged part alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from stages.engine import BuildEngine
from stages.errors import ForgeError
from stages.families.qwen_image import FAMILY
from stages.families.qwen_image import transformer as qwen_image
from stages.graphs import blockwise, parts
from stages.graphs.lora import is_lora_input
from stages.graphs.runners import ChainedRunner, OnnxRuntimeRunner, run_all
from tests.conftest import (REPO, SMALL_ARGS, SMALL_RECIPE, built_tasks, copy_entries, forget_symbolic_dims, run_doit,
                            verify_manifest, view_name)
from stages.recipe.load import load_recipe

PATTERN = FAMILY.components["transformer"].block_pattern
SMALL = {"components.transformer.validate.sizes": "[[512, 512], [512, 768]]",
         "components.transformer.validate.timesteps": "[1.0, 0.3]"}
SPLIT = "components.transformer.build.parts=2"


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny-width transformer with three blocks (synthetic random checkpoint) and its fp32 graph after the
    recipe's surgery: three parts need three blocks, the built-in tiny model has two."""
    sys.path.insert(0, str(REPO / "scripts"))
    from synthetic_checkpoint import generate

    from stages.export import ExportOnnx
    from stages.surgery import GraphSurgery

    root = tmp_path_factory.mktemp("three-blocks")
    generate(root / "checkpoint", preset="tiny", layers=3, components=("transformer",))
    (root / "export").mkdir()
    (root / "surgery").mkdir()
    ExportOnnx("transformer", root / "checkpoint", 256, 20)(root / "export")
    passes = ("fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup")
    GraphSurgery("transformer", root / "export" / "model.onnx", passes, 256)(root / "surgery")
    return root / "checkpoint", root / "surgery" / "model.onnx"


@pytest.fixture(scope="module")
def cases(three_blocks: tuple[Path, Path]) -> list[dict[str, Any]]:
    settings = load_recipe("a10-fp16", SMALL).recipe.components["transformer"].validate_
    return qwen_image.validation_cases(qwen_image.load_meta(three_blocks[0]), settings, 256)


def test_block_ranges_are_consecutive_and_balanced() -> None:
    assert parts.block_ranges(list(range(7)), 3) == [(0, 1), (2, 3), (4, 5, 6)]
    assert parts.block_ranges(list(range(60)), 8)[0] == tuple(range(7)), "the larger ranges come last"
    assert [len(r) for r in parts.block_ranges(list(range(60)), 8)] == [7, 7, 7, 7, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="1 to 2"):
        parts.block_ranges([0, 1], 3)


@pytest.mark.parametrize("count", [2, 3])
def test_chained_part_graphs_are_the_whole_graph(three_blocks: tuple[Path, Path], cases: list[dict[str, Any]],
                                                 tmp_path: Path, count: int) -> None:
    """fp32 graph, ONNX Runtime rewrites off: the chained parts give the whole graph's output bit for bit."""
    onnx_path = three_blocks[1]
    model = onnx.load(str(onnx_path), load_external_data=False)
    plans = parts.plan_parts(model, PATTERN, count)
    assert [p.blocks for p in plans] == parts.block_ranges([0, 1, 2], count)
    every = set().union(*(set(p.nodes) for p in plans))
    assert every == set(range(len(model.graph.node))), "every node runs in some part"
    declared = {v.name: v.type.tensor_type for v in (*model.graph.input, *model.graph.value_info)}
    handed: set[str] = set()
    for plan in plans:
        graph_inputs = {i.name for i in model.graph.input}
        assert set(plan.inputs) <= graph_inputs | handed, "a part takes graph inputs and earlier parts' outputs"
        crossing = [name for name in plan.inputs if name not in graph_inputs]
        assert all(len(declared[n].shape.dim) >= 2 for n in crossing), "activations cross a cut, not shape values"
        handed |= set(plan.outputs)
    assert plans[-1].outputs == ("sample",)
    runners = [OnnxRuntimeRunner(parts.write_part(onnx_path, plan, tmp_path, model)[0], optimize=False)
               for plan in plans]
    chained = run_all(ChainedRunner(runners, [p.inputs for p in plans], ["sample"], "parts"), [c["feed"] for c in cases])
    whole = run_all(OnnxRuntimeRunner(onnx_path, optimize=False), [c["feed"] for c in cases])
    for got, expected in zip(chained, whole):
        assert np.array_equal(got["sample"], expected["sample"])


def test_each_part_builds_an_engine_with_the_profiles_of_what_it_takes(three_blocks: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    checkpoint, onnx_path = three_blocks
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    settings = load_recipe("a10-fp16").recipe.components["transformer"]
    shapes = qwen_image.profile_shapes(settings.profile, 256, config)
    reports = []
    for part in range(3):
        out = tmp_path / f"part{part}"
        out.mkdir()
        reports.append(BuildEngine("transformer", onnx_path, "tensorrt-rtx", (8, 6), shapes, 0, part=part, parts=3,
                                   block_pattern=PATTERN)(out))
        assert (out / "engine.plan").stat().st_size > 0 and not any(out.glob("*.onnx")), "only the engine is kept"
    contracts = [r["part"] for r in reports]
    assert [c["blocks"] for c in contracts] == [[0, 0], [1, 1], [2, 2]]
    assert 1.0 <= sum(c["weight_share"] for c in contracts) < 1.01, "small constants two parts read count twice"
    stream = next(i for i in contracts[1]["inputs"] if i["from"] == "an earlier part" and i["shape"][1] == "img_tokens")
    assert stream["profile"]["max"][:2] == list(shapes["hidden_states"][2][:2]), "the profile's own batch and tokens"
    assert {o["name"] for o in contracts[0]["outputs"]} >= {i["name"] for i in contracts[1]["inputs"]
                                                              if i["from"] == "an earlier part"} - \
        {o["name"] for o in contracts[1]["outputs"]}


def test_bad_part_settings_are_refused_in_one_line_before_work(tmp_path: Path) -> None:
    for override, expected in (
            ({"components.transformer.build.parts": "0"}, "components.transformer.build.parts"),
            ({"components.transformer.build.parts": "many"}, "components.transformer.build.parts"),
            ({"components.transformer.build.parts": "3"}, "3 parts for transformer's 2 blocks; allowed: auto or 1 to 2"),
            ({"components.vae_decoder.build.parts": "2"}, "vae_decoder has no repeated blocks"),
            ({"components.transformer.build.host_memory_gib": "-1"}, "components.transformer.build.host_memory_gib"),
            ({"components.transformer.build.host_memory_gib": "0.5"}, "less than the builder's own")):
        with pytest.raises(ForgeError) as error:
            load_recipe("a10-fp16", override)
        assert expected in str(error.value) and "\n" not in str(error.value), override
    artifacts = tmp_path / "artifacts"
    result = run_doit(["build", "recipe=a10-fp16", "components.transformer.build.parts=3"], artifacts,
                      tmp_path / "db", check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr + result.stdout
    assert "build.parts" in result.stderr + result.stdout and not artifacts.exists(), "nothing written"


WITH_LORA = "components.transformer.lora={max_rank: 64}"  # a10-fp16's LoRA inputs: its validation binds LoRAs


@pytest.fixture(scope="module")
def split_build(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The transformer-only recipe with its engine forced into two parts, in a root of its own that starts with
    copies of the session build's entries up to precision (same keys): only the parts and validation run."""
    root = tmp_path_factory.mktemp("split")
    artifacts, db = root / "artifacts", root / "doit.db"
    copy_entries(built["recipe"], ("checkpoint", "transformer/export", "transformer/surgery", "transformer/precision"),
                 artifacts)
    args = [*SMALL_ARGS, SPLIT, WITH_LORA]
    result = run_doit(args, artifacts, db)
    name = view_name(str(SMALL_RECIPE), overrides=[SPLIT, WITH_LORA])
    return {"artifacts": artifacts, "db": db, "args": args, "view": artifacts / name, "name": name, "log": result}


def test_text_encoder_parts_hand_on_activations_only(built: dict[str, Any], tmp_path: Path) -> None:
    """The text encoder's cut crosses a tensor read only for its shape (the token embedding): the part takes the
    tensor and computes the Shape itself, so no part has shape-tensor inputs; chained, the fp16 parts agree with
    the whole graph up to the fp16 rounding ORT's CPU kernels skip inside one graph."""
    onnx_path = (built["recipe"] / "text_encoder" / "precision" / "model.onnx").resolve()
    model = onnx.load(str(onnx_path), load_external_data=False)
    plans = parts.plan_parts(model, FAMILY.components["text_encoder"].block_pattern, 2)
    declared = {v.name: v.type.tensor_type for v in model.graph.value_info}
    crossing = [name for name in plans[1].inputs if name in declared]
    assert crossing and all(len(declared[n].shape.dim) >= 2 for n in crossing)
    rng = np.random.default_rng(0)
    feed = {"input_ids": rng.integers(0, 1000, (2, 290)), "attention_mask": (np.arange(290) < [[120], [290]]).astype(np.int64)}
    runners = [OnnxRuntimeRunner(parts.write_part(onnx_path, plan, tmp_path, model)[0]) for plan in plans]
    chained = run_all(ChainedRunner(runners, [p.inputs for p in plans], ["hidden_states"], "parts"), [feed])[0]
    whole = run_all(OnnxRuntimeRunner(onnx_path), [feed])[0]
    assert np.allclose(chained["hidden_states"], whole["hidden_states"], rtol=1e-2, atol=1e-2)


def test_split_build_lists_validates_and_prices_its_parts(split_build: dict[str, Any]) -> None:
    name = split_build["name"]
    assert sorted(built_tasks(split_build["log"].stderr)) == [
        f"engine:{name}/transformer/part0", f"engine:{name}/transformer/part1", f"validate:{name}/transformer"]
    manifest = verify_manifest(split_build["view"])
    entry = manifest["components"]["transformer"]
    listed = entry["parts"]
    assert [p["index"] for p in listed] == [0, 1] and [p["blocks"] for p in listed] == [[0, 0], [1, 1]]
    assert [f["path"] for p in listed for f in p["files"]] == [f"transformer/engine-part{n}/engine.plan" for n in (0, 1)]
    handed = {o["name"] for o in listed[0]["outputs"]}
    taken = {i["name"] for i in listed[1]["inputs"] if i["from"] == "an earlier part"}
    assert taken and taken <= handed and listed[1]["outputs"][0]["name"] == "sample"
    assert entry["validation"]["passed"] and entry["validation"]["onnxruntime_run"]["parts"] == 2
    assert sum(p["fit"]["engine_bytes"] for p in listed) == entry["fit"]["engine_bytes"]
    assert sum(p["fit"]["estimated_bytes"] for p in listed) == entry["fit"]["estimated_bytes"]
    for part in listed:
        assert part["fit"]["engine_bytes"] == sum((split_build["view"] / f["path"]).stat().st_size for f in part["files"])
    assert {n for n in entry["profile"] if not is_lora_input(n)} == set(qwen_image.INPUT_NAMES), "the graph inputs"


def test_a_damaged_part_is_rebuilt_alone(split_build: dict[str, Any]) -> None:
    engine = (split_build["view"] / "transformer" / "engine-part1" / "engine.plan").resolve()
    engine.chmod(0o644)
    engine.write_bytes(engine.read_bytes()[:-1000])
    result = run_doit(split_build["args"], split_build["artifacts"], split_build["db"])
    name = split_build["name"]
    assert f"damaged engine:{name}/transformer/part1" in result.stderr
    assert [t for t in built_tasks(result.stderr) if t.startswith("engine:")] == [f"engine:{name}/transformer/part1"]
    verify_manifest(split_build["view"])


def test_profiles_of_handed_tensors_survive_unknown_declared_dims(three_blocks: tuple[Path, Path]) -> None:
    """A pass that re-infers shapes can leave `unk__N` dims on the tensors crossing a cut (seen at release width
    after block-wise AutoCast): their profiles then come from shape inference at the profile's concrete shapes,
    and equal what the symbolic dims give."""
    checkpoint, onnx_path = three_blocks
    model = onnx.load(str(onnx_path), load_external_data=False)
    config = json.loads((checkpoint / "transformer" / "config.json").read_text())
    shapes = qwen_image.profile_shapes(load_recipe("a10-fp16").recipe.components["transformer"].profile, 256, config)
    plan = parts.plan_parts(model, PATTERN, 2)[1]
    expected = parts.input_profiles(model, plan, shapes)
    handed = [name for name in plan.inputs if name not in shapes]
    forget_symbolic_dims(model, handed)
    assert parts.input_profiles(model, plan, shapes) == expected
