"""The frozen text branch's GEMMs in bf16 (precision.frozen_storage: bf16) and how ONNX Runtime CPU runs them.

References are independent of the code under test: numpy's own bf16 rounding of a GEMM's operands and result,
the fp32-storage graph of the same surgery output, and the engines TensorRT-RTX builds from both graphs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from stages.graphs import bf16
from stages.graphs.runners import BF16_AS_FP32, OnnxRuntimeRunner, onnxruntime_execution


def to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even), returned as float32: the top 16 bits of the word."""
    bits = np.asarray(values, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


def test_a_bf16_gemm_runs_as_fp32_between_bf16_roundings(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((24, 16)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["y"], name="gemm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 24 // 24 * 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 24])], [numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)], ir_version=9)
    assert bf16.gemms_to_bf16(model, ["gemm", "not-there"]) == ["gemm"]
    assert bf16.bf16_compute_nodes(model) == ["gemm"]
    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    assert BF16_AS_FP32 in onnxruntime_execution(path)
    x = rng.standard_normal((3, 16)).astype(np.float32) * 10
    with OnnxRuntimeRunner(path) as runner:
        got = runner.infer({"x": x})["y"]
    expected = to_bf16(to_bf16(x).astype(np.float64) @ to_bf16(weight.T).astype(np.float64))
    ulp = np.abs(expected) * 2.0**-7
    assert np.all(np.abs(got - expected) <= ulp) and not np.array_equal(got, x @ weight.T)


@pytest.fixture(scope="module")
def graphs(surgery_output: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> dict:
    from stages.precision import ConvertPrecision

    source, surgery = surgery_output
    frozen = tuple(surgery["frozen_nodes"])
    made = {}
    for storage in ("high_precision", "bf16"):
        out = tmp_path_factory.mktemp(storage)
        report = ConvertPrecision("transformer", source, "fp16", "fp32", frozen, (), None, storage)(out)
        made[storage] = {"path": out / "model.onnx", "report": report}
    return {"frozen": frozen, **made}


def test_frozen_gemms_compute_in_bf16_on_the_same_weights(graphs: dict, tiny_checkpoint: Path) -> None:
    from stages.families.qwen_image import transformer as qwen_image
    from stages.recipe.load import load_recipe

    plain, rewritten = (onnx.load(str(graphs[s]["path"]), load_external_data=False) for s in ("high_precision", "bf16"))
    names = set(bf16.bf16_compute_nodes(rewritten))
    assert graphs["bf16"]["report"]["bf16_gemms"] == len(names) > 0 and bf16.bf16_compute_nodes(plain) == []
    assert names <= set(graphs["frozen"]) and all(n.split("/")[1] in ("txt_in", "transformer_blocks") for n in names)
    blocks = {n.split("/")[2] for n in names if "add_q_proj" in n}
    assert blocks == {"0", "1"}, "every block's text query projection reads its weights in bf16"
    weights = {init.name: init.SerializeToString() for init in plain.graph.initializer}
    assert {init.name: init.SerializeToString() for init in rewritten.graph.initializer} == weights, \
        "no weight is converted or written: the Cast to bf16 is folded by the engine builder"
    model = qwen_image.load(tiny_checkpoint)
    settings = load_recipe("a10-fp16").recipe.components["transformer"].validate_
    case = qwen_image.validation_cases(model, settings, 256)[0]
    with OnnxRuntimeRunner(graphs["high_precision"]["path"]) as a, OnnxRuntimeRunner(graphs["bf16"]["path"]) as b:
        first, second = a.infer(case["feed"])["sample"], b.infer(case["feed"])["sample"]
    relative = np.sqrt(np.mean((first - second) ** 2) / np.mean(first ** 2))
    assert 0 < relative < 1e-2


def test_the_bf16_engine_is_smaller_by_the_text_gemm_bytes(graphs: dict, tmp_path: Path) -> None:
    """TensorRT-RTX folds the Casts into bf16 weights: the engine shrinks by 2 bytes per frozen GEMM weight it keeps
    (the last block's text branch reaches no output and is dropped in both)."""
    from stages.engine import BuildEngine
    from stages.families.qwen_image import transformer as qwen_image
    from stages.recipe.schema import PixelRange, Profile, Range

    side = PixelRange(min=512, opt=512, max=512)
    profile = Profile(batch=Range(min=1, opt=1, max=1), height=side, width=side)
    config = {"patch_size": 2, "in_channels": 16, "joint_attention_dim": 16, "attention_head_dim": 16}
    sizes = {}
    for storage in ("high_precision", "bf16"):
        out = tmp_path / storage
        out.mkdir()
        BuildEngine("transformer", graphs[storage]["path"], "tensorrt-rtx", (8, 6),
                    qwen_image.profile_shapes(profile, 256, config), 0)(out)
        sizes[storage] = (out / "engine.plan").stat().st_size
    model = onnx.load(str(graphs["bf16"]["path"]), load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}

    def weight_of(tensor: str) -> str | None:
        while tensor not in inits and tensor in producers and producers[tensor].op_type in ("Cast", "Transpose"):
            tensor = producers[tensor].input[0]
        return tensor if tensor in inits else None

    gemms = [node for node in model.graph.node if node.name in set(bf16.bf16_compute_nodes(model))]
    saved = 2 * sum(int(np.prod(inits[w].dims)) for w in {weight_of(n.input[1]) for n in gemms} if w)
    assert saved > 0 and 0.8 * saved <= sizes["high_precision"] - sizes["bf16"] <= 1.05 * saved, (sizes, saved)
