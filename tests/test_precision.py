from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from stages.families.qwen_image import transformer as qwen_image
from stages.precision import ConvertPrecision, node_output_dtypes


def feed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return qwen_image.transformer_engine_inputs(
        rng.standard_normal((2, 96, 16)), rng.standard_normal((2, 256, 16)),
        np.array([[1] * 40 + [0] * 216, [1] * 256]), [0.9, 0.1], [(1, 8, 12)] * 2, axes_dims_rope=(8, 4, 4))


def test_fp16_keeps_frozen_text_branch_in_fp32(fp16_output: tuple[Path, dict], surgery_output: tuple[Path, dict]) -> None:
    import onnx

    path, report = fp16_output
    dtypes = node_output_dtypes(onnx.load(str(path), load_external_data=False))
    frozen = surgery_output[1]["frozen_nodes"]
    frozen_float = [name for name in frozen if name in dtypes]
    assert frozen_float and all(dtypes[name] == "fp32" for name in frozen_float)
    image_matmuls = [n for n in dtypes if "/img_mlp/" in n and "MatMul" in n]
    assert image_matmuls and all(dtypes[n] == "fp16" for n in image_matmuls)
    assert report["node_precisions"]["fp16"] > report["excluded"]["frozen_text_branch"] / 2
    assert report["excluded"]["frozen_text_branch"] == len(frozen)


def test_fp16_graph_runs_and_stays_close(fp16_output: tuple[Path, dict], surgery_output: tuple[Path, dict]) -> None:
    inputs = feed()
    reference, converted = (ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, inputs)[0]
                            for p in (surgery_output[0], fp16_output[0]))
    assert converted.dtype == np.float32  # keep_io_types: engines take and return fp32
    cosine = float(np.dot(reference.ravel(), converted.ravel()) /
                   (np.linalg.norm(reference) * np.linalg.norm(converted)))
    assert cosine > 0.999
    assert 0 < np.abs(reference - converted).max() < 0.05


def test_recipe_patterns_are_excluded_too(surgery_output: tuple[Path, dict], tmp_path: Path) -> None:
    import onnx

    source, surgery = surgery_output
    report = ConvertPrecision("transformer", source, "fp16", "fp32", tuple(surgery["frozen_nodes"]),
                              (r"/img_mlp/",))(tmp_path)
    dtypes = node_output_dtypes(onnx.load(str(tmp_path / "model.onnx"), load_external_data=False))
    mlp = [n for n in dtypes if "/img_mlp/" in n]
    assert mlp and all(dtypes[n] == "fp32" for n in mlp)
    assert report["excluded"]["matched_by_patterns"] == len([n for n in report["excluded_nodes"] if "/img_mlp/" in n])


def test_quantized_plan_writes_the_graphs_it_is_measured_against(surgery_output: tuple[Path, dict],
                                                                 tmp_path: Path) -> None:
    """Weight-only INT8 (no calibration data needed): the primary keeps the text branch unquantized."""
    import onnx

    from stages.quantize import QuantizeWithComparisons
    from stages.quantize import QuantizePrecision

    source, surgery = surgery_output
    frozen = tuple(surgery["frozen_nodes"])

    def quantizer(nodes: tuple[str, ...]) -> QuantizePrecision:
        return QuantizePrecision("transformer", source, "int8_weight_only", "max", "fp16", nodes, ())

    stage = QuantizeWithComparisons(quantizer(frozen), ConvertPrecision("transformer", source, "fp16", "fp32", frozen, ()),
                                    quantizer(()))
    report = stage(tmp_path)
    assert report["comparison_graphs"] == {"fp16_graph": "comparisons/fp16_graph/model.onnx",
                                           "freezing_off": "comparisons/freezing_off/model.onnx"}

    def dequantized_frozen(path: Path) -> set[str]:
        graph = onnx.load(str(path), load_external_data=False).graph
        dq_outputs = {out for node in graph.node if node.op_type == "DequantizeLinear" for out in node.output}
        return {node.name for node in graph.node if node.name in frozen and set(node.input) & dq_outputs}

    assert dequantized_frozen(tmp_path / "model.onnx") == set()
    assert any("/txt_mlp/" in name for name in dequantized_frozen(tmp_path / report["comparison_graphs"]["freezing_off"]))
    fp16 = node_output_dtypes(onnx.load(str(tmp_path / report["comparison_graphs"]["fp16_graph"]), load_external_data=False))
    assert "fp16" in set(fp16.values())


BLOCK_PATTERN = r"^/transformer_blocks/(\d+)/"


def test_autocast_by_block_writes_the_whole_graph_result(fp16_output: tuple[Path, dict],
                                                         surgery_output: tuple[Path, dict], tmp_path: Path) -> None:
    """One block at a time (linear time at 60 layers): the same nodes at the same precisions, no Cast round trip
    left at the cuts, and bit-identical outputs."""
    import onnx

    source, surgery = surgery_output
    report = ConvertPrecision("transformer", source, "fp16", "fp32", tuple(surgery["frozen_nodes"]), (),
                              BLOCK_PATTERN)(tmp_path)
    whole, blocks = (onnx.load(str(p), load_external_data=False) for p in (fp16_output[0], tmp_path / "model.onnx"))
    assert report["blockwise"] and not fp16_output[1]["blockwise"]
    assert node_output_dtypes(blocks) == node_output_dtypes(whole)
    assert sorted(n.name for n in blocks.graph.node) == sorted(n.name for n in whole.graph.node)
    producer = {o: n for n in blocks.graph.node for o in n.output}
    casts_of_casts = [n.name for n in blocks.graph.node
                      if n.op_type == "Cast" and getattr(producer.get(n.input[0]), "op_type", "") == "Cast"]
    whole_producer = {o: n for n in whole.graph.node for o in n.output}
    assert len(casts_of_casts) == sum(1 for n in whole.graph.node if n.op_type == "Cast"
                                      and getattr(whole_producer.get(n.input[0]), "op_type", "") == "Cast")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # fusions depend on node order
    inputs = feed()
    a, b = (ort.InferenceSession(str(p), options, providers=["CPUExecutionProvider"]).run(None, inputs)[0]
            for p in (fp16_output[0], tmp_path / "model.onnx"))
    np.testing.assert_array_equal(a, b)
