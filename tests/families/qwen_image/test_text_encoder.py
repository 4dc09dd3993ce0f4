"""The text-encoder engine contract against stock transformers and diffusers on the tiny Qwen2.5-VL model.

References are computed independently: the full ``Qwen2_5_VLForConditionalGeneration`` called as
QwenImagePipeline calls it, a real ``QwenImagePipeline._get_qwen_prompt_embeds``, and ONNX Runtime running the
graph exported with the dynamo exporter exactly as the export stage does.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from stages.families.qwen_image import text_encoder as te
from stages.families.qwen_image import tokenizer as qt
from stages.families.qwen_image.transformer import TINY_TRANSFORMER_CONFIG

TEXT_LENGTH = 32
LENGTH = TEXT_LENGTH + 34
PROMPTS = [
    "Hello world",
    "一只橘猫坐在窗台上，窗外是下雪的城市夜景。",
    'A neon sign that reads "OPEN 24 HOURS".',
]
LONG_PROMPT = "海浪拍打着礁石，灯塔在夕阳下闪光。" * 6


@pytest.fixture(scope="module")
def model() -> Qwen2_5_VLForConditionalGeneration:
    return te.make_tiny_text_encoder(seed=0)


@pytest.fixture(scope="module")
def tokenizer() -> Qwen2Tokenizer:
    return qt.build_qwen_tokenizer()


@pytest.fixture(scope="module")
def checkpoint(model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A diffusers-layout tiny checkpoint: text_encoder/ and tokenizer/ side by side."""
    root = tmp_path_factory.mktemp("checkpoint")
    model.save_pretrained(root / te.TEXT_ENCODER_SUBFOLDER)
    tokenizer.save_pretrained(root / qt.TOKENIZER_SUBFOLDER)
    return root


@pytest.fixture(scope="module")
def loaded(checkpoint: Path) -> Qwen2_5_VLForConditionalGeneration:
    return te.load(checkpoint)


@pytest.fixture(scope="module")
def session(model: Qwen2_5_VLForConditionalGeneration, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The graph as the export stage makes it (dynamo exporter, kwargs, dynamic batch), in ONNX Runtime on CPU."""
    import onnxruntime

    from stages.export import export_program

    program, _ = export_program(te, model, TEXT_LENGTH, 20)
    path = tmp_path_factory.mktemp("onnx") / "model.onnx"
    program.save(str(path))
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def pipeline(model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer) -> Any:
    """A real QwenImagePipeline; only its text path runs, so it needs no VAE or transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model, tokenizer=tokenizer, transformer=None
    )


def pipeline_hidden_states(model: Qwen2_5_VLForConditionalGeneration, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states[-1]


def padded_mask(side: str) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, qt.QWEN_BPE_RANKS, (2, LENGTH), generator=generator)
    attention_mask = torch.ones(2, LENGTH, dtype=torch.int64)
    if side == "right":
        attention_mask[1, 45:] = 0
    else:
        attention_mask[1, :21] = 0
    return input_ids, attention_mask


def test_tiny_config_has_qwen_vocabulary_and_transformer_width(model: Qwen2_5_VLForConditionalGeneration) -> None:
    text_config = model.config.text_config
    assert text_config.vocab_size == 152064
    assert text_config.hidden_size == TINY_TRANSFORMER_CONFIG["joint_attention_dim"]
    assert text_config.num_key_value_heads < text_config.num_attention_heads
    assert model.get_input_embeddings().weight.shape == (152064, 16)


def test_tiny_model_is_deterministic_from_seed(model: Qwen2_5_VLForConditionalGeneration) -> None:
    same, other = te.make_tiny_text_encoder(seed=0), te.make_tiny_text_encoder(seed=1)
    reference = model.state_dict()
    assert all(torch.equal(tensor, reference[name]) for name, tensor in same.state_dict().items())
    assert not torch.equal(other.state_dict()["model.language_model.layers.0.self_attn.q_proj.weight"],
                           reference["model.language_model.layers.0.self_attn.q_proj.weight"])


def test_load_reads_checkpoint_in_fp32_eval(
    model: Qwen2_5_VLForConditionalGeneration, loaded: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer
) -> None:
    assert loaded.dtype == torch.float32 and not loaded.training
    input_ids, attention_mask, _ = qt.tokenize_prompts(tokenizer, PROMPTS, TEXT_LENGTH)
    assert torch.equal(pipeline_hidden_states(loaded, input_ids, attention_mask), pipeline_hidden_states(model, input_ids, attention_mask))


