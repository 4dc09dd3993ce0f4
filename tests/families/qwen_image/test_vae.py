"""VAE decoder component: one dynamic ONNX graph against diffusers' own decode and the pipeline's post-loop code.

References are computed without the export wrapper: the stock `vae.decode` after the pipeline's own
de-normalisation lines, and a real QwenImagePipeline run (tiny transformer + tiny VAE, precomputed prompt
embeddings), so a wrong de-normalisation direction, a lost frame slice or a shape specialised at export fails.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from stages.families.qwen_image import vae as qwen_vae

ATOL = 1e-4


@pytest.fixture(scope="module")
def tiny_vae() -> Any:
    return qwen_vae.make_tiny_vae(0)


@pytest.fixture(scope="module")
def onnx_path(tiny_vae: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Exported by the export stage's own tracing function (the one path every component takes)."""
    from stages.export import export_program

    path = tmp_path_factory.mktemp("vae_export") / "model.onnx"
    program, _ = export_program(qwen_vae, tiny_vae, text_length=256, opset=20)
    program.save(str(path))
    return path


@pytest.fixture(scope="module")
def session(onnx_path: Path) -> Any:
    import onnxruntime

    return onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])


def test_graph_io_is_symbolic_in_batch_height_width(onnx_path: Path) -> None:
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    latents = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    image = [d.dim_param or d.dim_value for d in graph.output[0].type.tensor_type.shape.dim]
    assert [v.name for v in graph.input] == qwen_vae.INPUT_NAMES
    assert [v.name for v in graph.output] == qwen_vae.OUTPUT_NAMES
    assert latents[1:3] == [4, 1] and all(isinstance(d, str) for d in (latents[0], latents[3], latents[4]))
    assert image[1] == 3 and all(isinstance(d, str) for d in (image[0], image[2], image[3]))
    ops = [node.op_type for node in graph.node]
    assert ops.count("Resize") == 3, "each upsampler must be an index-free Resize"
    assert "GatherND" not in ops and "Range" not in ops, "float index arithmetic would be lowered by AutoCast"


def test_export_wrapper_restores_the_model(tiny_vae: Any) -> None:
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageUpsample

    latents = torch.randn(1, 4, 1, 5, 7, generator=torch.Generator().manual_seed(2))
    expected = qwen_vae.reference_outputs(tiny_vae, {"call": {"latents": latents}})["image"]
    tiny_vae.enable_tiling(tile_sample_min_height=16, tile_sample_min_width=16,
                           tile_sample_stride_height=8, tile_sample_stride_width=8)
    try:
        with qwen_vae.export_wrapper(tiny_vae) as wrapper, torch.no_grad():
            modes = {m.mode for m in tiny_vae.modules() if isinstance(m, QwenImageUpsample)}
            image = wrapper(latents).numpy()
        assert modes == {"nearest"} and not wrapper.training
        np.testing.assert_array_equal(image, expected)
        assert tiny_vae.use_tiling
        assert {m.mode for m in tiny_vae.modules() if isinstance(m, QwenImageUpsample)} == {"nearest-exact"}
    finally:
        tiny_vae.disable_tiling()


def test_onnx_matches_stock_decode_at_two_sizes(tiny_vae: Any, session: Any) -> None:
    settings = SimpleNamespace(sizes=[[64, 96], [128, 80]], batch=2, seed=5)
    cases = qwen_vae.validation_cases(tiny_vae, settings, text_length=256)
    cases.append({"call": {"latents": torch.randn(1, 4, 1, 6, 4)}})
    cases[-1]["feed"] = qwen_vae.vae_decoder_engine_inputs(cases[-1]["call"]["latents"])
    for case, (batch, height, width) in zip(cases, [(2, 64, 96), (2, 128, 80), (1, 48, 32)]):
        expected = qwen_vae.reference_outputs(tiny_vae, case)["image"]
        (image,) = session.run(None, case["feed"])
        assert image.shape == expected.shape == (batch, 3, height, width)
        assert 0.05 < float(np.abs(expected).mean()) and float(np.abs(expected).max()) <= 1.0
        np.testing.assert_allclose(image, expected, atol=ATOL, rtol=0)


