"""GPU memory fit, checked before any work, on a release-shaped checkpoint that holds headers and no data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stages.errors import ForgeError
from stages.recipe.load import load_recipe
from stages.targets.memory_fit import GIB

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "tests" / "recipes" / "transformer-only.yaml")


@pytest.fixture(scope="module")
def release_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released checkpoint's shards (60-block transformer, Qwen2.5-VL text encoder, VAE) as sparse files: real
    headers and sizes, no bytes on disk."""
    sys.path.insert(0, str(REPO / "scripts"))
    from synthetic_checkpoint import generate

    out = tmp_path_factory.mktemp("release-sparse")
    generate(out, sparse=True)  # every component: the shipped recipes build all three
    return out


def load(checkpoint: Path, **overrides: str) -> str:
    try:
        return load_recipe(RECIPE, overrides, model=str(checkpoint)).name
    except ForgeError as error:
        return str(error)


def test_release_transformer_does_not_fit_an_a10_without_streaming(release_transformer: Path) -> None:
    shards = list((release_transformer / "transformer").glob("*.safetensors"))
    assert sum(p.stat().st_size for p in shards) > 40e9 > sum(p.stat().st_blocks * 512 for p in shards) * 1000
    message = load(release_transformer, **{"components.transformer.build.weight_streaming": "null"})
    # fp16 weights, the frozen text branch's GEMMs bf16 and the rest of it fp32; activations at 1328x1328, batch 2
    assert "components.transformer.build.weight_streaming: transformer needs ~37.9 GiB of weights" in message
    assert "~5.4 GiB activations" in message
    assert "a10 has 24 GiB" in message and "budget of at most ~17.1 GiB" in message and "l40s" in message
    assert "\n" not in message
    with_lora = load(release_transformer, **{"components.transformer.build.weight_streaming": "null",
                                             "components.transformer.lora": "{max_rank: 64}"})
    assert "~6.2 GiB activations" in with_lora, "0.79 GiB of rank-64 LoRA inputs on the device besides activations"
    assert "budget of at most ~16.3 GiB" in with_lora


def test_streaming_budget_must_leave_room_for_activations(release_transformer: Path) -> None:
    assert load(release_transformer).startswith("transformer-only-"), "a10-fp16 streams with a 16 GiB budget"
    message = load(release_transformer, **{"components.transformer.build.weight_streaming.budget_gib": "30"})
    assert "build.weight_streaming.budget_gib: 30 GiB of weights on a10 leaves no room" in message


def test_a_larger_gpu_fits_without_streaming(release_transformer: Path) -> None:
    no_streaming = {"components.transformer.build.weight_streaming": "null"}
    assert load(release_transformer, **{"target.gpu": "a100", **no_streaming}).startswith("transformer-only-")
    assert load(release_transformer, **{"target.gpu": "l40s", **no_streaming}).startswith("transformer-only-"), \
        "with its text-branch GEMMs in bf16 the fp16 engine holds ~37.9 GiB: the L40S fits it"
    fp32 = {"components.transformer.precision.frozen_storage": "high_precision"}
    message = load(release_transformer, **{"target.gpu": "l40s", **no_streaming, **fp32})
    assert "~56.7 GiB of weights" in message and "l40s has 48 GiB" in message
    unfrozen = {"components.transformer.surgery.passes": "[fold_constants, infer_shapes, fix_text_padding, cleanup]"}
    assert load(release_transformer, **{"target.gpu": "l40s", **no_streaming, **unfrozen, **fp32}).startswith(
        "transformer-only-"), "without the fp32 text branch the fp16 engine holds ~37.9 GiB: the L40S fits it"


def dead_in_the_last_block(name: str, last: int = 59) -> bool:
    """The release's last block's text-stream linears after the attention: the export leaves them out (their output
    reaches nothing), so no engine holds them (tests/test_manifest.py checks the rule on the tiny export)."""
    return name.startswith((f"transformer_blocks.{last}.attn.to_add_out.", f"transformer_blocks.{last}.txt_mlp."))


