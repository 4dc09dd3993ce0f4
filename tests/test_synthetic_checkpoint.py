"""scripts/synthetic_checkpoint.py at tiny widths: sharding, indices and values, loaded by the real classes.

The release widths (340 M parameters per transformer block) are measured by hand (see the script's report);
here `--config tiny` with a small `--shard-size` forces several shards per component, so the index, the
streaming writer and the meta-device tensor plan are all exercised in seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "synthetic_checkpoint.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("synthetic_checkpoint", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def synth() -> ModuleType:
    return load_script()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, synth: ModuleType) -> Path:
    """Written through the script's command-line entry point (in process: a subprocess would spend ~8 s
    re-importing torch, diffusers and transformers)."""
    out = tmp_path_factory.mktemp("synthetic") / "qwen-image"
    assert synth.main(["--out", str(out), "--config", "tiny", "--layers", "3", "--text-layers", "1",
                       "--shard-size", "200KB", "--seed", "7"]) == 0
    return out


def test_command_line_rejects_bad_arguments(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "x"), "--components", "unet"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "unknown components ['unet']" in result.stderr


def digest(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.glob("*.safetensors"))}


def test_layout_and_indices(checkpoint: Path) -> None:
    from safetensors import safe_open

    index = json.loads((checkpoint / "model_index.json").read_text())
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    for folder, prefix in (("transformer", "diffusion_pytorch_model"), ("text_encoder", "model"),
                           ("vae", "diffusion_pytorch_model")):
        shards = sorted((checkpoint / folder).glob("*.safetensors"))
        assert len(shards) > 1, f"{folder}: the small --shard-size must split it"
        assert all(f"-of-{len(shards):05d}.safetensors" in shard.name for shard in shards)
        weight_map = json.loads((checkpoint / folder / f"{prefix}.safetensors.index.json").read_text())
        total, names = 0, set()
        for shard in shards:
            with safe_open(shard, "pt") as handle:
                assert handle.metadata() == {"format": "pt"}
                shard_bytes = 0
                for name in handle.keys():
                    assert weight_map["weight_map"][name] == shard.name
                    tensor = handle.get_tensor(name)
                    assert tensor.dtype == torch.bfloat16
                    shard_bytes += tensor.numel() * tensor.element_size()
                    names.add(name)
                # a shard stays under --shard-size unless it holds one tensor larger than that
                assert shard_bytes <= 200_000 or len(handle.keys()) == 1
                total += shard_bytes
        assert set(weight_map["weight_map"]) == names
        assert weight_map["metadata"]["total_size"] == total


def test_loads_with_the_real_classes_without_missing_keys(checkpoint: Path) -> None:
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    transformer, info = QwenImageTransformer2DModel.from_pretrained(checkpoint, subfolder="transformer",
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert transformer.config.num_layers == 3
    block = transformer.transformer_blocks[2]
    assert torch.all(block.attn.norm_q.weight == 1)  # norms are ones
    assert 0.015 < float(block.img_mlp.net[0].proj.weight.detach().float().std()) < 0.025  # N(0, 0.02)
    text_encoder, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(checkpoint, subfolder="text_encoder",
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert text_encoder.config.text_config.num_hidden_layers == 1
    assert torch.all(text_encoder.model.language_model.norm.weight == 1)
    vae, info = AutoencoderKLQwenImage.from_pretrained(checkpoint, subfolder="vae", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def test_forge_accepts_it(checkpoint: Path) -> None:
    from stages.recipe.load import load_recipe

    loaded = load_recipe("a10-fp16", model=str(checkpoint))
    assert loaded.recipe.model.path == str(checkpoint)


def test_seeded_and_independent_of_sharding(checkpoint: Path, tmp_path: Path, synth: ModuleType) -> None:
    """Same seed, one big shard: identical tensors; another seed: different ones."""
    from safetensors import safe_open

    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        found = {}
        for shard in folder.glob("*.safetensors"):
            with safe_open(shard, "pt") as handle:
                found.update({name: handle.get_tensor(name) for name in handle.keys()})
        return found

    synth.generate(tmp_path / "same", "tiny", layers=3, text_layers=1, seed=7, shard_size="1GB",
                   components=["transformer"])
    synth.generate(tmp_path / "other", "tiny", layers=3, text_layers=1, seed=8, shard_size="1GB",
                   components=["transformer"])
    assert [p.name for p in (tmp_path / "same" / "transformer").glob("*.safetensors")] == [
        "diffusion_pytorch_model.safetensors"]
    assert not list((tmp_path / "same" / "transformer").glob("*.index.json"))
    reference, same, other = (tensors(path / "transformer") for path in
                              (checkpoint, tmp_path / "same", tmp_path / "other"))
    assert reference.keys() == same.keys() == other.keys()
    assert all(torch.equal(reference[name], same[name]) for name in reference)
    weight = "transformer_blocks.0.attn.to_q.weight"
    assert not torch.equal(reference[weight], other[weight])
    assert not (tmp_path / "same" / "text_encoder").exists()  # --components filter


def test_rerun_replaces_shards(checkpoint: Path, tmp_path: Path, synth: ModuleType) -> None:
    """A second run with another shard size must not leave the first run's shards behind."""
    out = tmp_path / "rerun"
    synth.generate(out, "tiny", layers=1, seed=0, shard_size="100KB", components=["vae"])
    synth.generate(out, "tiny", layers=1, seed=0, shard_size="1GB", components=["vae"])
    assert list(digest(out / "vae")) == ["diffusion_pytorch_model.safetensors"]
    assert not list((out / "vae").glob("*.index.json"))


def test_release_plan_matches_the_released_sizes(synth: ModuleType) -> None:
    """The release config on meta: 20.43 B transformer parameters (NOTES), 339.8 M per block."""
    configs = synth.component_configs("release", None, None, None)
    model, _ = synth.meta_model("transformer", configs["transformer"])
    specs = synth.tensor_plan("transformer", model)
    total = sum(spec.numel for spec in specs)
    assert round(total / 1e9, 2) == 20.43
    block = sum(spec.numel for spec in specs if spec.name.startswith("transformer_blocks.0."))
    assert round(block / 1e6, 1) == 339.8
    shards = synth.plan_shards(specs, synth.parse_size("5GB"))
    assert all(sum(spec.nbytes for spec in shard) <= 5_000_000_000 for shard in shards)
    assert len(shards) == 9  # 40.9 GB in 5 GB shards


def test_parse_size(synth: ModuleType) -> None:
    assert synth.parse_size("5GB") == 5_000_000_000
    assert synth.parse_size("64KiB") == 65536
    assert synth.parse_size("1.5MB") == 1_500_000
    assert synth.parse_size("123") == 123
    with pytest.raises(Exception, match="size"):
        synth.parse_size("five")
