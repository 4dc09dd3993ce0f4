"""End-to-end pipeline check on the tiny model: real exports of all three components, the stock denoising loop.

The graphs come from the real export stage (`ExportOnnx`): the session build's, of its tiny diffusers-layout checkpoint. References are
computed here independently of the check: the stock `QwenImagePipeline` run by the test itself, and PSNR/SSIM
recomputed from the saved PNGs. A transformer exported from another seed's weights must fail the thresholds.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from stages.errors import ForgeError
from stages.export import ExportOnnx
from stages.families.qwen_image import transformer as qwen_image
from stages.families.qwen_image.pipeline import initial_latents, load_pipeline
from stages.graphs.runners import check_static_shape
from stages.language import prompt_language
from stages.pipeline_check import (DEFAULT_PROMPTS, PipelineCheck, PipelineCheckSettings, Thresholds, image_metrics,
                                   step_cosines, threshold_failures)
from stages.recipe.prompts import check_settings

TEXT_LENGTH = 256  # a10-fp16's
SIZE = 128
STEPS = 2
COMPONENTS = ("text_encoder", "transformer", "vae_decoder")
TIGHT = Thresholds(min_step_cosine=0.99999, min_psnr=50.0, min_ssim=0.999)
SETTINGS = PipelineCheckSettings(thresholds=TIGHT, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                                 true_cfg_scale=4.0, seed=3)


def export(component: str, checkpoint: Path, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True)
    ExportOnnx(component, checkpoint, TEXT_LENGTH, 20)(out_dir)
    return out_dir / "model.onnx"


@pytest.fixture(scope="module")
def build(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The session build's seed-0 checkpoint and its three exported graphs (the export stage's own outputs, at the
    recipe's text length), plus a transformer graph exported here from seed-1 weights."""
    root = tmp_path_factory.mktemp("pipeline_check")
    checkpoint = built["recipe"] / "checkpoint"
    onnx = {component: built["recipe"] / component / "export" / "model.onnx" for component in COMPONENTS}
    assert json.loads((built["recipe"] / "manifest.json").read_text())["recipe"]["resolved"]["text_length"] == TEXT_LENGTH
    other = root / "seed1"
    qwen_image.make_tiny_transformer(1).save_pretrained(other / "transformer", safe_serialization=True)
    wrong = export("transformer", other, root / "wrong_transformer")
    return {"checkpoint": checkpoint, "onnx": onnx, "wrong_transformer": wrong}