def header_bytes_of_int8_plan(folder: Path, kept: list[str]) -> int:
    """Independent arithmetic from the raw headers: INT8 GEMM weights (2-D `.weight`, not embeddings) at 1 byte plus
    one fp32 scale per output channel, tensors matching `kept` (the frozen text branch) and the rest at fp16."""
    import json
    import re
    import struct

    total = 0
    for shard in folder.glob("*.safetensors"):
        with open(shard, "rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, entry in header.items():
            if name == "__metadata__" or dead_in_the_last_block(name):
                continue
            count = 1
            for size in entry["shape"]:
                count *= size
            gemm = len(entry["shape"]) == 2 and name.endswith(".weight") and "embed_tokens" not in name
            if any(re.search(p, name) for p in kept) or not gemm:
                total += 2 * count
            else:
                total += count + 4 * entry["shape"][0]
    return total


def test_a_quantized_plan_prices_its_frozen_text_branch_unquantized(release_transformer: Path) -> None:
    """a10-int8 keeps the frozen text branch fp16 (no Q/DQ there): ~28.4 GiB, not the ~19 GiB of an all-INT8
    engine, so the A10 must stream it."""
    from stages.families.qwen_image.text_branch import TEXT_BRANCH_PATTERNS
    from stages.recipe.fit import estimated_engine_bytes

    loaded = load_recipe("a10-int8", model=str(release_transformer))
    estimate = estimated_engine_bytes(loaded.recipe, release_transformer, "transformer")
    assert estimate == header_bytes_of_int8_plan(release_transformer / "transformer", TEXT_BRANCH_PATTERNS)
    assert 28 * 2**30 < estimate < 29 * 2**30
    message = load_shipped("a10-int8", release_transformer, **{"components.transformer.build.weight_streaming": "null"})
    assert "transformer needs ~28.4 GiB of weights" in message and "a10 has 24 GiB" in message


def test_bf16_frozen_storage_prices_the_text_branch_gemms_at_two_bytes(release_transformer: Path) -> None:
    """a10-fp16's frozen text branch stores its GEMM weights bf16: ~38 GiB on release shapes, not the ~57 GiB of
    fp32 storage; the difference is 2 bytes per text-branch GEMM parameter."""
    import json
    import re

    from stages.families.qwen_image.text_branch import TEXT_BRANCH_PATTERNS
    from stages.recipe.fit import estimated_engine_bytes
    from stages.safetensors import tensors

    loaded = {storage: load_recipe("a10-fp16", {"components.transformer.precision.frozen_storage": storage},
                                   model=str(release_transformer)) for storage in ("bf16", "high_precision")}
    estimate = {s: estimated_engine_bytes(l.recipe, release_transformer, "transformer") for s, l in loaded.items()}
    gemm = 0
    index = json.loads((release_transformer / "transformer" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        for name, entry in tensors(release_transformer / "transformer" / shard).items():
            if len(entry["shape"]) == 2 and name.endswith(".weight") and any(re.search(p, name) for p in TEXT_BRANCH_PATTERNS) \
                    and not dead_in_the_last_block(name):
                gemm += entry["shape"][0] * entry["shape"][1]
    assert estimate["high_precision"] - estimate["bf16"] == 2 * gemm
    assert 37 * 2**30 < estimate["bf16"] < 39 * 2**30 < 56 * 2**30 < estimate["high_precision"]


def load_shipped(recipe: str, checkpoint: Path, lora: str | None = None, **overrides: str) -> str:
    try:
        return load_recipe(recipe, overrides, model=str(checkpoint), lora=lora).name
    except ForgeError as error:
        return str(error)


def test_every_shipped_recipe_fits_its_gpu_or_streams_on_release_shapes(release_transformer: Path) -> None:
    """Checked the way a build checks it: each shipped recipe loads against the release checkpoint's headers (or
    names a backend this machine lacks); the GPUs that hold the engine whole do not stream."""
    from stages.recipe.load import shipped_recipes

    from stages.families.qwen_image import lora

    streams = {}
    lightning = lora.write_synthetic(release_transformer.parent / "lightning.safetensors",
                                     {"transformer_blocks.0.attn.to_q": (8, 8)}, 64, 0, "lightning", alpha=8.0)
    for name in shipped_recipes():
        needs = None
        outcome = load_shipped(name, release_transformer)
        if "sampling.lora: required" in outcome:  # a10-fp16-lightning: its LoRA's ranks are checked too
            needs = str(lightning)
            outcome = load_shipped(name, release_transformer, needs)
        if "needs the Python package" in outcome:
            assert "target.backend: tensorrt" in outcome, outcome  # h100-fp8 needs full TensorRT
            continue
        assert outcome.startswith(name), outcome
        recipe = load_recipe(name, model=str(release_transformer), lora=needs).recipe
        streams[name] = {c: s.build.weight_streaming is not None for c, s in recipe.components.items()}
    assert streams["a10-fp16"]["transformer"] and streams["a10-int8"]["transformer"]
    assert not streams["l40s-fp8"]["transformer"], "the L40S holds the FP8 engine whole"
    assert streams["rtx5090-fp8"]["transformer"]
    for name in streams:
        assert not streams[name]["text_encoder"] and not streams[name]["vae_decoder"], name


def test_auto_parts_keep_every_part_builder_under_the_host_memory(release_transformer: Path) -> None:
    """`build.parts: auto` on the released shapes: the fewest parts whose builder peak fits `host_memory_gib`."""
    from stages.recipe.fit import estimated_engine_bytes, estimated_part_bytes
    from stages.targets.backends import BACKENDS

    backend, counts = BACKENDS["tensorrt-rtx"], {}
    for memory in (16, 64):
        loaded = load_recipe(RECIPE, {"components.transformer.build.host_memory_gib": str(memory)},
                             model=str(release_transformer))
        count, choice = loaded.part_count("transformer"), loaded.parts["transformer"]
        assert max(choice["builder_peak_bytes"]) <= memory * GIB
        fewer = estimated_part_bytes(loaded.recipe, release_transformer, "transformer", count - 1)
        assert max(backend.builder_peak_bytes(size) for size in fewer) > memory * GIB, "one part fewer would not fit"
        assert sum(choice["estimated_bytes"]) == estimated_engine_bytes(loaded.recipe, release_transformer, "transformer")
        counts[memory] = count
    assert counts[16] > counts[64] > 1, counts
    pinned = load_recipe(RECIPE, {"components.transformer.build.parts": "60"}, model=str(release_transformer))
    per_block = pinned.parts["transformer"]["estimated_bytes"]
    assert max(per_block[1:-1]) == min(per_block[1:-1]), "every block is priced alike"
    message = load(release_transformer, **{"components.transformer.build.host_memory_gib": "2"})
    assert "build.host_memory_gib: 2 GiB cannot build transformer even one block per part" in message


def test_tiny_block_counts_are_the_tiny_configurations() -> None:
    """The fit module (stdlib only) knows the tiny model's layer counts to refuse `build.parts` above them."""
    from stages.families.qwen_image import fit
    from stages.families.qwen_image.text_encoder import TINY_TEXT_ENCODER_CONFIG
    from stages.families.qwen_image.transformer import TINY_TRANSFORMER_CONFIG

    assert fit.TINY_BLOCKS == {"transformer": TINY_TRANSFORMER_CONFIG["num_layers"],
                               "text_encoder": TINY_TEXT_ENCODER_CONFIG["text_config"]["num_hidden_layers"]}
