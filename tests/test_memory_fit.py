"""stages/targets/memory_fit.py against numbers computed independently, from real safetensors files written here."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stages.families.qwen_image.fit import engine_weight_bytes
from stages.targets import memory_fit
from stages.targets.memory_fit import GIB, PrecisionPlan


def family_module(new: str, old: str) -> object:
    """A Qwen-Image model module, wherever the refactor has put it."""
    try:
        return importlib.import_module(f"stages.families.qwen_image.{new}")
    except ModuleNotFoundError:
        return importlib.import_module(f"stages.models.{old}")


def known_gpus() -> dict[str, tuple[int, int]]:
    for module in ("stages.targets.gpus", "stages.targets.capabilities"):
        try:
            return importlib.import_module(module).GPUS
        except (ImportError, AttributeError):
            continue
    raise AssertionError("no GPUS table found")


@pytest.fixture
def transformer_dir(tmp_path: Path) -> dict[str, torch.Tensor]:
    """Two shards in bf16 plus one fp32 tensor and one int64 buffer, like a mixed checkpoint."""
    tensors = {
        "blocks.0.attn.to_q.weight": torch.zeros(64, 32, dtype=torch.bfloat16),
        "blocks.0.attn.to_q.bias": torch.zeros(64, dtype=torch.bfloat16),
        "blocks.0.norm_q.weight": torch.zeros(32, dtype=torch.bfloat16),
        "blocks.0.txt_mlp.net.0.proj.weight": torch.zeros(128, 32, dtype=torch.bfloat16),
        "proj_out.weight": torch.zeros(16, 32, dtype=torch.float32),
        "conv.weight": torch.zeros(8, 4, 3, 3, dtype=torch.bfloat16),
        "positions": torch.zeros(10, dtype=torch.int64),
    }
    folder = tmp_path / "transformer"
    folder.mkdir()
    names = sorted(tensors)
    save_file({name: tensors[name] for name in names[:3]}, folder / "diffusion_pytorch_model-00001-of-00002.safetensors")
    save_file({name: tensors[name] for name in names[3:]}, folder / "diffusion_pytorch_model-00002-of-00002.safetensors")
    return tensors


def floats(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t for name, t in tensors.items() if t.is_floating_point()}


def test_headers_are_read_from_every_shard(tmp_path: Path, transformer_dir: dict[str, torch.Tensor]) -> None:
    found = memory_fit.checkpoint_tensors(tmp_path / "transformer")
    assert {t.name: t.shape for t in found} == {name: tuple(t.shape) for name, t in transformer_dir.items()}
    assert {t.name: t.dtype for t in found}["proj_out.weight"] == "F32"


@pytest.mark.parametrize("dtype, width", [("fp16", 2), ("bf16", 2), ("fp32", 4)])
def test_float_plans_price_every_float_at_the_plan_width(tmp_path: Path, transformer_dir: dict[str, torch.Tensor],
                                                        dtype: str, width: int) -> None:
    estimate = engine_weight_bytes(tmp_path, "transformer", PrecisionPlan(dtype=dtype))
    expected = sum(t.numel() * width for t in floats(transformer_dir).values()) + 10 * 8  # + the int64 buffer
    assert estimate.total == expected
    assert estimate.parameters == sum(t.numel() for t in transformer_dir.values())


def test_int8_weight_only_and_fp8(tmp_path: Path, transformer_dir: dict[str, torch.Tensor]) -> None:
    gemms = ["blocks.0.attn.to_q.weight", "blocks.0.txt_mlp.net.0.proj.weight", "proj_out.weight"]
    gemm_params = sum(transformer_dir[name].numel() for name in gemms)
    rest = sum(t.numel() for name, t in floats(transformer_dir).items() if name not in gemms)
    scales = sum(transformer_dir[name].shape[0] for name in gemms) * 4
    int8 = engine_weight_bytes(tmp_path, "transformer", PrecisionPlan(dtype="int8", weight_only=True))
    assert int8.total == gemm_params * 1 + scales + rest * 2 + 80
    assert int8.by_kind["int8 GEMM weights"] == gemm_params
    fp8 = engine_weight_bytes(tmp_path, "transformer", PrecisionPlan(dtype="fp8"))
    assert fp8.total == gemm_params + rest * 2 + 80
    # the conv kernel (4-D) is not a GEMM: it stays at 2 bytes in both plans
    assert fp8.by_kind["fp16"] == rest * 2


def test_exclusions_and_fp32_islands(tmp_path: Path, transformer_dir: dict[str, torch.Tensor]) -> None:
    """A frozen fp32 text branch (the transformer's own TEXT_BRANCH pattern style) and a GEMM kept out of fp8."""
    text = r"(^|[/.])txt_mlp([/.]|$)"
    plan = PrecisionPlan(dtype="fp8", fp32_islands=(text,), quantize_exclude=(r"^proj_out\.",))
    estimate = engine_weight_bytes(tmp_path, "transformer", plan)
    text_params = transformer_dir["blocks.0.txt_mlp.net.0.proj.weight"].numel()
    q = transformer_dir["blocks.0.attn.to_q.weight"].numel()
    others = sum(t.numel() for t in floats(transformer_dir).values()) - text_params - q
    assert estimate.total == text_params * 4 + q * 1 + others * 2 + 80


def test_text_encoder_engine_excludes_vision_and_lm_head(tmp_path: Path) -> None:
    """A real Qwen2.5-VL checkpoint (tiny widths) written by transformers itself; the engine is the LM only."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    config = family_module("text_encoder", "qwen_text_encoder").TINY_TEXT_ENCODER_CONFIG
    model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**config)).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "text_encoder")
    language_model = sum(p.numel() for p in model.model.language_model.parameters())
    estimate = engine_weight_bytes(tmp_path, "text_encoder", PrecisionPlan(dtype="fp16"))
    assert estimate.total == 2 * language_model
    # int8: the embedding table is a Gather, not a GEMM, so it is not quantized
    int8 = engine_weight_bytes(tmp_path, "text_encoder", PrecisionPlan(dtype="int8", weight_only=True))
    embed = model.model.language_model.embed_tokens.weight.numel()
    assert int8.by_kind["fp16"] >= 2 * embed


def test_vae_engine_is_the_decoder(tmp_path: Path) -> None:
    from diffusers import AutoencoderKLQwenImage

    vae = AutoencoderKLQwenImage(**family_module("vae", "qwen_vae").TINY_VAE_CONFIG)
    vae.save_pretrained(tmp_path / "vae")
    decoder = sum(p.numel() for p in vae.decoder.parameters()) + sum(p.numel() for p in vae.post_quant_conv.parameters())
    assert engine_weight_bytes(tmp_path, "vae_decoder", PrecisionPlan()).total == 2 * decoder


def test_transformer_activation_formula() -> None:
    config = {"num_attention_heads": 24, "attention_head_dim": 128, "patch_size": 2}
    tokens = (1024 // 16) ** 2 + 256
    assert tokens == 4352
    expected = 2 * 2 * (10 * tokens * 3072 + 24 * tokens**2)
    assert memory_fit.transformer_activation_bytes(config, 2, 1024, 1024, 256) == expected
    assert 2.1 * GIB < expected < 2.3 * GIB
    text = {"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28}
    assert memory_fit.text_encoder_activation_bytes(text, 2, 290) == 2 * 2 * 290 * (6 * 3584 + 3 * 18944 + 28 * 290)
    assert memory_fit.vae_decoder_activation_bytes({"base_dim": 96}, 1, 1024, 1024) == 2 * 4 * 192 * 1024 * 1024


def test_release_transformer_does_not_fit_an_a10() -> None:
    """20.43 B parameters (counted on the meta device from the released config) in fp16."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    params = sum(p.numel() for p in model.parameters())
    weights = 2 * params
    assert round(weights / 1e9, 1) == 40.9
    activations = memory_fit.transformer_activation_bytes(dict(model.config), 2, 1024, 1024, 256)
    refusal = memory_fit.check_fit("a10", weights, activations, component="transformer")
    assert refusal is not None and "\n" not in refusal
    assert refusal.startswith(f"transformer needs ~{weights / GIB:.1f} GiB of weights")
    assert "a10 has 24 GiB" in refusal
    assert "build.weight_streaming with a budget of at most ~" in refusal
    budget = 24 * GIB - memory_fit.CONTEXT_RESERVE_BYTES - activations - memory_fit.WORKSPACE_BYTES
    assert f"~{budget / GIB:.1f} GiB" in refusal
    assert refusal.endswith("or a GPU with >= 48 GiB: l40s, a100, h100")
    assert memory_fit.check_fit("h100", weights, activations) is None
    rtx_targets = [gpu for gpu, cc in known_gpus().items() if cc != (9, 0)]
    assert memory_fit.check_fit("a10", weights, activations, candidates=rtx_targets).endswith(
        ">= 48 GiB: l40s, a100")


def test_fit_boundary_and_unreachable() -> None:
    usable = 24 * GIB - memory_fit.CONTEXT_RESERVE_BYTES
    weights = usable - memory_fit.WORKSPACE_BYTES - GIB
    assert memory_fit.check_fit("a10", weights, GIB) is None
    assert memory_fit.check_fit("a10", weights + 1, GIB) is not None
    huge = memory_fit.check_fit("a10", 10, 200 * GIB)
    assert "weight streaming cannot help" in huge and "no known GPU has enough memory" in huge


def test_every_known_gpu_has_a_memory_figure() -> None:
    assert set(known_gpus()) <= set(memory_fit.GPU_MEMORY_GIB)
    assert memory_fit.gpu_memory_bytes("a100") == 80 * GIB
    assert all(math.isfinite(value) and value > 0 for value in memory_fit.GPU_MEMORY_GIB.values())


def test_fit_counts_the_frozen_text_branch_at_fp32(built: dict[str, Path]) -> None:
    """The weights the frozen (fp32) text-branch nodes read are exactly the fp32 islands of the fit estimate,
    counted at 4 bytes: at release size half of each block's weights, 61.0 GB of engine instead of 40.9."""
    import json
    import re

    import onnx
    from safetensors import safe_open

    from stages.families.qwen_image.fit import precision_plan
    from stages.recipe.load import load_recipe

    recipe = built["recipe"]
    section = load_recipe("a10-fp16", {"components.transformer.precision.frozen_storage": "high_precision"}
                          ).recipe.components["transformer"]
    plan = precision_plan("transformer", section)
    islands = plan.high_precision_patterns
    assert plan.dtype == "fp16" and plan.high_precision == "fp32"
    frozen = set(json.loads((recipe / "transformer" / "surgery" / "record.json").read_text())["report"]["frozen_nodes"])
    graph = onnx.load(str(recipe / "transformer" / "surgery" / "model.onnx"), load_external_data=False).graph
    weights = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    producer = {o: n for n in graph.node for o in n.output}
    read_by_frozen = set()
    for node in graph.node:
        if node.name in frozen:
            for name in node.input:
                source = producer[name].input[0] if name in producer and producer[name].op_type == "Cast" else name
                if source in weights:
                    read_by_frozen.add(source)
    matched = {w for w in weights if any(re.search(p, w) for p in islands)}
    assert read_by_frozen and read_by_frozen <= matched
    folder = recipe / "checkpoint" / "transformer"
    numel = {}
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            numel.update({k: handle.get_slice(k).get_shape() for k in handle.keys()})
    kept = {w.removeprefix("model.") for w in weights}  # the export leaves out the last block's dead linears
    expected = sum(4 * math.prod(shape) for name, shape in numel.items()
                   if name in kept and any(re.search(p, name) for p in islands))
    estimate = engine_weight_bytes(recipe / "checkpoint", "transformer", plan)
    assert estimate.by_kind["fp32 (frozen or excluded)"] == expected
    # An INT8 plan keeps the frozen branch unquantized at its high precision (fp16): 2 bytes, not 1.
    int8 = precision_plan("transformer", load_recipe("a10-int8").recipe.components["transformer"])
    quantized = engine_weight_bytes(recipe / "checkpoint", "transformer", int8)
    assert quantized.by_kind["fp16 (frozen or excluded)"] == expected // 2
