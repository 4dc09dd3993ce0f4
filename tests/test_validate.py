from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

import pytest

from stages.graphs.runners import DEFAULT_OPTIMIZATIONS, WEIGHT_ONLY_AS_FLOAT
from stages.recipe.load import load_recipe
from stages.reports import Comparison, Tolerances, WouldPass
from stages.validate import ValidateAgainstPytorch, format_line


def validator(checkpoint: Path, onnx_path: Path, overrides: dict[str, str],
              recipe: str = "a10-fp16") -> ValidateAgainstPytorch:
    loaded = load_recipe(recipe, overrides)
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


@pytest.fixture(scope="module")
def weight_only_int8(surgery_output: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The a10-int8 plan's graph (weight-only INT8 needs no calibration feeds: the cheap quantized graph)."""
    from stages.quantize import QuantizePrecision

    source, surgery = surgery_output
    out = tmp_path_factory.mktemp("woq")
    QuantizePrecision("transformer", source, "int8_weight_only", "max", "fp16", tuple(surgery["frozen_nodes"]), (),
                      [], None)(out)
    return out / "model.onnx"


def test_quantized_graph_record_and_log_say_qdq_ran_as_float(tiny_checkpoint: Path, weight_only_int8: Path,
                                                            tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """How ORT executed a Q/DQ graph is part of the validation's record (issue 15: fused int8 kernels are
    CPU-dependent)."""
    forge = logging.getLogger("forge")
    forge.addHandler(caplog.handler)  # log.configure() stops propagation to the root logger caplog listens on
    try:
        with caplog.at_level(logging.INFO, logger="forge"):
            report = validator(tiny_checkpoint, weight_only_int8, SMALL, "a10-int8")(tmp_path)
    finally:
        forge.removeHandler(caplog.handler)
    assert report["passed"], report.get("failure")
    assert report["onnxruntime"] == {"onnx": "model.onnx", "ran": True, "execution": WEIGHT_ONLY_AS_FLOAT}
    assert f"transformer onnxruntime on model.onnx: {WEIGHT_ONLY_AS_FLOAT}" in caplog.messages


def test_recipe_gate_fails_a_wrong_quantization_scale(tiny_checkpoint: Path, weight_only_int8: Path,
                                                      tmp_path: Path) -> None:
    """The a10-int8 gate passes its graph (above) and fails the same graph with every weight scale 25% too large,
    the kind of bug a gate exists for (scripts/scale_benchmark.py --break-weight-scales does it at release width).
    One GEMM's scale doubled is not enough: at tiny width the residual stream dilutes it to rms_error ~0.04."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(weight_only_int8), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    scales = [inits[n.input[1]] for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(scales) > 10
    for scale in scales:
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 1.25, scale.name))
    broken = weight_only_int8.parent / "broken.onnx"
    onnx.save_model(model, str(broken))
    report = validator(tiny_checkpoint, broken, SMALL, "a10-int8")(tmp_path)
    (row,) = report["comparisons"]
    assert report["passed"] is False and not row["error_passed"], row
    assert "onnxruntime sample" in report["failure"]


def test_too_tight_tolerance_fails_with_what_would_pass(tiny_checkpoint: Path, fp16_output: tuple[Path, dict],
                                                         tmp_path: Path) -> None:
    tight = {**SMALL, "components.transformer.validate.tolerances.sample.max_error": "1e-7",
             "components.transformer.validate.tolerances.sample.rms_error": "1e-7"}
    report = validator(tiny_checkpoint, fp16_output[0], tight)(tmp_path)
    assert report["passed"] is False
    (row,) = report["comparisons"]
    assert not row["error_passed"] and row["cosine_passed"]
    assert "sample" in report["failure"] and "FAIL" in report["failure"]
    assert f"max_error >= {row['max_error']:.3g}" in report["failure"]
    assert row["max_error"] == pytest.approx(row["max_abs_diff"] / row["reference_max_abs"], rel=1e-6)


def row(runner: str, against: str, diff: float, cosine: float, passed: bool = True) -> Comparison:
    return Comparison(runner=runner, against=against, gated=against == "pytorch-fp32" and ":" not in runner,
                      output="sample", max_abs_diff=diff, mean_abs_diff=diff / 10, reference_max_abs=2.0,
                      reference_rms=0.5, max_error=diff / 2, rms_error=diff / 20, min_cosine_similarity=cosine,
                      tolerance=Tolerances(max_error=0.1, rms_error=0.01, cosine=0.99), error_passed=passed,
                      cosine_passed=passed, would_pass_with=WouldPass(max_error=diff / 2, rms_error=diff / 20,
                                                                      cosine=cosine), passed=passed)


def test_format_line_names_output_diff_and_tolerance() -> None:
    line = format_line(row("onnxruntime", "pytorch-fp32", 0.25, 0.98, passed=False))
    assert line.startswith("onnxruntime sample: max|diff| 0.25 = 0.125 of max|ref| 2 (max_error 0.1)")
    assert "FAIL" in line and "0.980000" in line and "rms_error 0.0125 (max 0.01)" in line
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


def run_results(reference: list[np.ndarray], output: list[np.ndarray]) -> Any:
    from polygraphy.comparator import RunResults
    from polygraphy.comparator.struct import IterationResult

    results = RunResults()
    results.add([IterationResult({"sample": r}, runner_name="pytorch-fp32") for r in reference], runner_name="pytorch-fp32")
    results.add([IterationResult({"sample": o}, runner_name="onnxruntime") for o in output], runner_name="onnxruntime")
    return results


def test_gates_are_relative_to_the_reference_scale() -> None:
    """The same relative error passes at any scale (tiny width's unit-size outputs, release width's hundreds);
    a uniform 5% scale error, which the cosine cannot see, fails on rms_error; the worst case decides."""
    from stages.recipe.schema import Tolerance
    from stages.validate import compare

    rng = np.random.default_rng(0)
    reference = [rng.standard_normal((2, 64, 16)) for _ in range(2)]
    noisy = [r + 1e-3 * rng.standard_normal(r.shape) for r in reference]
    gate = {"sample": Tolerance(max_error=0.01, rms_error=0.01, cosine=0.9999)}
    rows = {scale: compare(run_results([r * scale for r in reference], [n * scale for n in noisy]), gate,
                           ["sample"], [(0, 1)])[0] for scale in (1.0, 300.0)}
    assert rows[1.0].passed and rows[300.0].passed
    assert rows[300.0].max_abs_diff == pytest.approx(300 * rows[1.0].max_abs_diff)
    assert rows[300.0].max_error == pytest.approx(rows[1.0].max_error) and rows[1.0].rms_error == pytest.approx(1e-3, rel=0.05)
    absolute = max(float(np.abs(n - r).max()) for r, n in zip(reference, noisy))
    assert rows[1.0].max_error == pytest.approx(absolute / min(float(np.abs(r).max()) for r in reference), rel=0.2)

    scaled = compare(run_results(reference, [r * 1.05 for r in reference]), gate, ["sample"], [(0, 1)])[0]
    assert scaled.min_cosine_similarity == pytest.approx(1.0) and scaled.cosine_passed
    assert scaled.rms_error == pytest.approx(0.05) and not scaled.error_passed and not scaled.passed

    one_bad = compare(run_results(reference, [reference[0], reference[1] * 0.0]), gate, ["sample"], [(0, 1)])[0]
    assert one_bad.rms_error == pytest.approx(1.0) and one_bad.min_cosine_similarity == 0.0 and not one_bad.passed
    nan = compare(run_results(reference, [reference[0], reference[1] * np.nan]), gate, ["sample"], [(0, 1)])[0]
    assert nan.max_error == float("inf") and not nan.passed