def test_engine_reproduces_the_pipeline_image(tiny_vae: Any, session: Any) -> None:
    """Packed loop latents -> feed -> graph -> postprocess equals QwenImagePipeline's own image output."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    from stages.families.qwen_image.transformer import make_tiny_transformer

    pipe = QwenImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae, text_encoder=None,
                             tokenizer=None, transformer=make_tiny_transformer(0))
    pipe.set_progress_bar_config(disable=True)
    call = {"prompt_embeds": torch.randn(2, 7, 16, generator=torch.Generator().manual_seed(1)),
            "prompt_embeds_mask": torch.ones(2, 7, dtype=torch.int64), "height": 64, "width": 96,
            "num_inference_steps": 2, "true_cfg_scale": 1.0}
    packed = pipe(**call, output_type="latent", generator=torch.Generator().manual_seed(3)).images
    expected = pipe(**call, output_type="pt", generator=torch.Generator().manual_seed(3)).images
    feed = qwen_vae.vae_decoder_engine_inputs(packed, 64, 96, pipe.vae_scale_factor)
    (image,) = session.run(None, feed)
    produced = pipe.image_processor.postprocess(torch.from_numpy(image), output_type="pt")
    assert packed.ndim == 3 and produced.shape == expected.shape == (2, 3, 64, 96)
    torch.testing.assert_close(produced, expected, atol=ATOL, rtol=0)


def test_denormalisation_is_the_pipelines_formula(tiny_vae: Any) -> None:
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline

    source = inspect.getsource(QwenImagePipeline.__call__)
    assert "latents_std = 1.0 / torch.tensor(self.vae.config.latents_std)" in source
    assert "latents = latents / latents_std + latents_mean" in source

    mean = np.array(qwen_vae.TINY_VAE_CONFIG["latents_mean"]).reshape(1, 4, 1, 1, 1)
    std = np.array(qwen_vae.TINY_VAE_CONFIG["latents_std"]).reshape(1, 4, 1, 1, 1)
    latents = torch.randn(3, 4, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    with qwen_vae.export_wrapper(tiny_vae) as wrapper:
        denormalized = wrapper.denormalize(latents)
    np.testing.assert_allclose(denormalized.numpy(), latents.double().numpy() * std + mean, atol=1e-6, rtol=0)
    np.testing.assert_allclose(denormalized.mean(dim=(0, 2, 3, 4)).numpy(), mean.ravel(), atol=0.12)
    np.testing.assert_allclose(denormalized.std(dim=(0, 2, 3, 4)).numpy(), std.ravel(), rtol=0.03)
    inverse_std = 1.0 / torch.tensor(qwen_vae.TINY_VAE_CONFIG["latents_std"]).view(1, 4, 1, 1, 1)
    assert torch.equal(denormalized, latents / inverse_std + torch.tensor(mean, dtype=torch.float32))


def test_tiny_vae_is_deterministic_from_seed() -> None:
    torch.manual_seed(123)
    before = torch.rand(1)
    first, again, other = qwen_vae.make_tiny_vae(0), qwen_vae.make_tiny_vae(0), qwen_vae.make_tiny_vae(1)
    torch.manual_seed(123)
    assert torch.equal(before, torch.rand(1)), "make_tiny_vae must not reset the caller's RNG"
    a, b, c = first.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert first.config.z_dim == 4 and first.spatial_compression_ratio == 8


def test_load_from_saved_checkpoint(tiny_vae: Any, tmp_path: Path) -> None:
    tiny_vae.save_pretrained(tmp_path / qwen_vae.CHECKPOINT_SUBFOLDER, safe_serialization=True)
    loaded = qwen_vae.load(tmp_path)
    assert not loaded.training and loaded.dtype == torch.float32
    assert list(loaded.config.latents_std) == qwen_vae.TINY_VAE_CONFIG["latents_std"]
    saved = tiny_vae.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in loaded.state_dict().items())
    case = {"call": {"latents": torch.randn(1, 4, 1, 4, 6)}}
    np.testing.assert_array_equal(qwen_vae.reference_outputs(loaded, case)["image"],
                                  qwen_vae.reference_outputs(tiny_vae, case)["image"])
    with pytest.raises(FileNotFoundError, match="checkpoint_dir: .* has no vae/config.json"):
        qwen_vae.load(tmp_path / "missing")


def test_profile_shapes_follow_the_vae_compression() -> None:
    level = lambda lo, opt, hi: SimpleNamespace(min=lo, opt=opt, max=hi)  # noqa: E731
    profile = SimpleNamespace(batch=level(1, 1, 2), height=level(512, 1024, 1024), width=level(256, 768, 1536))
    released = {"z_dim": 16, "temperal_downsample": [False, True, True]}
    assert qwen_vae.profile_shapes(profile, 256, released) == {
        "latents": [(1, 16, 1, 64, 32), (1, 16, 1, 128, 96), (2, 16, 1, 128, 192)]
    }
    with pytest.raises(ValueError, match="width: 100 px is not a multiple of the VAE's spatial compression 8"):
        qwen_vae.latent_shape(1, 64, 100, released)


def test_feed_accepts_packed_unpacked_and_4d_latents() -> None:
    unpacked = torch.randn(2, 4, 1, 8, 12)
    packed = unpacked.squeeze(2).view(2, 4, 4, 2, 6, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 24, 16)
    from_packed = qwen_vae.vae_decoder_engine_inputs(packed, height=64, width=96)["latents"]
    np.testing.assert_array_equal(from_packed, unpacked.numpy())
    np.testing.assert_array_equal(qwen_vae.vae_decoder_engine_inputs(unpacked.squeeze(2).numpy())["latents"],
                                  unpacked.numpy())
    with pytest.raises(ValueError, match="height/width"):
        qwen_vae.vae_decoder_engine_inputs(packed)
    with pytest.raises(ValueError, match="axis 2 must be 1"):
        qwen_vae.vae_decoder_engine_inputs(torch.randn(1, 4, 2, 8, 8))
