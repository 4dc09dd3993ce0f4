from __future__ import annotations

import re
from pathlib import Path

import onnx
import pytest
from onnx import helper

from stages.errors import ForgeError
from stages.families.qwen_image import transformer as qwen_image
from stages.surgery import GraphSurgery, fix_text_padding, freeze_text_branch


def test_passes_report_what_they_changed(surgery_output: tuple[Path, dict], exported_onnx: Path) -> None:
    _, report = surgery_output
    exported_nodes = len(onnx.load(str(exported_onnx), load_external_data=False).graph.node)
    passes = {p["pass"]: p for p in report["passes"]}
    assert list(passes) == ["fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup"]
    assert passes["fold_constants"]["nodes_before"] == exported_nodes
    assert passes["fold_constants"]["nodes_after"] < exported_nodes
    assert passes["fix_text_padding"]["symbolic_text_tensors"] == 0


def test_freeze_finds_every_text_module_in_every_block(surgery_output: tuple[Path, dict]) -> None:
    _, report = surgery_output
    modules = set(report["passes"][3]["frozen_modules"])
    feeds_attention = ("txt_mod", "txt_norm1", "attn/add_q_proj", "attn/add_k_proj", "attn/add_v_proj",
                       "attn/norm_added_q", "attn/norm_added_k")
    # The last block's text output is unused, so export/folding removes its to_add_out, txt_norm2 and txt_mlp.
    expected = {0: (*feeds_attention, "attn/to_add_out", "txt_norm2", "txt_mlp"), 1: feeds_attention}
    for block, parts in expected.items():
        for part in parts:
            assert any(m.startswith(f"/transformer_blocks/{block}/{part}") for m in modules), (block, part)
    assert any(m.startswith("/txt_norm") for m in modules) and any(m.startswith("/txt_in") for m in modules)
    image_side = [n for n in report["frozen_nodes"] if re.search(r"/(img_|to_q|to_k|to_v|to_out|norm_q|norm_k)", n)]
    assert image_side == []


def test_surgery_output_still_matches_export(surgery_output: tuple[Path, dict], exported_onnx: Path) -> None:
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    feed = qwen_image.transformer_engine_inputs(
        rng.standard_normal((1, 64, 16)), rng.standard_normal((1, 256, 16)), np.ones((1, 256)), [0.5], [(1, 8, 8)],
        axes_dims_rope=(8, 4, 4))
    outputs = [ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]).run(None, feed)[0]
               for p in (exported_onnx, surgery_output[0])]
    np.testing.assert_allclose(outputs[1], outputs[0], atol=1e-5, rtol=1e-5)


def text_model(text_dim: int | str) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("encoder_hidden_states", onnx.TensorProto.FLOAT, ["batch", text_dim, 4])
    y = helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, None)
    node = helper.make_node("Relu", ["encoder_hidden_states"], ["out"], name="/txt_in/Relu_0")
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=[helper.make_opsetid("", 20)])


def test_fix_text_padding_pins_a_symbolic_text_axis(tmp_path: Path) -> None:
    stage = GraphSurgery("transformer", tmp_path / "m.onnx", ("fix_text_padding",), 77)
    model, details = fix_text_padding(stage, text_model("text_len"))
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    assert dim.dim_value == 77 and details["pinned_inputs"] == {"encoder_hidden_states": "text_len"}
    out_dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim][1:]
    assert out_dims == [77, 4]


def test_fix_text_padding_refuses_a_different_static_length(tmp_path: Path) -> None:
    stage = GraphSurgery("transformer", tmp_path / "m.onnx", ("fix_text_padding",), 77)
    with pytest.raises(ForgeError, match="text axis is 64, recipe text_length needs 77"):
        fix_text_padding(stage, text_model(64))


def test_freeze_refuses_a_graph_without_module_names(tmp_path: Path) -> None:
    model = text_model(8)
    model.graph.node[0].name = "node_relu"
    stage = GraphSurgery("transformer", tmp_path / "m.onnx", ("freeze_text_branch",), 8)
    with pytest.raises(ForgeError, match="no text-branch nodes"):
        freeze_text_branch(stage, model)


def test_dropping_the_softmax_nan_guard_changes_no_output(surgery_output: tuple[Path, dict], exported_onnx: Path,
                                                          tmp_path: Path) -> None:
    """Every attention's `Where(IsNaN(p), 0, p)` goes (one per block) and the outputs stay bit for bit: the masks are
    finite, so no softmax row is NaN."""
    import numpy as np

    from stages.graphs.runners import onnxruntime_session

    passes = ("fold_constants", "infer_shapes", "fix_text_padding", "drop_softmax_nan_guard", "freeze_text_branch",
              "cleanup")
    report = GraphSurgery("transformer", exported_onnx, passes, 256)(tmp_path)
    graph = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False).graph
    guarded = onnx.load(str(surgery_output[0]), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert report["passes"][3]["guards_dropped"] == 2 == sum(n.op_type == "IsNaN" for n in guarded.node)
    assert "IsNaN" not in ops and ops.count("Where") == sum(n.op_type == "Where" for n in guarded.node) - 2
    assert report["frozen_nodes"] == surgery_output[1]["frozen_nodes"]
    rng = np.random.default_rng(1)
    feed = qwen_image.transformer_engine_inputs(
        rng.standard_normal((1, 64, 16)), rng.standard_normal((1, 256, 16)), (np.arange(256) < 40)[None].astype(float),
        [0.7], [(1, 8, 8)], axes_dims_rope=(8, 4, 4))
    with_guard, without = (onnxruntime_session(p, optimize=False).run(None, feed)[0]
                           for p in (surgery_output[0], tmp_path / "model.onnx"))
    assert np.array_equal(with_guard, without) and np.isfinite(without).all()
