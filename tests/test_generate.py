"""`doit generate` and `EnginePipeline`: the session's a10-fp16 build (as shipped) making images.

One command run writes two prompts' images (the pipeline check's first prompt at its own settings, and a Chinese
one); the API, the pipeline check's built-graph panel and diffusers' own QwenImagePipeline are compared with it.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages.errors import ForgeError
from tests.conftest import run_doit

CHECK = {"height": 512, "width": 512, "steps": 8, "cfg": 4.0, "seed": 0}  # recipes/a10-fp16.yaml pipeline_check
SECOND = "一只橘猫坐在窗台上，窗外是下雪的城市夜景。"
LONG = " ".join(["a very long prompt about a lighthouse"] * 60)  # ~480 tokens: more than text_length 256


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def generated(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    manifest = json.loads((built["recipe"] / "manifest.json").read_text())
    first = manifest["pipeline_check"]["prompts"][0]["prompt"]
    folder = tmp_path_factory.mktemp("generate")
    prompts = folder / "prompts.txt"
    prompts.write_text(f"{first}\n\n{SECOND}\n{LONG}\n", encoding="utf-8")
    out = folder / "out"
    result = run_doit(["generate", "recipe=a10-fp16", f"prompts={prompts}", "negative_prompt= ",
                       *(f"{key}={value}" for key, value in CHECK.items()), f"out={out}"], built["artifacts"], built["db"])
    return {"out": out, "result": result, "first": first, "manifest": manifest, "built": built,
            "files": sorted(out.glob("*.png"))}


def test_command_writes_one_png_per_prompt_with_its_provenance(generated: dict[str, Any]) -> None:
    files, built = generated["files"], generated["built"]
    assert [f.name for f in files] == ["0000-seed0-0.png", "0001-seed0-0.png", "0002-seed0-0.png"]
    manifest_bytes = (built["recipe"] / "manifest.json").read_bytes()
    engines = {c: [f["sha256"] for f in entry["artifacts"]["engine"] if f["path"].endswith(".plan")]
               for c, entry in generated["manifest"]["components"].items()}
    for path, prompt in zip(files, (generated["first"], SECOND)):
        text = Image.open(path).text
        assert text["manifest_sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
        assert json.loads(text["engines_sha256"]) == engines
        assert text["prompt"] == prompt and text["seed"] == "0" and text["size"] == "512x512"
        assert text["steps"] == "8" and text["true_cfg_scale"] == "4" and text["recipe"] == "a10-fp16"
        assert text["runner"].startswith("onnxruntime on the engines' exact ONNX")
        assert len(json.loads(text["timings"])["steps_s"]) == 8
    stderr = generated["result"].stderr
    assert "3 images in" in stderr and "images/s" in stderr and "prompt 3/3" in stderr and "onnxruntime" in stderr


def test_command_gives_the_pipeline_checks_built_image_bit_for_bit(generated: dict[str, Any]) -> None:
    panel = pixels(generated["built"]["recipe"] / "pipeline_check" / "0.png")
    built_side = panel[:, panel.shape[1] // 2:]
    assert np.array_equal(pixels(generated["files"][0]), built_side)


def test_api_agrees_with_the_command_and_diffusers(generated: dict[str, Any]) -> None:
    from stages.families.qwen_image.pipeline import load_pipeline
    from stages.pipeline_check import image_metrics
    from stages.runtime import EnginePipeline

    built = generated["built"]
    call = {"prompt": generated["first"], "negative_prompt": " ", "height": 512, "width": 512,
            "num_inference_steps": 8, "true_cfg_scale": 4.0}
    with EnginePipeline.from_manifest(built["recipe"] / "manifest.json") as pipe:
        image = pipe(**call, generator=torch.Generator().manual_seed(0)).images[0]
        assert pipe.timings["transformer_calls"] == 8, "CFG's two branches as one batch-2 call per step"
    api = np.asarray(image.convert("RGB"))
    assert np.array_equal(api, pixels(generated["files"][0]))
    reference = load_pipeline(built["recipe"] / "checkpoint")
    reference.set_progress_bar_config(disable=True)
    stock = reference(**call, generator=torch.Generator().manual_seed(0), max_sequence_length=256).images[0]
    metrics = image_metrics(np.asarray(stock.convert("RGB")), api)
    threshold = generated["manifest"]["pipeline_check"]["thresholds"]["min_psnr"]
    assert metrics["identical"] or metrics["psnr_db"] > threshold, metrics


def test_a_damaged_engine_or_a_missing_gpu_is_refused_in_one_line(generated: dict[str, Any], tmp_path: Path) -> None:
    from stages.runtime import EnginePipeline

    view = tmp_path / "view"
    shutil.copytree(generated["built"]["recipe"], view, symlinks=False)
    with pytest.raises(ForgeError, match=r"runner=onnxruntime") as refused:
        EnginePipeline.from_manifest(view, runner="engine")
    assert "\n" not in str(refused.value)
    engine = view / "transformer" / "engine" / "engine.plan"
    data = bytearray(engine.read_bytes())
    data[len(data) // 2] ^= 0xFF
    engine.write_bytes(bytes(data))
    with pytest.raises(ForgeError, match=r"engine\.plan: sha256: does not match the manifest") as damaged:
        EnginePipeline.from_manifest(view)
    assert "\n" not in str(damaged.value)


@pytest.mark.parametrize(("variables", "message"), [
    ({"prompt": "x", "height": "2048"}, r"command line: height/width: 2048x1328 is outside the a10-fp16 transformer "
                                        r"engine's profile \(height 512-1664, width 512-1664, area up to 1328x1328\); "
                                        r"allowed: .*components.transformer.profile"),
    ({"prompt": "x", "height": "1664", "width": "1664"}, r"1664x1664 is outside .* area up to 1328x1328"),
    ({"prompt": "x", "height": "520"}, r"height: 520x1328: both sides must be multiples of 16"),
    ({"prompt": "x", "batch": "3"}, r"batch: 3 is above the transformer profile's batch max 2 "
                                    r"\(components.transformer.profile.batch.max\); allowed: 1-2"),
    ({"prompt": "x", "batch": "0"}, r"batch: 0; allowed: 1 or more"),
    ({"steps": "2"}, r"prompt: give one of prompt=TEXT or prompts=FILE"),
    ({"prompt": "x", "prompts": "p.txt"}, r"prompt: give one of prompt=TEXT or prompts=FILE"),
    ({"prompt": "x", "steps": "many"}, r"steps: 'many' is not an integer"),
    ({"prompt": "x", "cfg": "nan"}, r"cfg: nan; allowed: a finite number >= 0"),
    ({"prompt": "x", "runner": "gpu"}, r"runner: 'gpu'; allowed: auto, engine, onnxruntime"),
    ({"prompt": "x", "truncate": "yes"}, r"truncate: 'yes'; allowed: 1 .* or 0"),
    ({"prompts": "/nonexistent/prompts.txt"}, r"prompts.txt: prompts: cannot be read"),
])
def test_bad_generate_variables_name_the_variable_and_what_is_allowed(variables: dict[str, str], message: str,
                                                                     tmp_path: Path) -> None:
    from stages.recipe.load import load_recipe
    from stages.runtime.request import parse_request

    with pytest.raises(ForgeError) as refused:
        parse_request(variables, load_recipe("a10-fp16"), tmp_path)
    assert re.search(message, str(refused.value)) and "\n" not in str(refused.value), str(refused.value)


def test_bad_generate_input_is_one_line_before_any_work(built: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "out"
    for arguments in (["prompt=x", "height=2048"], ["prompt=x", "recipe=nope"]):
        result = run_doit(["generate", *arguments, f"out={out}"], built["artifacts"], built["db"], check=False)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
        assert not out.exists() and ".  " not in result.stdout
    refused = run_doit(["build", "prompt=a cat"], built["artifacts"], built["db"], check=False)
    assert refused.returncode == 2 and "prompt: is a doit generate variable" in refused.stderr


def test_a_prompt_longer_than_the_engines_text_is_cut_or_refused(generated: dict[str, Any], tmp_path: Path) -> None:
    cut = Image.open(generated["files"][2]).text
    assert cut["prompt"] == LONG and int(cut["truncated_tokens"]) > 0
    assert "prompt 3: " in generated["result"].stderr and "cut to the engines' text_length 256" in generated["result"].stderr
    out, built = tmp_path / "out", generated["built"]
    refused = run_doit(["generate", f"prompt={LONG}", "truncate=0", "steps=2", "height=512", "width=512",
                        f"out={out}"], built["artifacts"], built["db"], check=False)
    said = refused.stdout + refused.stderr
    assert refused.returncode == 1 and not out.exists()
    assert "generate: command line: prompt: " in said and "tokens, more than the engines' text_length 256; allowed: " \
                                                          "at most 256 tokens, or truncate=1" in said
