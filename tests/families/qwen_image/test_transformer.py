from __future__ import annotations

import numpy as np
import pytest
import torch

import diffusers.models.transformers.transformer_qwenimage as stock
from stages.families.qwen_image import transformer as qwen_image


@pytest.fixture(scope="module")
def model() -> stock.QwenImageTransformer2DModel:
    return qwen_image.make_tiny_transformer(seed=0)


def diffusers_call(model: stock.QwenImageTransformer2DModel, batch: int, patches: tuple[int, int],
                   text_length: int, real_tokens: list[int]) -> dict:
    generator = torch.Generator().manual_seed(batch * 100 + patches[0])
    mask = torch.zeros(batch, text_length, dtype=torch.int64)
    for index in range(batch):
        mask[index, : real_tokens[index]] = 1
    return {
        "hidden_states": torch.randn(batch, patches[0] * patches[1], model.config.in_channels, generator=generator),
        "encoder_hidden_states": torch.randn(batch, text_length, model.config.joint_attention_dim, generator=generator),
        "encoder_hidden_states_mask": mask,
        "timestep": torch.linspace(0.2, 1.0, batch),
        "img_shapes": [(1, *patches)] * batch,
    }


def test_tiny_model_is_the_real_class_and_deterministic() -> None:
    first, second = qwen_image.make_tiny_transformer(3), qwen_image.make_tiny_transformer(3)
    assert type(first) is stock.QwenImageTransformer2DModel
    for a, b in zip(first.parameters(), second.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(next(first.parameters()), next(qwen_image.make_tiny_transformer(4).parameters()))


def test_real_rope_equals_complex_rope(model: stock.QwenImageTransformer2DModel) -> None:
    img_freqs, _ = model.pos_embed([(1, 6, 10)], max_txt_seq_len=5, device=torch.device("cpu"))
    x = torch.randn(2, 60, 3, 16)
    expected = stock.apply_rotary_emb_qwen(x, img_freqs, use_real=False)
    actual = qwen_image.apply_real_rope(x, (img_freqs.real, img_freqs.imag))
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize(("batch", "patches"), [(1, (8, 8)), (2, (6, 10))])
def test_engine_signature_matches_stock_forward(model: stock.QwenImageTransformer2DModel, batch: int,
                                                patches: tuple[int, int]) -> None:
    call = diffusers_call(model, batch, patches, text_length=12, real_tokens=[12, 5])
    with torch.no_grad():
        expected = model(**call, return_dict=False)[0]
        feed = qwen_image.transformer_engine_inputs(**call, axes_dims_rope=model.config.axes_dims_rope)
        with qwen_image.export_wrapper(model) as wrapper:
            actual = wrapper(**{name: torch.from_numpy(feed[name]) for name in qwen_image.INPUT_NAMES})
    torch.testing.assert_close(actual, expected, atol=2e-6, rtol=1e-5)
    assert stock.apply_rotary_emb_qwen is not qwen_image.apply_real_rope, "export_wrapper must restore diffusers"


def test_padding_is_masked_like_diffusers(model: stock.QwenImageTransformer2DModel) -> None:
    """Extra padded tokens (fixed padding) must not change the image output."""
    call = diffusers_call(model, 1, (6, 6), text_length=8, real_tokens=[5])
    padded = dict(call)
    padded["encoder_hidden_states"] = torch.cat([call["encoder_hidden_states"], torch.randn(1, 24, 16)], dim=1)
    padded["encoder_hidden_states_mask"] = torch.cat([call["encoder_hidden_states_mask"],
                                                      torch.zeros(1, 24, dtype=torch.int64)], dim=1)
    with torch.no_grad(), qwen_image.export_wrapper(model) as wrapper:
        outputs = []
        for variant in (call, padded):
            feed = qwen_image.transformer_engine_inputs(**variant, axes_dims_rope=model.config.axes_dims_rope)
            outputs.append(wrapper(**{n: torch.from_numpy(feed[n]) for n in qwen_image.INPUT_NAMES}))
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)


def test_feed_function_rejects_mixed_image_shapes(model: stock.QwenImageTransformer2DModel) -> None:
    call = diffusers_call(model, 2, (4, 4), text_length=4, real_tokens=[4, 4])
    call["img_shapes"] = [(1, 4, 4), (1, 2, 8)]
    with pytest.raises(ValueError, match="img_shapes"):
        qwen_image.transformer_engine_inputs(**call)


def test_profile_shapes_follow_pixels(model: stock.QwenImageTransformer2DModel) -> None:
    from stages.recipe.load import load_recipe

    profile = load_recipe("a10-fp16").recipe.components["transformer"].profile
    shapes = qwen_image.profile_shapes(profile, 256, dict(model.config))
    # opt 1328x1328; max the largest native area (1328x1328), not height.max x width.max (1664x1664)
    assert shapes["hidden_states"] == [(1, 32 * 32, 16), (1, 83 * 83, 16), (2, 83 * 83, 16)]
    assert shapes["img_rope_cos"][2] == (83 * 83, 8)
    assert shapes["encoder_hidden_states_mask"][0] == (1, 256)


def test_validation_cases_pad_and_cover_sizes(model: stock.QwenImageTransformer2DModel) -> None:
    from stages.recipe.load import load_recipe

    settings = load_recipe("a10-fp16").recipe.components["transformer"].validate_
    cases = qwen_image.validation_cases(model, settings, 256)
    assert len(cases) == len(settings.sizes) * len(settings.timesteps)
    tokens = {case["feed"]["hidden_states"].shape[1] for case in cases}
    assert tokens == {32 * 32, 58 * 104}, "512x512 and the native 928x1664"
    mask = cases[0]["feed"]["encoder_hidden_states_mask"]
    assert mask.sum(axis=1).tolist() == settings.text_tokens
    rope = cases[0]["feed"]
    assert np.allclose(rope["img_rope_cos"] ** 2 + rope["img_rope_sin"] ** 2, 1.0, atol=1e-6)


def test_feed_function_accepts_the_pipelines_nested_img_shapes(model: stock.QwenImageTransformer2DModel) -> None:
    call = diffusers_call(model, 2, (4, 6), text_length=4, real_tokens=[4, 2])
    flat = qwen_image.transformer_engine_inputs(**call, axes_dims_rope=model.config.axes_dims_rope)
    call["img_shapes"] = [[(1, 4, 6)], [(1, 4, 6)]]
    nested = qwen_image.transformer_engine_inputs(**call, axes_dims_rope=model.config.axes_dims_rope)
    for name in qwen_image.INPUT_NAMES:
        np.testing.assert_array_equal(nested[name], flat[name])
