from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from stages.calibration import CaptureCalibration, load_feeds
from stages.errors import ForgeError
from stages.families.qwen_image import tokenizer as qwen_tokenizer
from stages.plan.registry import STAGES
from stages.recipe.load import load_recipe
from stages.recipe.schema import CalibrationSettings

PROMPTS = ['A shop sign reading "OPEN"', "一只猫坐在窗台上"]


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS, allow_unicode=True))
    return path


def settings(prompts: Path, **changes: object) -> CalibrationSettings:
    values = {"prompts": str(prompts), "sizes": [[256, 256]], "num_inference_steps": 3, "steps": [0, 2],
              "samples": 100, "true_cfg_scale": 4.0}
    return CalibrationSettings(**{**values, **changes})


def test_transformer_inputs_are_captured_per_prompt_step_and_cfg_branch(
        tiny_checkpoint: Path, prompts_file: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    report = CaptureCalibration("transformer", tiny_checkpoint, chosen, 64)(tmp_path)
    feeds = load_feeds(tmp_path)
    assert report["samples"] == len(feeds) == len(PROMPTS) * 2 * 2  # prompts x steps x (cond, uncond)
    timesteps = sorted({float(f["timestep"][0]) for f in feeds}, reverse=True)
    assert len(timesteps) == 2 and 0 < timesteps[1] < timesteps[0] <= 1
    assert {f["hidden_states"].shape for f in feeds} == {(1, 16 * 16, 16)}
    tokenizer = qwen_tokenizer.load_tokenizer(tiny_checkpoint)
    _, mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, PROMPTS, 64)
    expected = set((mask.sum(dim=1) - qwen_tokenizer.PROMPT_TEMPLATE_DROP).tolist())
    assert expected <= {int(f["encoder_hidden_states_mask"].sum()) for f in feeds}
    assert all(f["encoder_hidden_states"].shape == (1, 64, 16) for f in feeds)


def calibration_key_settings(prompts: Path, text_length: int = 256, **changes: object) -> dict:
    """What the calibration task's store key takes from the recipe (see stages.plan.registry)."""
    overrides = {f"components.transformer.precision.calibration.{k}": str(v) for k, v in changes.items()}
    overrides["components.transformer.precision.calibration.prompts"] = str(prompts)
    overrides["text_length"] = str(text_length)
    loaded = load_recipe("l40s-fp8", overrides)
    return STAGES["calibration"].settings(loaded, "transformer")


def test_key_follows_what_determines_the_data(prompts_file: Path) -> None:
    base = calibration_key_settings(prompts_file)
    for changed in ({"samples": 5}, {"steps": "[1]"}, {"sizes": "[[512, 512]]"}, {"num_inference_steps": 4}):
        assert calibration_key_settings(prompts_file, **changed) != base, changed
    assert calibration_key_settings(prompts_file, text_length=255) != base
    copy = prompts_file.with_name("same-prompts.yaml")
    copy.write_bytes(prompts_file.read_bytes())
    assert calibration_key_settings(copy) == base, "the prompt file enters by content, not by path"
    prompts_file.write_text(yaml.safe_dump(PROMPTS + ["one more"], allow_unicode=True))
    assert calibration_key_settings(prompts_file) != base


def test_text_encoder_calibrates_on_tokenized_prompts(tiny_checkpoint: Path, prompts_file: Path,
                                                      tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    CaptureCalibration("text_encoder", tiny_checkpoint, chosen, 64)(tmp_path)
    feeds = load_feeds(tmp_path)
    tokenizer = qwen_tokenizer.load_tokenizer(tiny_checkpoint)
    ids, mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, PROMPTS, 64)
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in feeds]), ids.numpy())
    np.testing.assert_array_equal(np.concatenate([f["attention_mask"] for f in feeds]), mask.numpy())


