from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import artifacts
from stages.calibration import CaptureCalibration, calibration_digest, load_feeds, shared_dir
from stages.errors import ForgeError
from stages.models import qwen_tokenizer
from stages.recipe import CalibrationSettings

PROMPTS = ['A shop sign reading "OPEN"', "一只猫坐在窗台上"]


@pytest.fixture()
def prompts_file(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.yaml"
    path.write_text(yaml.safe_dump(PROMPTS, allow_unicode=True))
    return path


@pytest.fixture()
def isolated_artifacts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(artifacts, "ARTIFACTS_DIR", tmp_path / "artifacts")
    return tmp_path / "artifacts"


def settings(prompts: Path, **changes: object) -> CalibrationSettings:
    values = {"prompts": str(prompts), "sizes": [[256, 256]], "num_inference_steps": 3, "steps": [0, 2],
              "samples": 100, "true_cfg_scale": 4.0}
    return CalibrationSettings(**{**values, **changes})


def test_transformer_inputs_are_captured_per_prompt_step_and_cfg_branch(
        tiny_checkpoint: Path, prompts_file: Path, isolated_artifacts: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    digest = calibration_digest("transformer", {"path": "tiny", "seed": 0}, chosen, 64)
    report = CaptureCalibration("transformer", tiny_checkpoint, chosen, 64, digest)(tmp_path)
    feeds = load_feeds(digest)
    assert report["samples"] == len(feeds) == len(PROMPTS) * 2 * 2  # prompts x steps x (cond, uncond)
    timesteps = sorted({float(f["timestep"][0]) for f in feeds}, reverse=True)
    assert len(timesteps) == 2 and 0 < timesteps[1] < timesteps[0] <= 1
    assert {f["hidden_states"].shape for f in feeds} == {(1, 16 * 16, 16)}
    tokenizer = qwen_tokenizer.load_tokenizer(tiny_checkpoint)
    _, mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, PROMPTS, 64)
    expected = set((mask.sum(dim=1) - qwen_tokenizer.PROMPT_TEMPLATE_DROP).tolist())
    assert expected <= {int(f["encoder_hidden_states_mask"].sum()) for f in feeds}
    assert all(f["encoder_hidden_states"].shape == (1, 64, 16) for f in feeds)


def test_identical_settings_share_one_capture(tiny_checkpoint: Path, prompts_file: Path,
                                              isolated_artifacts: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file, sizes=[[128, 128]], steps=[1], samples=3)
    digest = calibration_digest("transformer", {"path": "tiny", "seed": 0}, chosen, 32)
    first = CaptureCalibration("transformer", tiny_checkpoint, chosen, 32, digest)(tmp_path)
    stamp = os.stat(shared_dir(digest) / "index.json").st_mtime_ns
    second = CaptureCalibration("transformer", tiny_checkpoint, chosen, 32, digest)(tmp_path)
    assert not first["reused"] and second["reused"] and second["samples"] == 3
    assert os.stat(shared_dir(digest) / "index.json").st_mtime_ns == stamp


def test_digest_follows_what_determines_the_data(prompts_file: Path) -> None:
    model = {"path": "tiny", "seed": 0}
    base = calibration_digest("transformer", model, settings(prompts_file), 64)
    assert calibration_digest("transformer", model, settings(prompts_file, method="entropy"), 64) == base
    for changed in ({"samples": 5}, {"steps": [1]}, {"sizes": [[512, 512]]}, {"num_inference_steps": 4}):
        assert calibration_digest("transformer", model, settings(prompts_file, **changed), 64) != base, changed
    assert calibration_digest("transformer", {"path": "tiny", "seed": 1}, settings(prompts_file), 64) != base
    assert calibration_digest("transformer", model, settings(prompts_file), 65) != base
    prompts_file.write_text(yaml.safe_dump(PROMPTS + ["one more"], allow_unicode=True))
    assert calibration_digest("transformer", model, settings(prompts_file), 64) != base


def test_text_encoder_calibrates_on_tokenized_prompts(tiny_checkpoint: Path, prompts_file: Path,
                                                      isolated_artifacts: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    digest = calibration_digest("text_encoder", {"path": "tiny", "seed": 0}, chosen, 64)
    CaptureCalibration("text_encoder", tiny_checkpoint, chosen, 64, digest)(tmp_path)
    feeds = load_feeds(digest)
    tokenizer = qwen_tokenizer.load_tokenizer(tiny_checkpoint)
    ids, mask, _ = qwen_tokenizer.tokenize_prompts(tokenizer, PROMPTS, 64)
    np.testing.assert_array_equal(np.concatenate([f["input_ids"] for f in feeds]), ids.numpy())
    np.testing.assert_array_equal(np.concatenate([f["attention_mask"] for f in feeds]), mask.numpy())


def test_tampered_calibration_file_is_refused(tiny_checkpoint: Path, prompts_file: Path,
                                              isolated_artifacts: Path, tmp_path: Path) -> None:
    chosen = settings(prompts_file)
    digest = calibration_digest("text_encoder", {"path": "tiny", "seed": 0}, chosen, 16)
    CaptureCalibration("text_encoder", tiny_checkpoint, chosen, 16, digest)(tmp_path)
    victim = shared_dir(digest) / "feed_0000.npz"
    np.savez(victim, input_ids=np.zeros((1, 50), np.int64), attention_mask=np.zeros((1, 50), np.int64))
    with pytest.raises(ForgeError, match="sha256 mismatch"):
        load_feeds(digest)
