"""LoRA at run time on the session's a10-fp16 build (its transformer has LoRA inputs of rank 64): parity with
diffusers + PEFT for every key layout, zero padding, `s = 0` as the LoRA-free graph bit for bit, LoRAs swapped in
one process and across commands without any engine task, the Lightning recipe, and the refusals."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages.errors import ForgeError
from tests.conftest import built_tasks, executed_tasks, run_doit

RANK = 64  # recipes/a10-fp16.yaml components.transformer.lora.max_rank
SCALE = 0.7


@pytest.fixture(scope="module")
def setup(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    import onnx

    from stages.families.qwen_image import lora, transformer
    from stages.families.qwen_image.lora_targets import DEFAULT_TARGETS
    from stages.graphs.lora import graph_branches

    view = built["recipe"]
    folder = tmp_path_factory.mktemp("lora")
    model = transformer.load(view / "checkpoint")
    graph = view / "transformer" / "precision" / "model.onnx"
    declared = onnx.load(str(graph), load_external_data=False).graph.input
    rank, branches = graph_branches((v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in declared)
    shapes = lora.linear_shapes(model, DEFAULT_TARGETS)
    files = {
        "peft": lora.write_synthetic(folder / "peft.safetensors", shapes, RANK, 1, "peft", alpha=16.0, magnitude=0.4),
        "kohya": lora.write_synthetic(folder / "kohya.safetensors", shapes, 8, 2, "kohya", alpha=4.0, magnitude=0.4),
        "lightning": lora.write_synthetic(folder / "lightning.safetensors", shapes, RANK, 3, "lightning", alpha=8.0,
                                          magnitude=0.4),
        "no_alpha": lora.write_synthetic(folder / "no_alpha.safetensors", shapes, 4, 4, "peft", magnitude=0.4),
    }

    class Settings:
        sizes, timesteps, batch, text_tokens, seed = [[256, 256]], [0.6], 2, [37, 180], 5

    case = transformer.validation_cases(model, Settings, 256)[0]
    return {"view": view, "folder": folder, "model": model, "graph": graph, "rank": rank, "branches": branches,
            "shapes": shapes, "files": files, "case": case, "built": built,
            "pruned": set(shapes) - {b.module for b in branches}}


def run_graph(path: Path, feed: dict[str, Any], optimize: bool = True) -> np.ndarray:
    from stages.graphs.runners import OnnxRuntimeRunner

    with OnnxRuntimeRunner(path, optimize=optimize) as runner:
        return runner.infer(feed)["sample"]


def relative_error(reference: np.ndarray, value: np.ndarray) -> float:
    return float(np.abs(reference - value).max() / np.abs(reference).max())


@pytest.mark.parametrize("layouts", [("peft",), ("kohya",), ("lightning",), ("no_alpha",), ("kohya", "no_alpha")])
def test_bound_loras_match_diffusers_and_peft(setup: dict[str, Any], layouts: tuple[str, ...]) -> None:
    """Every key layout diffusers' loader converts, full rank and zero-padded lower ranks, one LoRA or two summed,
    at a scale other than 1: the engine's graph against the fp32 model with PEFT loading the same files."""
    from stages.families.qwen_image import lora, transformer

    pairs = [(setup["files"][name], SCALE if i == 0 else 0.4) for i, name in enumerate(layouts)]
    feed = lora.bind([(lora.read_lora(p), s) for p, s in pairs], setup["branches"], setup["rank"], setup["pruned"])
    graph = run_graph(setup["graph"], {**setup["case"]["feed"], **feed})
    base = transformer.reference_outputs(setup["model"], setup["case"])["sample"]
    reference = transformer.reference_outputs(lora.apply_with_peft(copy.deepcopy(setup["model"]), pairs),
                                              setup["case"])["sample"]
    effect = relative_error(reference, base)
    error = relative_error(reference, graph)
    assert effect > 0.02, "the LoRA must change the output for this comparison to mean anything"
    assert error < 0.01 and error < effect / 5, (error, effect)


def test_zero_scale_is_the_lora_free_graph_bit_for_bit(setup: dict[str, Any], tmp_path: Path) -> None:
    """Unbound LoRA inputs (s = 0, what every caller without a LoRA gets) compute exactly the graph built without
    LoRA branches, same export and precision plan (ONNX Runtime, graph rewrites off)."""
    from stages.families.qwen_image import lora
    from stages.precision import ConvertPrecision
    from stages.surgery import GraphSurgery

    view = setup["view"]
    surgery = GraphSurgery("transformer", view / "transformer" / "export" / "model.onnx",
                           ("fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup"), 256)
    (tmp_path / "surgery").mkdir()
    (tmp_path / "precision").mkdir()
    report = surgery(tmp_path / "surgery")
    assert report["lora"] is None
    ConvertPrecision("transformer", tmp_path / "surgery" / "model.onnx", "fp16", "fp32", tuple(report["frozen_nodes"]),
                     (), frozen_storage="bf16")(tmp_path / "precision")
    plain = run_graph(tmp_path / "precision" / "model.onnx", setup["case"]["feed"], optimize=False)
    unbound = run_graph(setup["graph"], setup["case"]["feed"], optimize=False)
    assert np.array_equal(plain, unbound)
    zero = lora.bind([(lora.read_lora(setup["files"]["peft"]), 0.0)], setup["branches"], setup["rank"], setup["pruned"])
    assert np.array_equal(plain, run_graph(setup["graph"], {**setup["case"]["feed"], **zero}, optimize=False))


