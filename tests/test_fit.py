"""GPU memory fit, checked before any work, on a release-shaped checkpoint that holds headers and no data."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from stages.errors import ForgeError
from stages.recipe.load import load_recipe

REPO = Path(__file__).resolve().parent.parent
RECIPE = str(REPO / "tests" / "recipes" / "transformer-only.yaml")


@pytest.fixture(scope="module")
def release_transformer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released 60-block transformer's shards as sparse files: real headers and sizes, no bytes on disk."""
    sys.path.insert(0, str(REPO / "scripts"))
    from synthetic_checkpoint import generate

    out = tmp_path_factory.mktemp("release-sparse")
    generate(out, components=["transformer"], sparse=True)
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
    # fp16 weights (38.1 GiB) but the frozen text branch, half of each block, stays fp32: the real engine is 61.0 GB
    assert "components.transformer.build.weight_streaming: transformer needs ~57.1 GiB of weights" in message
    assert "a10 has 24 GiB" in message and "budget of at most ~20.3 GiB" in message and "a100" in message
    assert "\n" not in message


def test_streaming_budget_must_leave_room_for_activations(release_transformer: Path) -> None:
    assert load(release_transformer).startswith("transformer-only-"), "a10-fp16 streams with an 18 GiB budget"
    message = load(release_transformer, **{"components.transformer.build.weight_streaming.budget_gib": "30"})
    assert "build.weight_streaming.budget_gib: 30 GiB of weights on a10 leaves no room" in message


def test_a_larger_gpu_fits_without_streaming(release_transformer: Path) -> None:
    no_streaming = {"components.transformer.build.weight_streaming": "null"}
    assert load(release_transformer, **{"target.gpu": "a100", **no_streaming}).startswith("transformer-only-")
    message = load(release_transformer, **{"target.gpu": "l40s", **no_streaming})
    assert "~57.1 GiB of weights" in message and "l40s has 48 GiB" in message
    unfrozen = {"components.transformer.surgery.passes": "[fold_constants, infer_shapes, fix_text_padding, cleanup]"}
    assert load(release_transformer, **{"target.gpu": "l40s", **no_streaming, **unfrozen}).startswith("transformer-only-"), \
        "without the fp32 text branch the fp16 engine holds ~38.1 GiB: the L40S fits it"
