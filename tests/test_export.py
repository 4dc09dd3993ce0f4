from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from stages.export import name_nodes_by_module
from stages.families.qwen_image import transformer as qwen_image


@pytest.fixture(scope="module")
def session(exported_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(exported_onnx), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(("batch", "patches", "tokens"), [(1, (32, 32), [256]), (2, (24, 40), [9, 200])])
def test_one_graph_serves_profile_sizes_and_batches(session: ort.InferenceSession, tiny_checkpoint: Path,
                                                    batch: int, patches: tuple[int, int], tokens: list[int]) -> None:
    model = qwen_image.load(tiny_checkpoint)
    generator = torch.Generator().manual_seed(7)
    mask = torch.zeros(batch, 256, dtype=torch.int64)
    for index, count in enumerate(tokens):
        mask[index, :count] = 1
    call = {
        "hidden_states": torch.randn(batch, patches[0] * patches[1], 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 256, 16, generator=generator),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.full((batch,), 0.7),
        "img_shapes": [(1, *patches)] * batch,
    }
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0].numpy()
    feed = qwen_image.transformer_engine_inputs(**call, axes_dims_rope=model.config.axes_dims_rope)
    (actual,) = session.run(None, feed)
    np.testing.assert_allclose(actual, expected, atol=2e-5, rtol=1e-4)


def test_graph_contract(exported_onnx: Path) -> None:
    graph = onnx.load(str(exported_onnx), load_external_data=False).graph
    assert [i.name for i in graph.input] == qwen_image.INPUT_NAMES
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert dims["encoder_hidden_states"][1:] == [256, 16]
    assert isinstance(dims["hidden_states"][0], str) and isinstance(dims["hidden_states"][1], str)
    names = [node.name for node in graph.node]
    assert len(set(names)) == len(names)
    assert any(name.startswith("/transformer_blocks/1/attn/add_q_proj/") for name in names)
    assert not any(node.metadata_props and any(p.key.endswith("stack_trace") for p in node.metadata_props)
                   for node in graph.node)


def test_names_follow_module_scopes() -> None:
    import onnx_ir as ir

    node = ir.Node("", "MatMul", inputs=[], num_outputs=1)
    node.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'model', 'model.transformer_blocks.0.txt_mlp', 'linear']"
    node.metadata_props["pkg.torch.onnx.stack_trace"] = "File x"
    other = ir.Node("", "MatMul", inputs=[], num_outputs=1)
    other.metadata_props["pkg.torch.onnx.name_scopes"] = "['', 'model', 'model.transformer_blocks.0.txt_mlp', 'l2']"
    model = ir.Model(ir.Graph(inputs=[], outputs=[], nodes=[node, other]), ir_version=10)
    assert name_nodes_by_module(model) == 2
    assert [node.name, other.name] == ["/transformer_blocks/0/txt_mlp/MatMul_0", "/transformer_blocks/0/txt_mlp/MatMul_1"]
    assert "pkg.torch.onnx.stack_trace" not in node.metadata_props


def test_export_leaves_the_optimiser_rules_as_it_found_them() -> None:
    """The two-node rewrite rule (quadratic in layers) is left out only while the forge's export optimises."""
    from onnxscript import rewriter

    from stages.export import _single_node_rewrites_only

    before = rewriter._DEFAULT_REWRITE_RULES
    with _single_node_rewrites_only():
        inside = rewriter._DEFAULT_REWRITE_RULES
        assert inside and all(rule._target_pattern.has_single_output_node for rule in inside)
        assert len(inside) < len(before)
    assert rewriter._DEFAULT_REWRITE_RULES is before
