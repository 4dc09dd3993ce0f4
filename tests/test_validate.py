from __future__ import annotations

import logging
from pathlib import Path

import pytest

from stages.graphs.runners import DEFAULT_OPTIMIZATIONS, WEIGHT_ONLY_AS_FLOAT
from stages.recipe.load import load_recipe
from stages.reports import Comparison, Tolerances, WouldPass
from stages.validate import ValidateAgainstPytorch, format_line


def validator(checkpoint: Path, onnx_path: Path, overrides: dict[str, str]) -> ValidateAgainstPytorch:
    loaded = load_recipe("a10-fp16", overrides)
    return ValidateAgainstPytorch(
        component="transformer", checkpoint_dir=checkpoint, onnx_path=onnx_path, engine_paths=(Path("unused.plan"),),
        compute_capability=(8, 6), backend="tensorrt-rtx",
        settings=loaded.recipe.components["transformer"].validate_, text_length=256,
    )


SMALL = {"components.transformer.validate.sizes": "[[512, 512], [512, 768]]",
         "components.transformer.validate.timesteps": "[1.0, 0.3]"}


def test_fp16_graph_passes_and_report_is_honest(tiny_checkpoint: Path, fp16_output: tuple[Path, dict],
                                                 tmp_path: Path) -> None:
    report = validator(tiny_checkpoint, fp16_output[0], SMALL)(tmp_path)
    assert report["passed"]
    assert report["engine"]["ran"] is False and "no CUDA GPU" in report["engine"]["skipped_because"]
    (row,) = report["comparisons"]
    assert row["runner"] == "onnxruntime" and row["output"] == "sample"
    assert 0 < row["max_abs_diff"] < 0.05 and row["min_cosine_similarity"] > 0.999
    assert len(report["cases"]) == 4 and (tmp_path / "results.json").stat().st_size > 0
    assert report["onnxruntime"] == {"onnx": "model.onnx", "ran": True, "execution": DEFAULT_OPTIMIZATIONS}


def test_quantized_graph_record_and_log_say_qdq_ran_as_float(tiny_checkpoint: Path, surgery_output: tuple[Path, dict],
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """How ORT executed a Q/DQ graph is part of the validation's record (issue 15: fused int8 kernels are
    CPU-dependent); weight-only INT8 needs no calibration feeds, so it is the cheap quantized graph here."""
    from stages.quantize import QuantizePrecision

    source, surgery = surgery_output
    (tmp_path / "precision").mkdir()
    (tmp_path / "validate").mkdir()
    QuantizePrecision("transformer", source, "int8_weight_only", "max", "fp16", tuple(surgery["frozen_nodes"]), (),
                      [], None)(tmp_path / "precision")
    forge = logging.getLogger("forge")
    forge.addHandler(caplog.handler)  # log.configure() stops propagation to the root logger caplog listens on
    try:
        with caplog.at_level(logging.INFO, logger="forge"):
            report = validator(tiny_checkpoint, tmp_path / "precision" / "model.onnx", SMALL)(tmp_path / "validate")
    finally:
        forge.removeHandler(caplog.handler)
    assert report["onnxruntime"] == {"onnx": "model.onnx", "ran": True, "execution": WEIGHT_ONLY_AS_FLOAT}
    assert f"transformer onnxruntime on model.onnx: {WEIGHT_ONLY_AS_FLOAT}" in caplog.messages
    assert report["comparisons"][0]["min_cosine_similarity"] > 0.999


def test_too_tight_tolerance_fails_with_what_would_pass(tiny_checkpoint: Path, fp16_output: tuple[Path, dict],
                                                         tmp_path: Path) -> None:
    tight = {**SMALL, "components.transformer.validate.tolerances.sample.atol": "1e-7",
             "components.transformer.validate.tolerances.sample.rtol": "1e-7"}
    report = validator(tiny_checkpoint, fp16_output[0], tight)(tmp_path)
    assert report["passed"] is False
    (row,) = report["comparisons"]
    assert not row["elementwise_passed"] and row["cosine_passed"]
    assert "sample" in report["failure"] and "FAIL" in report["failure"]
    assert f"atol >= {row['max_abs_diff']:.3g}" in report["failure"]


def row(runner: str, against: str, diff: float, cosine: float, passed: bool = True) -> Comparison:
    return Comparison(runner=runner, against=against, gated=against == "pytorch-fp32" and ":" not in runner,
                      output="sample", max_abs_diff=diff, max_rel_diff=diff, mean_abs_diff=diff / 10,
                      min_cosine_similarity=cosine, tolerance=Tolerances(atol=0.1, rtol=0.1, cosine=0.99),
                      elementwise_passed=passed, cosine_passed=passed, would_pass_with=WouldPass(atol=diff, cosine=cosine),
                      passed=passed)


def test_format_line_names_output_diff_and_tolerance() -> None:
    line = format_line(row("onnxruntime", "pytorch-fp32", 0.25, 0.98, passed=False))
    assert line.startswith("onnxruntime sample: max|diff| 0.25 (atol 0.1") and "FAIL" in line and "0.980000" in line
    measured = format_line(row("onnxruntime", "onnxruntime:fp16_graph", 0.2, 0.5))
    assert "vs onnxruntime:fp16_graph" in measured and measured.endswith("(measured, not gated)")


def test_freezing_effect_is_the_difference_of_the_two_graphs() -> None:
    from stages.validate import freezing_effect

    rows = [row("onnxruntime", "pytorch-fp32", 0.1, 0.999), row("onnxruntime:freezing_off", "pytorch-fp32", 0.3, 0.990),
            row("onnxruntime", "onnxruntime:fp16_graph", 0.2, 0.5)]
    effect = freezing_effect(rows)["sample"]
    assert effect.max_abs_diff_frozen == 0.1 and effect.max_abs_diff_unfrozen == 0.3
    assert abs(effect.cosine_gain_from_freezing - 0.009) < 1e-12
    assert freezing_effect(rows[:1]) is None