@pytest.fixture(scope="module")
def good(build: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    out = tmp_path_factory.mktemp("good_check")
    engines = {component: out / "absent.plan" for component in COMPONENTS}  # only opened where a GPU can run them
    check = PipelineCheck(build["checkpoint"], build["onnx"], TEXT_LENGTH, SETTINGS, engines, (8, 6), "tensorrt-rtx")
    return check(out), out


def halves(path: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.asarray(Image.open(path).convert("RGB"))
    width = pixels.shape[1] // 2
    return pixels[:, :width], pixels[:, width:]


def test_fp32_graphs_reproduce_pytorch_over_the_whole_loop(good: tuple[dict[str, Any], Path]) -> None:
    report, _ = good
    assert report["passed"] and "failure" not in report
    assert report["runner"] == "onnxruntime" and report["runners"] == ["onnxruntime"]
    assert report["components"]["onnxruntime"] == dict.fromkeys(COMPONENTS, "onnxruntime")
    assert report["engine"]["ran"] is False and "no CUDA GPU" in report["engine"]["skipped_because"]
    assert report["scheduler"]["matches_released"] is True
    assert report["truncated_prompts"] == 0 and report["truncated_tokens"] == {}
    assert [p["language"] for p in report["prompts"]] == ["en", "en", "zh", "zh"]
    for prompt in report["prompts"]:
        run = prompt["runs"]["onnxruntime"]
        assert len(run["step_cosine"]) == STEPS and run["min_step_cosine"] > 0.99999
        assert run["identical"] or run["psnr_db"] > 60
        assert run["ssim"] > 0.999 and run["max_pixel_diff"] <= 2
        assert run["transformer_calls"] == STEPS  # CFG: both branches as one batch-2 call per step
        assert run["passed"] and run["failures"] == []


def test_reference_panel_is_the_stock_pipeline_and_metrics_match_the_pngs(
    build: dict[str, Any], good: tuple[dict[str, Any], Path]
) -> None:
    report, out = good
    pipeline = load_pipeline(build["checkpoint"])
    pipeline.set_progress_bar_config(disable=True)
    latents = initial_latents(pipeline, SIZE, SIZE, SETTINGS.seed)
    expected = torch.randn(1, 1, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(SETTINGS.seed))
    assert torch.equal(latents, pipeline._pack_latents(expected, 1, 4, SIZE // 8, SIZE // 8))
    image = pipeline(prompt=DEFAULT_PROMPTS[2], negative_prompt=" ", true_cfg_scale=4.0, height=SIZE, width=SIZE,
                     num_inference_steps=STEPS, latents=latents, max_sequence_length=TEXT_LENGTH).images[0]
    reference, graphs = halves(out / report["prompts"][2]["image"])
    np.testing.assert_array_equal(reference, np.asarray(image))
    from skimage.metrics import structural_similarity

    run = report["prompts"][2]["runs"]["onnxruntime"]
    assert structural_similarity(reference, graphs, channel_axis=-1, data_range=255) == pytest.approx(run["ssim"])
    assert int(np.abs(reference.astype(int) - graphs.astype(int)).max()) == run["max_pixel_diff"]


def test_side_by_side_pngs_and_metrics_file(good: tuple[dict[str, Any], Path]) -> None:
    report, out = good
    assert report["images"] == [f"{index}.png" for index in range(len(DEFAULT_PROMPTS))]
    for prompt in report["prompts"]:
        with Image.open(out / prompt["image"]) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (2 * SIZE, SIZE)
        assert prompt["panels"] == ["pytorch-fp32", "onnxruntime"]
        left, right = halves(out / prompt["image"])
        assert left.std() > 0  # a real picture, not a blank canvas
    metrics = json.loads((out / report["metrics_file"]).read_text())
    saved, reported = metrics["prompts"][0]["runs"]["onnxruntime"], report["prompts"][0]["runs"]["onnxruntime"]
    assert saved["step_cosine"] == reported["step_cosine"] and saved["ssim"] == reported["ssim"]
    assert metrics["prompts"][3]["prompt"] == DEFAULT_PROMPTS[3]


def test_transformer_from_other_weights_fails_naming_the_metric(build: dict[str, Any], tmp_path: Path) -> None:
    onnx = {**build["onnx"], "transformer": build["wrong_transformer"]}
    report = PipelineCheck(build["checkpoint"], onnx, TEXT_LENGTH, SETTINGS)(tmp_path)
    assert report["passed"] is False
    worst = min(p["runs"]["onnxruntime"]["min_step_cosine"] for p in report["prompts"])
    assert worst < TIGHT.min_step_cosine
    assert "prompt 0" in report["failure"] and "onnxruntime" in report["failure"]
    assert f"< min_step_cosine {TIGHT.min_step_cosine:g}" in report["failure"]
    assert "< min_psnr 50" in report["failure"] or "< min_ssim 0.999" in report["failure"]
    assert all(not p["runs"]["onnxruntime"]["passed"] for p in report["prompts"])
    assert len(list(tmp_path.glob("*.png"))) == len(DEFAULT_PROMPTS)


def test_transformer_adapter_is_transparent_to_the_pipeline_call(build: dict[str, Any]) -> None:
    """The adapter over the PyTorch fallback run gives the stock module's output for the pipeline's call shape."""
    from stages.families.qwen_image.pipeline import TransformerRunAdapter, component_config, torch_component_run

    adapter = TransformerRunAdapter(torch_component_run("transformer", build["checkpoint"]),
                                    component_config(build["checkpoint"], "transformer"))
    stock = qwen_image.load(build["checkpoint"])
    generator = torch.Generator().manual_seed(0)
    call = {"hidden_states": torch.randn(1, 16, 16, generator=generator), "timestep": torch.tensor([0.7]),
            "guidance": None, "encoder_hidden_states_mask": None,
            "encoder_hidden_states": torch.randn(1, 9, 16, generator=generator),
            "img_shapes": [[(1, 4, 4)]], "attention_kwargs": {}, "return_dict": False}
    with adapter.cache_context("cond"), torch.no_grad():
        (sample,) = adapter(**call)
        expected = stock(**call)[0]
    torch.testing.assert_close(sample, expected, rtol=0, atol=0)
    assert adapter.config.in_channels == 16 and adapter.config.guidance_embeds is False and adapter.calls == 1
    with pytest.raises(TypeError, match="unexpected arguments \\['controlnet_block_samples'\\]"):
        adapter(**call, controlnet_block_samples=None)


def test_metric_helpers_against_hand_computed_values() -> None:
    a, b = np.array([1.0, 0.0]), np.array([1.0, 1.0])
    assert step_cosines([a, a], [a, b]) == pytest.approx([1.0, 1 / np.sqrt(2)])
    with pytest.raises(ValueError, match="steps"):
        step_cosines([a], [a, a])
    image = np.full((16, 16, 3), 100, np.uint8)
    noisy = image.copy()
    noisy[0, 0, 0] = 110  # MSE = 100 / 768 -> PSNR = 10 log10(255^2 * 768 / 100)
    metrics = image_metrics(image, noisy)
    assert metrics["psnr_db"] == pytest.approx(10 * np.log10(255**2 * 768 / 100))
    assert metrics["max_pixel_diff"] == 10 and not metrics["identical"]
    same = image_metrics(image, image)
    assert same["psnr_db"] is None and same["identical"] and same["ssim"] == pytest.approx(1.0)
    nan = {"min_step_cosine": float("nan"), "identical": True, "psnr_db": None, "ssim": 1.0}
    assert threshold_failures(nan, TIGHT) == ["min step latent cosine nan < min_step_cosine 0.99999"]


def test_settings_are_checked_before_any_model_loads(tmp_path: Path) -> None:
    assert [prompt_language(p) for p in DEFAULT_PROMPTS] == ["en", "en", "zh", "zh"]
    check_settings(SETTINGS, TEXT_LENGTH)
    bad = {
        "prompts": (replace(SETTINGS, prompts=DEFAULT_PROMPTS[:3]), "at least two Chinese"),
        "true_cfg_scale": (replace(SETTINGS, true_cfg_scale=0.5), "CFG"),
        "height": (replace(SETTINGS, height=120), "multiple of 16"),
    }
    for key, (settings, message) in bad.items():
        with pytest.raises(ForgeError, match=f"^pipeline_check.{key}: .*{message}"):
            check_settings(settings, TEXT_LENGTH)
    plain = replace(SETTINGS, prompts=("a red car", "a blue boat", "一只猫", "一条狗"))
    with pytest.raises(ForgeError, match="^recipes/x.yaml: pipeline_check.prompts: .*rendered text"):
        check_settings(plain, TEXT_LENGTH, source="recipes/x.yaml")
    with pytest.raises(ForgeError, match="onnx_paths: unknown components \\['unet'\\]; allowed: text_encoder"):
        PipelineCheck(tmp_path, {"unet": tmp_path / "x.onnx"}, TEXT_LENGTH, SETTINGS)(tmp_path)
    with pytest.raises(ForgeError, match="built graph not found"):
        PipelineCheck(tmp_path, {"transformer": tmp_path / "x.onnx"}, TEXT_LENGTH, SETTINGS)(tmp_path)
    with pytest.raises(ForgeError, match=r"model.onnx: input_ids: the graph declares shape \['batch', 98\], the feed has \[1, 66\]"):
        check_static_shape(Path("model.onnx"), "input_ids", ["batch", 98], (1, 66))
    check_static_shape(Path("model.onnx"), "input_ids", ["batch", 98], (2, 98))


def test_from_recipe_without_a_section_names_the_key(tmp_path: Path) -> None:
    from stages.inputs import StageInputs
    from stages.pipeline_check import from_recipe
    from stages.recipe.load import load_recipe

    loaded = load_recipe("a10-fp16", {"pipeline_check": "null"})
    with pytest.raises(ForgeError, match="a10-fp16.yaml: pipeline_check: the recipe has no pipeline_check section"):
        from_recipe(loaded, None, StageInputs(tmp_path, {}, tmp_path))


def test_from_recipe_points_at_the_built_graphs(tmp_path: Path) -> None:
    """Components the recipe builds run on their precision-stage ONNX (from the store); the others stay PyTorch."""
    from stages.inputs import StageInputs
    from stages.pipeline_check import from_recipe
    from stages.recipe.load import load_recipe
    from stages.plan.registry import Ref

    loaded = load_recipe("a10-fp16", {"components.text_encoder": "null", "components.vae_decoder": "null"})
    dirs = {Ref("precision", "transformer"): tmp_path / "p", Ref("engine", "transformer"): tmp_path / "e"}
    check = from_recipe(loaded, None, StageInputs(tmp_path / "ckpt", dirs, tmp_path))
    assert check.onnx_paths == {"transformer": tmp_path / "p" / "model.onnx"}
    assert check.engine_paths == {"transformer": (tmp_path / "e" / "engine.plan",)}
    assert check.checkpoint_dir == tmp_path / "ckpt" and check.display_root == tmp_path
    assert (check.text_length, check.compute_capability) == (256, (8, 6))
    assert check.settings == loaded.recipe.pipeline_check