def test_load_reads_released_bf16_layout(model: Qwen2_5_VLForConditionalGeneration, checkpoint: Path, tmp_path: Path) -> None:
    """Qwen-Image ships a flat transformers-4 config (rope_scaling type mrope) with bf16 weights."""
    config = json.loads((checkpoint / "text_encoder" / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters")
    flat = {**config, **text, "model_type": "qwen2_5_vl", "torch_dtype": "bfloat16", "rope_theta": rope["rope_theta"],
            "rope_scaling": {"type": "mrope", "mrope_section": rope["mrope_section"]}}
    target = tmp_path / "text_encoder"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(flat))
    weights = load_file(checkpoint / "text_encoder" / "model.safetensors")
    save_file({name: tensor.bfloat16() for name, tensor in weights.items()}, target / "model.safetensors", metadata={"format": "pt"})
    loaded = te.load(tmp_path)
    assert loaded.dtype == torch.float32
    expected = {name: tensor.bfloat16().float() for name, tensor in model.state_dict().items()}
    assert all(torch.equal(tensor, expected[name]) for name, tensor in loaded.state_dict().items())


@pytest.mark.parametrize("side", ["right", "left"])
def test_positions_equal_what_transformers_computes(model: Qwen2_5_VLForConditionalGeneration, side: str) -> None:
    captured: dict[str, torch.Tensor] = {}
    rotary = model.model.language_model.rotary_emb
    handle = rotary.register_forward_hook(lambda module, args, output: captured.__setitem__("positions", args[1]))
    input_ids, attention_mask = padded_mask(side)
    try:
        pipeline_hidden_states(model, input_ids, attention_mask)
    finally:
        handle.remove()
    assert torch.equal(te.text_position_ids(attention_mask), captured["positions"].expand(3, -1, -1))


@pytest.mark.parametrize("side", ["right", "left"])
def test_export_wrapper_equals_pipeline_hidden_states(model: Qwen2_5_VLForConditionalGeneration, side: str) -> None:
    input_ids, attention_mask = padded_mask(side)
    with te.export_wrapper(model) as wrapper, torch.no_grad():
        ours = wrapper(input_ids, attention_mask)
    torch.testing.assert_close(ours, pipeline_hidden_states(model, input_ids, attention_mask), atol=1e-6, rtol=0)


def test_onnx_signature(session: Any) -> None:
    inputs = {item.name: item for item in session.get_inputs()}
    assert list(inputs) == te.INPUT_NAMES
    for item in inputs.values():
        assert item.type == "tensor(int64)"
        assert isinstance(item.shape[0], str) and item.shape[1] == LENGTH
    (output,) = session.get_outputs()
    assert output.name == "hidden_states" and output.shape[1:] == [LENGTH, 16]


@pytest.mark.parametrize("prompts", [PROMPTS[:1], PROMPTS + [LONG_PROMPT]], ids=["batch1", "batch4"])
def test_onnx_matches_pytorch(session: Any, model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer, prompts: list[str]) -> None:
    input_ids, attention_mask, _ = qt.tokenize_prompts(tokenizer, prompts, TEXT_LENGTH)
    (ours,) = session.run(None, te.text_encoder_engine_inputs(input_ids, attention_mask))
    np.testing.assert_allclose(ours, pipeline_hidden_states(model, input_ids, attention_mask).numpy(), atol=1e-5, rtol=0)


def test_prompt_embeds_match_diffusers_with_fixed_padding(
    pipeline: Any, session: Any, model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer
) -> None:
    """diffusers pads to the batch's longest prompt; fixed padding must give the same real tokens, then zeros."""
    expected, expected_mask = pipeline._get_qwen_prompt_embeds(PROMPTS, device=torch.device("cpu"), dtype=torch.float32)
    longest = expected.shape[1]
    assert longest < TEXT_LENGTH
    input_ids, attention_mask, _ = qt.tokenize_prompts(tokenizer, PROMPTS, TEXT_LENGTH)
    (onnx_hidden,) = session.run(None, te.text_encoder_engine_inputs(input_ids, attention_mask))
    for hidden in (pipeline_hidden_states(model, input_ids, attention_mask), torch.from_numpy(onnx_hidden)):
        embeds, mask = te.prompt_embeds_from_hidden_states(hidden, attention_mask, TEXT_LENGTH)
        assert embeds.shape == (3, TEXT_LENGTH, 16) and mask.shape == (3, TEXT_LENGTH)
        torch.testing.assert_close(embeds[:, :longest], expected.detach(), atol=1e-5, rtol=0)
        assert torch.equal(mask[:, :longest], expected_mask)
        assert not embeds[:, longest:].any() and not mask[:, longest:].any()


def test_truncation_matches_diffusers(pipeline: Any, model: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer) -> None:
    pipeline.tokenizer_max_length = TEXT_LENGTH
    try:
        expected, expected_mask = pipeline._get_qwen_prompt_embeds([LONG_PROMPT, PROMPTS[0]], device=torch.device("cpu"))
    finally:
        pipeline.tokenizer_max_length = 1024
    embeds, mask, truncated = te.encode_prompts(model, tokenizer, [LONG_PROMPT, PROMPTS[0]], TEXT_LENGTH)
    assert truncated[0] > 0 and truncated[1] == 0
    torch.testing.assert_close(embeds, expected.detach(), atol=1e-6, rtol=0)
    assert torch.equal(mask, expected_mask)


def test_prompt_template_constants_match_pipeline(pipeline: Any) -> None:
    assert pipeline.prompt_template_encode == qt.PROMPT_TEMPLATE
    assert pipeline.prompt_template_encode_start_idx == qt.PROMPT_TEMPLATE_DROP


def test_prompt_embeds_follow_diffusers_for_any_mask(pipeline: Any) -> None:
    """Left padding and holes too, against the pipeline's own gather (_extract_masked_hidden), drop and re-pad."""
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(3, LENGTH, 16, generator=generator)
    mask = torch.ones(3, LENGTH, dtype=torch.int64)
    mask[0, 50:] = 0
    mask[1, :9] = 0
    mask[2, ::3] = 0
    pieces = [piece[qt.PROMPT_TEMPLATE_DROP :] for piece in pipeline._extract_masked_hidden(hidden, mask)]
    expected = torch.stack([torch.cat([piece, piece.new_zeros(TEXT_LENGTH - len(piece), 16)]) for piece in pieces])
    embeds, embeds_mask = te.prompt_embeds_from_hidden_states(hidden, mask, TEXT_LENGTH)
    assert torch.equal(embeds, expected)
    assert embeds_mask.sum(dim=1).tolist() == [len(piece) for piece in pieces]
    numpy_embeds, numpy_mask = te.prompt_embeds_from_hidden_states(hidden.numpy(), mask.numpy(), TEXT_LENGTH)
    assert isinstance(numpy_embeds, np.ndarray) and np.array_equal(numpy_embeds, expected.numpy())
    assert np.array_equal(numpy_mask, embeds_mask.numpy())


def test_prompt_embeds_reject_wrong_shapes() -> None:
    hidden = torch.zeros(2, LENGTH, 16)
    with pytest.raises(ValueError, match="hidden_states"):
        te.prompt_embeds_from_hidden_states(hidden, torch.ones(2, LENGTH), TEXT_LENGTH + 1)
    with pytest.raises(ValueError, match="attention_mask"):
        te.prompt_embeds_from_hidden_states(hidden, torch.ones(3, LENGTH), TEXT_LENGTH)


def test_shapes_for_export_and_engine_profile(model: Qwen2_5_VLForConditionalGeneration) -> None:
    inputs = te.example_inputs(model, TEXT_LENGTH)
    assert list(inputs) == te.INPUT_NAMES
    assert inputs["input_ids"].shape == (2, LENGTH) and inputs["attention_mask"][1, -1] == 0
    assert set(te.dynamic_shapes()) == set(te.INPUT_NAMES)
    profile = SimpleNamespace(batch=SimpleNamespace(min=1, opt=2, max=4))
    expected = [(1, LENGTH), (2, LENGTH), (4, LENGTH)]
    assert te.profile_shapes(profile, TEXT_LENGTH, {}) == {"input_ids": expected, "attention_mask": expected}


def test_engine_inputs_are_int64_and_checked() -> None:
    feed = te.text_encoder_engine_inputs(torch.ones(2, LENGTH, dtype=torch.int32), [[1] * LENGTH, [0] * LENGTH])
    assert all(array.dtype == np.int64 and array.shape == (2, LENGTH) for array in feed.values())
    with pytest.raises(ValueError, match="attention_mask"):
        te.text_encoder_engine_inputs(np.ones((2, LENGTH)), np.ones((2, LENGTH - 1)))


def test_validation_cases_run_through_onnx(session: Any, loaded: Qwen2_5_VLForConditionalGeneration, tokenizer: Qwen2Tokenizer) -> None:
    """The validate stage's path: the checkpoint's tokenizer, real prompts, the fp32 reference, ONNX Runtime."""
    settings = SimpleNamespace(batch=2, seed=0, text_tokens=[20, 3])
    cases = te.validation_cases(loaded, settings, TEXT_LENGTH)
    english_ids, _, _ = qt.tokenize_prompts(tokenizer, te.ENGLISH_PROMPTS[:2], TEXT_LENGTH)
    assert np.array_equal(cases[0]["feed"]["input_ids"], english_ids.numpy())
    descriptions = " | ".join(case["description"] for case in cases)
    for word in ("English", "Chinese", "rendered-text", "longer than text_length", "random vocabulary"):
        assert word in descriptions
    for case in cases:
        assert set(case["feed"]) == set(te.INPUT_NAMES)
        assert case["feed"]["input_ids"].shape == (2, LENGTH)
        reference = te.reference_outputs(loaded, case)["hidden_states"]
        (ours,) = session.run(None, case["feed"])
        np.testing.assert_allclose(ours, reference, atol=1e-5, rtol=0)
    random_case = cases[-1]
    real_tokens = random_case["feed"]["attention_mask"].sum(axis=1) - qt.PROMPT_TEMPLATE_DROP
    assert real_tokens.tolist() == settings.text_tokens
    long_case = next(case for case in cases if "longer" in case["description"])
    assert long_case["feed"]["attention_mask"][0].all()
