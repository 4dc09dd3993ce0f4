"""Every shipped recipe TensorRT-RTX can build here is built; the one it cannot (h100-fp8) is refused.

Builds run with lighter validation and pipeline-check settings (fewer sizes, steps and samples) so the suite
fits the CI budget; every stage, the quantizer and the engine build run exactly as the recipe says. All four
share the session's store, as they would on one machine: work they have in common is done once.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import built_tasks, executed_tasks, reused_tasks, run_doit, view_name

LIGHT = [
    "components.transformer.validate.timesteps=[1.0, 0.3]",
    "components.transformer.validate.sizes=[[512, 512], [512, 768]]",
    "components.vae_decoder.validate.sizes=[[512, 512], [512, 768]]",
    "components.text_encoder.validate.batch=1",
    "pipeline_check.num_inference_steps=2",
    "pipeline_check.height=256",
    "pipeline_check.width=256",
    *(f"components.{c}.profile.{side}.min=256" for c in ("transformer", "vae_decoder") for side in ("height", "width")),
]
# release-size code paths, switched on for the tiny transformer: FP8 graphs validated one block at a time (weights
# behind DequantizeLinear stay in their block); INT8 weight-only quantized one block at a time is its own test
# below (the whole-graph bytes: tests/test_quantize.py). Block-wise FP8 quantization differs in a few optional
# residual-Add Q/DQ, too close to the tiny pipeline check's 0.999 step cosine to share its build. These overrides
# give each light build a view of its own (`l40s-fp8-<digest>`); a10-int8 is the session's build as shipped
# (conftest's `built_int8`, which test_audit audits).
BLOCKWISE = {"l40s-fp8": ["components.transformer.validate.blockwise=true"],
             "rtx5090-fp8": ["components.transformer.validate.blockwise=true"]}
LIGHT_CALIBRATION = [
    "components.transformer.precision.calibration.sizes=[[512, 512]]",
    "components.transformer.precision.calibration.num_inference_steps=4",
    "components.transformer.precision.calibration.samples=8",
]


ORDER = ("l40s-fp8", "rtx5090-fp8")


def light_overrides(recipe: str, *extra: str) -> list[str]:
    return [*LIGHT, *(LIGHT_CALIBRATION if "fp8" in recipe else []), *BLOCKWISE.get(recipe, []), *extra]


def name_of(recipe: str, *extra: str) -> str:
    """The view (and task-name prefix) of a light build: overridden builds have views of their own."""
    return view_name(recipe, overrides=light_overrides(recipe, *extra))


def build(workspace: dict[str, Path], recipe: str, *extra: str) -> tuple[dict, list[str], str]:
    result = run_doit(["build", f"recipe={recipe}", *light_overrides(recipe, *extra), "-n", "2"],
                      workspace["artifacts"], workspace["db"])
    manifest = json.loads((workspace["artifacts"] / name_of(recipe, *extra) / "manifest.json").read_text())
    return manifest, executed_tasks(result.stdout), result.stderr


@pytest.fixture(scope="module")
def workspace(built: dict[str, Path], built_int8: tuple, light_builds) -> dict:
    """After the session's a10-fp16 build, the other three RTX recipes in turn, into the same store (each built
    once per session; its first build's log is the one kept)."""
    shared = {"artifacts": built["artifacts"], "db": built["db"]}
    return {**shared, "builds": {"a10-int8": built_int8, **{recipe: light_builds(recipe) for recipe in ORDER}}}


def surgery_frozen(workspace: dict[str, Path], recipe: str) -> int:
    record = json.loads((workspace["artifacts"] / name_of(recipe) / "transformer" / "surgery" / "record.json").read_text())
    return len(record["report"]["frozen_nodes"])


