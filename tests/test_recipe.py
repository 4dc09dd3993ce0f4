from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.errors import ForgeError
from stages.paths import RECIPES_DIR
from stages.recipe.load import load_recipe


def write(tmp_path: Path, name: str, data: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def base() -> dict:
    return yaml.safe_load((RECIPES_DIR / "a10-fp16.yaml").read_text())


def error_of(recipe: str, overrides: dict[str, str] | None = None, model: str | None = None) -> str:
    with pytest.raises(ForgeError) as info:
        load_recipe(recipe, overrides, model)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_recipe_resolves_with_defaults() -> None:
    loaded = load_recipe("a10-fp16")
    assert loaded.name == "a10-fp16"
    assert loaded.recipe.target.compute_capability == (8, 6)
    component = loaded.recipe.components["transformer"]
    assert component.profile.height.min == 512 and component.profile.batch.max == 2
    assert loaded.resolved["components"]["transformer"]["validate"]["tolerances"]["sample"] == {
        "max_error": 0.1, "rms_error": 0.1, "cosine": 0.995}


def test_extends_merges_parent_and_child(tmp_path: Path) -> None:
    child = write(tmp_path, "child.yaml", {"extends": "a10-fp16", "text_length": 200,
                                          "components": {"transformer": {"build": {"optimization_level": 1}}}})
    loaded = load_recipe(str(child))
    assert loaded.name.startswith("child-") and loaded.name != "child", "outside recipes/ gets a view of its own"
    assert loaded.recipe.text_length == 200
    assert loaded.recipe.components["transformer"].build.optimization_level == 1
    assert loaded.recipe.components["transformer"].profile.width.max == 1664


def test_dotted_overrides_are_typed_and_recorded() -> None:
    loaded = load_recipe("a10-fp16", {"components.transformer.validate.tolerances.sample.max_error": "0.5"})
    assert loaded.recipe.components["transformer"].validate_.tolerances["sample"].max_error == 0.5
    assert loaded.overrides == {"components.transformer.validate.tolerances.sample.max_error": 0.5}


@pytest.mark.parametrize(
    ("overrides", "key", "allowed"),
    [
        ({"components.transformer.precison.dtype": "fp16"}, "components.transformer.precison", "precision"),
        ({"components.transformer.precision.dtype": "int4"}, "components.transformer.precision.dtype", "'fp16'"),
        ({"components.transformer.profile.height.min": "2048"}, "components.transformer.profile.height", "min <= opt <= max"),
        ({"components.transformer.profile.width.min": "520"}, "components.transformer.profile.width", "multiples of 16"),
        ({"text_length": "many"}, "text_length", "integer"),
        ({"components.transformer.validate.sizes": "[[512, 512], [512, 2048]]"}, "components.transformer", "outside the profile"),
        ({"components.transformer.validate.timesteps": "[0.0, 0.5]"}, "components.transformer.validate.timesteps.0", "greater than 0"),
        ({"components.vae_decoder.precision.blockwise": "true"}, "components.vae_decoder.precision.blockwise", "auto, false"),
        ({"components.transformer.precision.blockwise": "sometimes"}, "components.transformer.precision.blockwise", "'auto'"),
        ({"components.transformer.validate.max_cases": "0"}, "components.transformer.validate.max_cases", "greater than 0"),
        ({"components.transformer.profile.sizes": "[[1472, 1140]]"}, "components.transformer.profile", "1140 -> 1136"),
        ({"components.transformer.profile.sizes": "[[1328, 2048]]"}, "components.transformer.profile", "width 512-1664"),
        ({"components.transformer.validate.sizes": "[[512, 512], [1664, 1664]]"}, "components.transformer",
         "area up to 1328x1328"),
        ({"pipeline_check.height": "1664", "pipeline_check.width": "1664"}, "pipeline_check", "area up to 1328x1328"),
        ({"components.transformer.precision.frozen_storage": "bf16", "components.transformer.precision.high_precision":
          "fp16"}, "components.transformer.precision", "allowed: high_precision"),
        ({"components.transformer.validate.tolerances.sample.atol": "0.05"}, "components.transformer.validate",
         "atol"),
    ],
)
def test_bad_values_name_file_key_and_allowed(overrides: dict[str, str], key: str, allowed: str) -> None:
    message = error_of("a10-fp16", overrides)
    assert "a10-fp16.yaml" in message and key in message and allowed in message


def test_precision_the_gpu_lacks_is_refused(tmp_path: Path) -> None:
    data = base()
    data["target"]["gpu"] = "t4"
    data["components"]["transformer"]["precision"]["dtype"] = "bf16"
    message = error_of(str(write(tmp_path, "t4.yaml", data)))
    assert "components.transformer.precision.dtype" in message and "7.5" in message and "fp16" in message


def test_backend_without_the_gpu_is_refused_with_alternative() -> None:
    message = error_of("a10-fp16", {"target.gpu": "h100"})
    assert "target.backend" in message and "9.0" in message and "use backend tensorrt" in message


def test_missing_model_directory(tmp_path: Path) -> None:
    message = error_of("a10-fp16", model=str(tmp_path / "nowhere"))
    assert message.startswith("command line: model=: ") and "does not exist" in message
    (tmp_path / "ckpt" / "transformer").mkdir(parents=True)
    assert "missing text_encoder/ (needed by component text_encoder)" in error_of("a10-fp16", model=str(tmp_path / "ckpt"))
    for folder in ("text_encoder", "tokenizer", "vae"):
        (tmp_path / "ckpt" / folder).mkdir()
    assert "missing model_index.json (needed by the pipeline check" in error_of("a10-fp16", model=str(tmp_path / "ckpt"))
    (tmp_path / "ckpt" / "model_index.json").write_text("{}")
    (tmp_path / "ckpt" / "scheduler").mkdir()
    assert "missing text_encoder/config.json" in error_of("a10-fp16", model=str(tmp_path / "ckpt"))


def test_malformed_yaml_and_unknown_recipe(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: {gpu: a10\n")
    assert "not valid YAML" in error_of(str(bad))
    assert "available: " in error_of("no-such-recipe")


def test_circular_extends(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", {"extends": "b.yaml"})
    write(tmp_path, "b.yaml", {"extends": "a.yaml"})
    assert "circular" in error_of(str(tmp_path / "a.yaml"))


def test_override_values_parse_like_yaml_and_exponents() -> None:
    loaded = load_recipe("a10-fp16", {"components.transformer.validate.tolerances.sample.rms_error": "1e-9",
                                      "components.transformer.validate.sizes": "[[512, 512], [1024, 512]]"})
    component = loaded.recipe.components["transformer"]
    assert component.validate_.tolerances["sample"].rms_error == 1e-9
    assert component.validate_.sizes == [[512, 512], [1024, 512]]


def test_component_kinds_have_their_own_requirements(tmp_path: Path) -> None:
    data = base()
    data["components"]["text_encoder"] = {
        "profile": {"batch": {"min": 1, "opt": 1, "max": 2}},
        "surgery": {"passes": ["fold_constants", "freeze_text_branch"]},
        "validate": {"batch": 1, "text_tokens": [10], "tolerances": {"hidden_states": {"max_error": 1, "rms_error": 1, "cosine": 0.9}}},
    }
    message = error_of(str(write(tmp_path, "te.yaml", data)))
    assert "components.text_encoder.surgery.passes" in message and "freeze_text_branch" in message
    assert "allowed: fold_constants, infer_shapes, cleanup, fix_text_padding" in message
    data["components"]["text_encoder"]["surgery"]["passes"] = ["fold_constants"]
    assert load_recipe(str(write(tmp_path, "te.yaml", data))).recipe.components["text_encoder"].profile.height is None
    del data["components"]["transformer"]["profile"]["height"]
    del data["components"]["transformer"]["profile"]["sizes"]
    assert "components.transformer.profile: transformer needs height and width" in error_of(
        str(write(tmp_path, "te.yaml", data)))


def test_transformer_needs_two_sizes_and_timesteps() -> None:
    assert "two different image sizes" in error_of(
        "a10-fp16", {"components.transformer.validate.sizes": "[[512, 512], [512, 512]]"})
    assert "two timesteps" in error_of("a10-fp16", {"components.transformer.validate.timesteps": "[0.5]"})


def test_unknown_component_lists_the_known_ones() -> None:
    message = error_of("a10-fp16", {"components.unet.profile.batch.min": "1"})
    assert "components.unet" in message and "'text_encoder'" in message and "'vae_decoder'" in message


def test_null_drops_a_parent_key_in_extends_and_overrides() -> None:
    loaded = load_recipe("tests/recipes/transformer-only.yaml")
    assert list(loaded.recipe.components) == ["transformer"] and loaded.recipe.pipeline_check is None
    full = load_recipe("a10-fp16", {"components.vae_decoder": "null", "pipeline_check": "null"})
    assert sorted(full.recipe.components) == ["text_encoder", "transformer"]
    assert full.overrides["pipeline_check"] is None


def test_native_sizes_bound_the_transformer_tokens_not_each_side() -> None:
    """Every native size is served; the transformer's token range stops at the largest area (1328x1328), not at
    1664x1664, and the VAE, which takes both sides, keeps the side ranges."""
    from stages.families.qwen_image import transformer, vae
    from stages.targets.memory_fit import transformer_activation_bytes

    loaded = load_recipe("a10-fp16")
    components = loaded.recipe.components
    profile = components["transformer"].profile
    natives = [(1328, 1328), (1664, 928), (928, 1664), (1472, 1136), (1136, 1472), (1584, 1056), (1056, 1584)]
    assert sorted(map(tuple, profile.sizes)) == sorted(natives) and all(profile.serves(h, w) for h, w in natives)
    assert not profile.serves(1664, 1664) and profile.serves(1664, 512)
    validate = components["transformer"].validate_
    validated = [tuple(size) for size in validate.sizes for _ in validate.timesteps][: validate.max_cases]
    assert any(h != w and (h, w) in natives for h, w in validated), "validation covers a non-square native size"
    config = {"patch_size": 2, "attention_head_dim": 128, "in_channels": 64, "joint_attention_dim": 3584}
    tokens = [shape[1] for shape in transformer.profile_shapes(profile, 256, config)["hidden_states"]]
    assert tokens == [32 * 32, 83 * 83, 83 * 83] and max(h * w for h, w in natives) == 1328 * 1328
    latents = vae.profile_shapes(components["vae_decoder"].profile, 256,
                                 {"z_dim": 16, "temperal_downsample": [False, True, True]})
    assert latents["latents"][2][-2:] == (208, 208)
    release = {"num_attention_heads": 24, "attention_head_dim": 128, "patch_size": 2}
    priced = transformer_activation_bytes(release, 2, *profile.largest, 256)
    assert profile.largest == (1328, 1328) and priced < transformer_activation_bytes(release, 2, 1664, 1664, 256)
