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