def test_l40s_fp8_quantizes_transformer_and_keeps_text_branch(workspace: dict) -> None:
    manifest, _, _ = workspace["builds"]["l40s-fp8"]
    transformer = manifest["components"]["transformer"]
    precision = transformer["precision"]
    assert precision["mode"] == "fp8" and precision["activations"] == "fp8"
    assert precision["quantized_nodes"].get("MatMul", 0) > 0
    assert precision["excluded"]["frozen_text_branch"] == surgery_frozen(workspace, "l40s-fp8") > 0
    assert transformer["calibration"]["samples"] == 8
    validation = transformer["validation"]
    assert validation["passed"]
    measured = {(row["runner"], row["against"]) for row in validation["measured_against_comparison_graphs"]}
    assert ("onnxruntime:fp16_graph", "pytorch-fp32") in measured
    assert ("onnxruntime", "onnxruntime:fp16_graph") in measured
    effect = validation["freezing_effect"]["sample"]
    assert 0 < effect["cosine_frozen"] <= 1 and 0 < effect["cosine_unfrozen"] <= 1
    assert manifest["target"]["compute_capability"] == "8.9" and manifest["pipeline_check"]["passed"]


def test_fit_prices_at_high_precision_exactly_the_gemms_fp8_left_unquantized(workspace: dict) -> None:
    """The GPU fit check's plan for l40s-fp8 names the weight GEMMs ModelOpt's FP8, calibrated on the captured
    (batch-1) feeds, left without Q/DQ, the frozen text branch aside: the conditioning linears its GEMV rule skips."""
    import re

    import onnx

    from stages.families.qwen_image.fit import precision_plan
    from stages.recipe.load import load_recipe
    from stages.safetensors import tensors

    view = workspace["artifacts"] / name_of("l40s-fp8")
    plan = precision_plan("transformer", load_recipe("l40s-fp8").recipe.components["transformer"])
    keys = {k for shard in (view / "checkpoint" / "transformer").glob("*.safetensors") for k in tensors(shard)}
    frozen = set(json.loads((view / "transformer" / "surgery" / "record.json").read_text())["report"]["frozen_nodes"])
    graph = onnx.load(str(view / "transformer" / "precision" / "model.onnx"), load_external_data=False).graph
    dq = {o for n in graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    unquantized, priced = set(), set()
    for node in graph.node:
        module = ".".join(node.name.strip("/").split("/")[:-1])
        if node.op_type not in ("MatMul", "Gemm") or node.name in frozen or f"{module}.weight" not in keys:
            continue
        if not any(name in dq for name in node.input):
            unquantized.add(module)
        if any(re.search(p, f"{module}.weight") for p in plan.quantize_exclude):
            priced.add(module)
    assert unquantized and unquantized == priced
    woq = precision_plan("transformer", load_recipe("a10-int8").recipe.components["transformer"])
    assert not woq.quantize_exclude, "weight-only INT8 quantizes every GEMM"


def test_rtx5090_fp8_reuses_identical_calibration(workspace: dict) -> None:
    manifest, _, log = workspace["builds"]["rtx5090-fp8"]
    first, _, _ = workspace["builds"]["l40s-fp8"]
    calibration = manifest["components"]["transformer"]["calibration"]
    assert calibration["entry"] == first["components"]["transformer"]["calibration"]["entry"]
    assert f"reused calibration:{name_of('rtx5090-fp8')}/transformer" in log and "built calibration:" not in log
    assert manifest["target"]["compute_capability"] == "12.0"
    engines = [json.loads((workspace["artifacts"] / name_of(r) / "manifest.json").read_text())
               ["components"]["transformer"]["artifacts"]["engine"] for r in ("l40s-fp8", "rtx5090-fp8")]
    assert engines[0][0]["sha256"] != engines[1][0]["sha256"]


def test_identical_work_is_done_once_across_recipes(workspace: dict) -> None:
    """a10-int8 after a10-fp16: the checkpoint, every export, and the text encoder's and VAE's surgery, precision
    and engines are reused (its transformer has no LoRA inputs, so its surgery is its own); rtx5090-fp8 after
    l40s-fp8 also reuses the calibration and quantization."""
    _, _, log = workspace["builds"]["a10-int8"]
    int8 = "a10-int8"
    shared = {f"checkpoint:{int8}", *(f"export:{int8}/{c}" for c in ("text_encoder", "transformer", "vae_decoder")),
              *(f"{s}:{int8}/{c}" for s in ("surgery", "precision", "engine") for c in ("text_encoder", "vae_decoder"))}
    assert shared <= set(reused_tasks(log)) and not shared & set(built_tasks(log))
    assert {f"surgery:{int8}/transformer", f"precision:{int8}/transformer",
            f"engine:{int8}/transformer"} <= set(built_tasks(log))
    _, _, log = workspace["builds"]["rtx5090-fp8"]
    # reused from l40s-fp8's entry, or already up to date where another test built rtx5090-fp8 in this store first
    assert f"precision:{name_of('rtx5090-fp8')}/transformer" not in built_tasks(log)
    assert not [task for task in built_tasks(log) if task.startswith(("checkpoint:", "export:", "surgery:", "calibration:"))]


def run_up_to(workspace: dict[str, Path], recipe: str, task: str, *extra: str) -> str:
    """`doit run <task>` of a light build: that task and what it depends on, not the validation after it."""
    name = name_of(recipe, *extra)
    return run_doit(["run", f"{task}:{name}/transformer", f"recipe={recipe}", *light_overrides(recipe, *extra)],
                    workspace["artifacts"], workspace["db"]).stderr


def test_build_settings_do_not_recalibrate_but_samples_do(workspace: dict) -> None:
    level = "components.transformer.build.optimization_level=1"
    log = run_up_to(workspace, "l40s-fp8", "engine", level)
    assert built_tasks(log) == [f"engine:{name_of('l40s-fp8', level)}/transformer"]
    assert f"reused calibration:{name_of('l40s-fp8', level)}/transformer" in log
    samples = "components.transformer.precision.calibration.samples=6"
    log = run_up_to(workspace, "l40s-fp8", "calibration", samples)
    assert built_tasks(log) == [f"calibration:{name_of('l40s-fp8', samples)}/transformer"]


def test_a10_int8_is_weight_only(workspace: dict) -> None:
    manifest, ran, _ = workspace["builds"]["a10-int8"]
    precision = manifest["components"]["transformer"]["precision"]
    assert precision["mode"] == "int8_weight_only" and precision["weights"] == "int8"
    assert precision["activations"] == "fp16"
    assert not any(task.startswith("calibration:") for task in ran)
    assert manifest["components"]["transformer"]["validation"]["passed"]


def test_h100_fp8_needs_full_tensorrt(tmp_path: Path) -> None:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        result = run_doit(["build", "recipe=h100-fp8"], tmp_path / "artifacts", tmp_path / "db", check=False)
        assert result.returncode != 0 and "Traceback" not in result.stderr
        assert "h100-fp8.yaml: target.backend: tensorrt needs the Python package `tensorrt`" in result.stderr
    else:
        pytest.skip("full TensorRT is installed: h100-fp8 would build here")


def test_a10_int8_quantizes_one_block_at_a_time_through_doit(workspace: dict) -> None:
    """precision.blockwise=true (auto turns it on at release size): the precision task alone, from the recipe's
    own upstream entries, quantizes block by block into the same INT8 tensors as the whole-graph build."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from stages.graphs.weights import load_with_weights

    blockwise = ["components.transformer.precision.blockwise=true"]
    name = view_name("a10-int8", overrides=blockwise)
    result = run_doit(["precision", "recipe=a10-int8", *blockwise], workspace["artifacts"], workspace["db"])
    assert built_tasks(result.stderr) == [f"precision:{name}/transformer"], result.stderr[-2000:]
    graphs = {}
    for view in ("a10-int8", name):
        folder = workspace["artifacts"] / view / "transformer" / "precision"
        record = json.loads((folder / "record.json").read_text())
        assert record["report"]["blockwise"] is (view == name)
        model = load_with_weights(folder / "model.onnx")  # shards linked in place, which onnx.load refuses
        graphs[view] = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer
                        if t.data_type == onnx.TensorProto.INT8}
    assert graphs[name].keys() == graphs["a10-int8"].keys() and len(graphs[name]) > 0
    for tensor, values in graphs["a10-int8"].items():
        assert np.array_equal(values, graphs[name][tensor]), tensor