def test_validation_binds_a_full_and_a_lower_rank_lora(setup: dict[str, Any]) -> None:
    manifest = json.loads((setup["view"] / "manifest.json").read_text())
    entry = manifest["components"]["transformer"]["lora"]
    assert entry["max_rank"] == RANK and entry["branches"] == len(setup["branches"]) and entry["targets"]
    validation = entry["validation"]
    assert [f["rank"] for f in validation["files"]] == [RANK, RANK // 4] and validation["scale"] == 0.8
    cases = manifest["components"]["transformer"]["validation"]["cases"]
    assert all(case in cases for case in validation["cases"])
    assert manifest["components"]["transformer"]["validation"]["passed"]


def test_block_wise_validation_binds_the_loras_block_by_block(setup: dict[str, Any], tmp_path: Path) -> None:
    """The release-size path (one block's weights in memory at a time): diffusers + PEFT inject the LoRAs into the
    meta model and each block's LoRA weights are read with its base weights. That reference is PEFT on the whole
    model exactly, and the LoRA graph's chained block segments pass against it with both LoRAs bound."""
    from stages.families.qwen_image import transformer
    from stages.recipe.load import load_recipe
    from stages.validate import ValidateAgainstPytorch

    checkpoint = setup["view"] / "checkpoint"
    case = {**setup["case"], "loras": [(setup["files"]["kohya"], SCALE), (setup["files"]["peft"], 0.4)]}
    blocks, final = transformer.blockwise_reference(checkpoint, case)
    whole = transformer.reference_outputs(setup["model"], case)["sample"]
    assert np.array_equal(final["sample"], whole) and len(blocks) == setup["model"].config.num_layers
    assert relative_error(whole, transformer.reference_outputs(setup["model"], setup["case"])["sample"]) > 0.02

    loaded = load_recipe("a10-fp16", {"components.transformer.validate.max_cases": "1"})
    section = loaded.recipe.components["transformer"]
    report = ValidateAgainstPytorch(
        component="transformer", checkpoint_dir=checkpoint, onnx_path=setup["graph"], engine_paths=(Path("unused.plan"),),
        compute_capability=(8, 6), backend="tensorrt-rtx", settings=section.validate_, text_length=256, blockwise=True,
        lora=section.lora, lora_targets=loaded.lora_targets("transformer"))(tmp_path)
    assert report["passed"] and report["blockwise"] and "block by block" in report["lora"]["reference"]
    assert len(report["cases"]) == 3 and report["cases"][1:] == report["lora"]["cases"]
    assert [f["rank"] for f in report["lora"]["files"]] == [RANK, RANK // 4]
    assert [b["block"] for b in report["blocks"]] == list(range(setup["model"].config.num_layers))


def test_loras_swap_in_one_process_and_across_commands_without_a_rebuild(setup: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    from stages.runtime import EnginePipeline

    call = {"prompt": "a red lighthouse", "negative_prompt": " ", "height": 512, "width": 512,
            "num_inference_steps": 2, "true_cfg_scale": 4.0}
    images = {}
    with EnginePipeline.from_manifest(setup["view"] / "manifest.json", warm_up=False) as pipe:
        for name, lora in (("base", None), ("peft", [(setup["files"]["peft"], SCALE)]),
                           ("kohya", f"{setup['files']['kohya']}:{SCALE}"), ("again", None)):
            image = pipe(**call, lora=lora, generator=torch.Generator().manual_seed(0)).images[0]
            images[name] = np.asarray(image.convert("RGB"))
            assert (pipe.loras == []) == (lora is None)
    assert np.array_equal(images["base"], images["again"]), "unbinding gives the base model back exactly"
    assert not np.array_equal(images["peft"], images["base"]) and not np.array_equal(images["kohya"], images["peft"])
    built, out = setup["built"], tmp_path / "out"
    result = run_doit(["generate", "recipe=a10-fp16", "prompt=a red lighthouse", "height=512", "width=512", "steps=1",
                       f"lora={setup['files']['lightning']}:{SCALE}", f"out={out}"], built["artifacts"], built["db"])
    assert not built_tasks(result.stderr) and executed_tasks(result.stdout) == ["generate"], result.stdout
    bound = json.loads(Image.open(next(out.glob("*.png"))).text["lora"])
    assert [(b["file"], b["scale"], b["rank"]) for b in bound] == [("lightning.safetensors", SCALE, RANK)]
    assert bound[0]["sha256"] == hashlib.sha256(setup["files"]["lightning"].read_bytes()).hexdigest()


def test_the_lightning_recipe_shares_the_engines_and_checks_eight_uncfg_steps(setup: dict[str, Any]) -> None:
    built = setup["built"]
    refused = run_doit(["build", "recipe=a10-fp16-lightning"], built["artifacts"], built["db"], check=False)
    assert refused.returncode == 2 and "sampling.lora: required: give lora=FILE" in refused.stderr
    result = run_doit(["build", "recipe=a10-fp16-lightning", f"lora={setup['files']['lightning']}", "-n", "2"],
                      built["artifacts"], built["db"])
    assert [t.split(":")[0] for t in built_tasks(result.stderr)] == ["pipeline_check"], result.stderr[-3000:]
    check = json.loads((built["artifacts"] / "a10-fp16-lightning" / "manifest.json").read_text())["pipeline_check"]
    settings = check["settings"]
    assert check["passed"] and settings["true_cfg_scale"] == 1.0 and settings["num_inference_steps"] == 8
    assert [item["file"] for item in check["lora"]] == ["lightning.safetensors"]
    assert all(p["runs"]["onnxruntime"]["transformer_calls"] == 8 for p in check["prompts"])
    assert check["scheduler"]["recipe_overrides"]["time_shift_type"] == "exponential"


def lora_file(folder: Path, name: str, shapes: dict[str, tuple[int, int]], rank: int, **kwargs: Any) -> Path:
    from stages.families.qwen_image import lora

    return lora.write_synthetic(folder / f"{name}.safetensors", shapes, rank, 9, **kwargs)


def test_loras_the_engine_cannot_take_are_refused_in_one_line(setup: dict[str, Any], tmp_path: Path) -> None:
    from stages.families.qwen_image import lora
    from stages.recipe.load import load_recipe
    from stages.recipe.loras import parse_lora

    shapes, settings = setup["shapes"], load_recipe("a10-fp16").recipe.components["transformer"].lora
    too_big = lora_file(tmp_path, "rank80", shapes, 80)
    with pytest.raises(ForgeError, match=r"rank80.safetensors: .*lora_A.weight: rank 80 is above the engine's 64 "
                                         r"\(components.transformer.lora.max_rank\); allowed: rank 1..64"):
        parse_lora(str(too_big), settings)
    pickle = tmp_path / "style.pt"
    pickle.write_bytes(b"\x80\x04not a safetensors file")
    with pytest.raises(ForgeError, match=r"style.pt: lora: '.pt' files are not read; allowed: .safetensors"):
        parse_lora(f"{pickle}:0.5", settings)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(ForgeError, match=r"garbage.safetensors: lora: not a safetensors file"):
        parse_lora(str(garbage), settings)
    with pytest.raises(ForgeError, match=r"scale 'x' is not a number"):
        parse_lora(f"{setup['files']['peft']}:x", settings)
    mod = lora_file(tmp_path, "mod", {"transformer_blocks.0.img_mod.1": (48, 288)}, 4)
    wide = lora_file(tmp_path, "wide", {m: (i * 2, o) for m, (i, o) in shapes.items()}, 4)
    big = [(lora.read_lora(setup["files"]["peft"]), 1.0), (lora.read_lora(setup["files"]["kohya"]), 1.0)]
    cases = [
        ([(lora.read_lora(mod), 1.0)], r"mod.safetensors: transformer.transformer_blocks.0.img_mod.1: the engine has "
                                       r"no LoRA branch .*components.transformer.lora.targets"),
        ([(lora.read_lora(wide), 1.0)], r"wide.safetensors: transformer.transformer_blocks.0.attn.\w+: lora_A \[4, "
                                        r"96\] .* allowed lora_A \[r, 48\]"),
        (big, r"peft.safetensors \(rank 64\) \+ kohya.safetensors \(rank 8\) = rank 72 together, above the engine's 64"),
    ]
    for pairs, message in cases:
        with pytest.raises(ForgeError) as refused:
            lora.bind(pairs, setup["branches"], setup["rank"], setup["pruned"])
        assert re.search(message, str(refused.value)) and "\n" not in str(refused.value), str(refused.value)
    built, out = setup["built"], tmp_path / "out"
    for bad in (str(too_big), f"{setup['files']['peft']},{setup['files']['lightning']}", str(pickle)):
        result = run_doit(["generate", "recipe=a10-fp16", "prompt=x", "height=512", "width=512", f"lora={bad}",
                           f"out={out}"], built["artifacts"], built["db"], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode != 0 and lines[-1].count("error") <= 1 and not out.exists(), result.stderr
    quantized = run_doit(["generate", "recipe=a10-int8", "prompt=x", f"lora={setup['files']['peft']}"],
                         built["artifacts"], built["db"], check=False)
    assert quantized.returncode == 2 and "has no LoRA inputs" in quantized.stderr
