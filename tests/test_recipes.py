"""Every shipped recipe TensorRT-RTX can build here is built; the one it cannot (h100-fp8) is refused.

Builds run with lighter validation and pipeline-check settings (fewer sizes, steps and samples) so the suite
fits the CI budget; every stage, the quantizer and the engine build run exactly as the recipe says.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import executed_tasks, run_doit

LIGHT = [
    "components.transformer.validate.timesteps=[1.0, 0.3]",
    "components.transformer.validate.sizes=[[512, 512], [512, 768]]",
    "components.vae_decoder.validate.sizes=[[512, 512], [512, 768]]",
    "components.text_encoder.validate.batch=1",
    "pipeline_check.num_inference_steps=2",
    "pipeline_check.height=256",
    "pipeline_check.width=256",
]
LIGHT_CALIBRATION = [
    "components.transformer.precision.calibration.sizes=[[512, 512]]",
    "components.transformer.precision.calibration.num_inference_steps=4",
    "components.transformer.precision.calibration.samples=8",
]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recipes")
    return {"artifacts": root / "artifacts", "db": root / "doit.db"}


def build(workspace: dict[str, Path], recipe: str, *extra: str) -> tuple[dict, list[str]]:
    calibration = LIGHT_CALIBRATION if "fp8" in recipe else []
    result = run_doit(["build", f"recipe={recipe}", *LIGHT, *calibration, *extra], workspace["artifacts"], workspace["db"])
    manifest = json.loads((workspace["artifacts"] / recipe / "manifest.json").read_text())
    return manifest, executed_tasks(result.stdout)


def surgery_frozen(workspace: dict[str, Path], recipe: str) -> int:
    record = json.loads((workspace["artifacts"] / recipe / "transformer" / "surgery" / "record.json").read_text())
    return len(record["report"]["frozen_nodes"])


def test_l40s_fp8_quantizes_transformer_and_keeps_text_branch(workspace: dict[str, Path]) -> None:
    manifest, _ = build(workspace, "l40s-fp8")
    transformer = manifest["components"]["transformer"]
    precision = transformer["precision"]
    assert precision["mode"] == "fp8" and precision["activations"] == "fp8"
    assert precision["quantized_nodes"].get("MatMul", 0) > 0
    assert precision["excluded"]["frozen_text_branch"] == surgery_frozen(workspace, "l40s-fp8") > 0
    assert transformer["calibration"]["samples"] == 8 and not transformer["calibration"]["reused"]
    validation = transformer["validation"]
    assert validation["passed"]
    measured = {(row["runner"], row["against"]) for row in validation["measured_against_comparison_graphs"]}
    assert ("onnxruntime:fp16_graph", "pytorch-fp32") in measured
    assert ("onnxruntime", "onnxruntime:fp16_graph") in measured
    effect = validation["freezing_effect"]["sample"]
    assert 0 < effect["cosine_frozen"] <= 1 and 0 < effect["cosine_unfrozen"] <= 1
    assert manifest["target"]["compute_capability"] == "8.9" and manifest["pipeline_check"]["passed"]


def test_rtx5090_fp8_reuses_identical_calibration(workspace: dict[str, Path]) -> None:
    manifest, ran = build(workspace, "rtx5090-fp8")
    first = json.loads((workspace["artifacts"] / "l40s-fp8" / "manifest.json").read_text())
    calibration = manifest["components"]["transformer"]["calibration"]
    assert calibration["reused"] and calibration["digest"] == first["components"]["transformer"]["calibration"]["digest"]
    assert manifest["target"]["compute_capability"] == "12.0"
    engines = [json.loads((workspace["artifacts"] / r / "manifest.json").read_text())
               ["components"]["transformer"]["artifacts"]["engine"] for r in ("l40s-fp8", "rtx5090-fp8")]
    assert engines[0][0]["sha256"] != engines[1][0]["sha256"]


def test_build_settings_do_not_recalibrate_but_samples_do(workspace: dict[str, Path]) -> None:
    _, ran = build(workspace, "l40s-fp8", "components.transformer.build.optimization_level=1")
    assert "engine:l40s-fp8/transformer" in ran
    assert not [task for task in ran if task.startswith(("calibration:", "precision:", "export:"))]
    _, ran = build(workspace, "l40s-fp8", "components.transformer.precision.calibration.samples=6")
    assert ran[:2] == ["calibration:l40s-fp8/transformer", "precision:l40s-fp8/transformer"]


def test_a10_int8_is_weight_only(workspace: dict[str, Path]) -> None:
    manifest, ran = build(workspace, "a10-int8")
    precision = manifest["components"]["transformer"]["precision"]
    assert precision["mode"] == "int8_weight_only" and precision["weights"] == "int8"
    assert precision["activations"] == "fp16"
    assert not any(task.startswith("calibration:") for task in ran)
    assert manifest["components"]["transformer"]["validation"]["passed"]


def test_h100_fp8_needs_full_tensorrt(workspace: dict[str, Path]) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = run_doit(["build", "recipe=h100-fp8"], workspace["artifacts"], workspace["db"], check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "h100-fp8.yaml: target.backend: tensorrt needs the Python package `tensorrt`" in result.stderr
    else:
        pytest.skip("full TensorRT is installed: h100-fp8 would build here")
