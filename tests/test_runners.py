"""ONNX Runtime runs quantized graphs as the float arithmetic of their Q/DQ, on any CPU (issue 15).

Toy graphs with full-range int8 operands, where ORT's fused U8S8 kernels saturate on AVX2 CPUs without VNNI and
its MatMulNBits fusion quantizes activations: the expected values are computed here in integers (int64 products,
scales applied after), not with ORT.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from stages.graphs.runners import (DEFAULT_OPTIMIZATIONS, NO_OPTIMIZATIONS, QDQ_AS_FLOAT, WEIGHT_ONLY_AS_FLOAT,
                                   onnxruntime_cpu_note, onnxruntime_execution, onnxruntime_session)

M, K, N = 64, 512, 256
X_SCALE = 0.02


def gemm_graph(path: Path, w_q: np.ndarray, w_scale: np.ndarray, activations: bool) -> onnx.ModelProto:
    """y = x @ W as ModelOpt writes it: DequantizeLinear on the int8 weight (per output channel), and with
    `activations` a QuantizeLinear -> DequantizeLinear pair on x (W8A8)."""
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(w_scale, "w_scale"),
             numpy_helper.from_array(np.zeros(N, np.int8), "w_zero")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w"], axis=1)]
    source = "x"
    if activations:
        inits += [numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"),
                  numpy_helper.from_array(np.array(0, np.int8), "x_zero")]
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"])]
        source = "x_dq"
    nodes.append(helper.make_node("MatMul", [source, "w"], ["y"]))
    graph = helper.make_graph(nodes, "gemm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9)
    onnx.save(model, str(path))
    return model


def int8_operands(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w_q = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    w_scale = rng.uniform(0.005, 0.02, size=N).astype(np.float32)
    x_q = rng.integers(-128, 128, size=(M, K), dtype=np.int64)  # full range: u8 = x_q + 128 reaches 255
    return x_q, w_q, w_scale


def relative_error(got: np.ndarray, expected: np.ndarray) -> float:
    return float(np.abs(got.astype(np.float64) - expected).max() / np.abs(expected).max())


def test_w8a8_qdq_matmul_is_the_exact_int32_result_on_any_cpu(tmp_path: Path) -> None:
    x_q, w_q, w_scale = int8_operands(0)
    model = gemm_graph(tmp_path / "w8a8.onnx", w_q, w_scale, activations=True)
    x = (x_q * np.float32(X_SCALE)).astype(np.float32)
    assert np.array_equal(np.rint(x / np.float32(X_SCALE)), x_q), "x must sit on the quantization grid"
    exact = (x_q @ w_q.astype(np.int64)).astype(np.float64) * float(np.float32(X_SCALE)) * w_scale.astype(np.float64)

    session = onnxruntime_session(tmp_path / "w8a8.onnx")
    assert relative_error(session.run(None, {"x": x})[0], exact) < 1e-4
    assert session.get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    note = onnxruntime_cpu_note(model)
    assert note["graph_optimization"] == "disabled" and note["execution"] == QDQ_AS_FLOAT
    assert "VPMADDUBSW" in note["why"]
    assert onnxruntime_execution(tmp_path / "w8a8.onnx") == QDQ_AS_FLOAT


def test_weight_only_dq_matmul_runs_with_float_weights(tmp_path: Path) -> None:
    """ORT's default fusion (MatMulNBits) would quantize x to int8 on the fly: ~1e-2 relative, on any CPU."""
    _, w_q, w_scale = int8_operands(1)
    model = gemm_graph(tmp_path / "woq.onnx", w_q, w_scale, activations=False)
    x = np.random.default_rng(2).standard_normal((M, K)).astype(np.float32)
    expected = x.astype(np.float64) @ (w_q.astype(np.float64) * w_scale.astype(np.float64))

    got = onnxruntime_session(tmp_path / "woq.onnx").run(None, {"x": x})[0]
    assert relative_error(got, expected) < 1e-4
    note = onnxruntime_cpu_note(model)
    assert note["graph_optimization"] == "disabled" and note["execution"] == WEIGHT_ONLY_AS_FLOAT
    assert "MatMulNBits" in note["why"]


def test_graph_without_qdq_keeps_default_optimizations(tmp_path: Path) -> None:
    weight = np.random.default_rng(3).standard_normal((K, N)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "fp32",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])],
                              [numpy_helper.from_array(weight, "w")])
    path = tmp_path / "fp32.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)], ir_version=9), str(path))
    assert onnxruntime_cpu_note(onnx.load(str(path)))["graph_optimization"] == "default"
    assert onnxruntime_execution(path) == DEFAULT_OPTIMIZATIONS
    assert onnxruntime_execution(path, optimize=False) == NO_OPTIMIZATIONS
    level = onnxruntime_session(path).get_session_options().graph_optimization_level
    assert level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