def test_tampered_calibration_file_is_refused(tiny_checkpoint: Path, prompts_file: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    CaptureCalibration("text_encoder", tiny_checkpoint, chosen, 16)(tmp_path)
    victim = tmp_path / "feed_0000.npz"
    np.savez(victim, input_ids=np.zeros((1, 50), np.int64), attention_mask=np.zeros((1, 50), np.int64))
    with pytest.raises(ForgeError, match="sha256 mismatch"):
        load_feeds(tmp_path)


def reference_capture(checkpoint: Path, prompts: list[str], chosen: CalibrationSettings, text_length: int) -> list[dict]:
    """The transformer's inputs as the stock pipeline, loaded whole, hands them over at every chosen step."""
    import torch

    from stages.families.qwen_image import text_encoder as qwen_text_encoder
    from stages.families.qwen_image import transformer as qwen_image
    from stages.families.qwen_image.pipeline import load_pipeline

    pipeline = load_pipeline(checkpoint)
    tokenizer = qwen_tokenizer.load_tokenizer(checkpoint)
    axes = pipeline.transformer.config.axes_dims_rope
    feeds, state = [], {"step": 0}

    def record(_module: object, _args: object, kwargs: dict) -> None:
        if state["step"] in chosen.steps:
            feeds.append(qwen_image.transformer_engine_inputs(
                kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["encoder_hidden_states_mask"],
                kwargs["timestep"], kwargs["img_shapes"], axes_dims_rope=axes))

    def next_step(_pipe: object, step: int, _t: object, tensors: dict) -> dict:
        state["step"] = step + 1
        return tensors

    pipeline.transformer.register_forward_pre_hook(record, with_kwargs=True)
    negative = qwen_text_encoder.encode_prompts(pipeline.text_encoder, tokenizer, [" "], text_length)
    for height, width in chosen.sizes:
        for index, prompt in enumerate(prompts):
            embeds, mask, _ = qwen_text_encoder.encode_prompts(pipeline.text_encoder, tokenizer, [prompt], text_length)
            state["step"] = 0
            with torch.no_grad():
                pipeline(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative[0],
                         negative_prompt_embeds_mask=negative[1], true_cfg_scale=chosen.true_cfg_scale, height=height,
                         width=width, num_inference_steps=chosen.num_inference_steps, output_type="latent",
                         generator=torch.Generator().manual_seed(chosen.seed + index), callback_on_step_end=next_step)
    return feeds


def test_capture_block_by_block_gives_the_whole_pipelines_feeds(tiny_checkpoint: Path, prompts_file: Path) -> None:
    """Encoding first and freeing the text encoder, and running either model one block at a time (as release-size
    checkpoints do), hands the transformer exactly the inputs the whole stock pipeline hands it."""
    from stages.families.qwen_image.calibration import capture_transformer

    chosen = settings(prompts_file, sizes=[[256, 256], [128, 384]])
    reference = reference_capture(tiny_checkpoint, PROMPTS, chosen, 64)
    assert len(reference) == len(PROMPTS) * 2 * 2 * 2  # prompts x sizes x steps x (cond, uncond)
    for layered in ({}, {"text_encoder": True, "transformer": True}, {"text_encoder": False, "transformer": True}):
        feeds = capture_transformer(tiny_checkpoint, PROMPTS, chosen, 64, layered)
        assert len(feeds) == len(reference), layered
        for got, want in zip(feeds, reference):
            assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want), layered


def test_release_size_capture_runs_block_by_block(tmp_path: Path) -> None:
    """`precision.blockwise: auto` runs the capture's models block by block at the released shapes (sparse
    shards: real headers, no bytes), whole for the tiny model; `false` keeps them whole."""
    import sys

    from stages.calibration import from_recipe
    from stages.inputs import StageInputs

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    from synthetic_checkpoint import generate

    release = tmp_path / "release"
    generate(release, sparse=True)
    inputs = StageInputs(release, {}, tmp_path)
    assert from_recipe(load_recipe("l40s-fp8", model=str(release)), "transformer", inputs).blockwise == \
        {"transformer": True, "text_encoder": True}
    whole = load_recipe("l40s-fp8", {"components.transformer.precision.blockwise": "false"}, model=str(release))
    assert from_recipe(whole, "transformer", inputs).blockwise == {"transformer": False, "text_encoder": False}
    (tmp_path / "tiny").mkdir()
    tiny = StageInputs(tmp_path / "tiny", {}, tmp_path)
    assert from_recipe(load_recipe("l40s-fp8"), "transformer", tiny).blockwise == {"transformer": False, "text_encoder": False}
