from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path

from stages.records.manifest import summary_lines

REPO = Path(__file__).resolve().parent.parent


def manifest_of(built: dict[str, Path]) -> dict:
    return json.loads((built["recipe"] / "manifest.json").read_text())


def test_every_artifact_digest_matches_the_file(built: dict[str, Path]) -> None:
    manifest = manifest_of(built)
    entries = [e for stage in manifest["components"]["transformer"]["artifacts"].values() for e in stage]
    entries += manifest["model"]["checkpoint"]
    assert {"export/model.onnx", "engine/engine.plan", "validate/results.json"} <= {
        e["path"].removeprefix("transformer/") for e in entries}
    for entry in entries:
        data = (built["recipe"] / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"], entry["path"]
        assert len(data) == entry["bytes"]


def test_manifest_names_sources_versions_and_validation(built: dict[str, Path]) -> None:
    manifest = manifest_of(built)
    assert manifest["model"]["source"] == "tiny" and manifest["model"]["seed"] == 0
    assert "TINY" in manifest["model"]["warning"]
    assert manifest["target"] == {"gpu": "a10", "backend": "tensorrt-rtx", "compute_capability": "8.6"}
    versions = manifest["versions"]
    for package in ("torch", "diffusers", "onnx", "onnxruntime", "polygraphy", "nvidia-modelopt", "tensorrt-rtx-cu13"):
        assert versions[package] == importlib.metadata.version(package)
    component = manifest["components"]["transformer"]
    assert component["text_length"] == 256
    assert component["profile"]["hidden_states"]["max"] == [2, 83 * 83, 16]
    module, function = component["feed_function"].split(":")
    assert callable(getattr(importlib.import_module(module), function))
    validation = component["validation"]
    assert validation["passed"] is True and validation["engine_run"]["ran"] is False
    assert validation["metrics"][0]["min_cosine_similarity"] > 0.999


def test_summary_is_loud_about_tiny_and_skipped_engine(built: dict[str, Path]) -> None:
    lines = summary_lines(manifest_of(built), "artifacts/a10-fp16/manifest.json")
    assert any(line.startswith("*** TINY") for line in lines)
    assert any("validation PASSED on ONNX Runtime; engine NOT run" in line for line in lines)


def test_all_three_components_and_the_pipeline_check_are_recorded(built: dict[str, Path]) -> None:
    manifest = manifest_of(built)
    assert sorted(manifest["components"]) == ["text_encoder", "transformer", "vae_decoder"]
    for name, entry in manifest["components"].items():
        module, function = entry["feed_function"].split(":")
        assert callable(getattr(importlib.import_module(module), function)), name
        assert entry["validation"]["passed"] and entry["artifacts"]["engine"], name
    tokenizer = manifest["components"]["text_encoder"]["tokenizer"]
    assert tokenizer["padding"]["max_length"] == 256 + 34 and tokenizer["padding"]["padding"] == "max_length"
    assert (built["recipe"] / tokenizer["path"] / "tokenizer.json").is_file()
    check = manifest["pipeline_check"]
    assert check["passed"] and check["runner"] == "onnxruntime" and check["engine"]["ran"] is False
    languages = [p["language"] for p in check["prompts"]]
    assert languages.count("en") >= 2 and languages.count("zh") >= 2
    images = [e for e in check["artifacts"] if e["path"].endswith(".png")]
    assert len(images) == len(check["prompts"])


def test_manifest_is_portable_and_points_into_the_store(built: dict[str, Path]) -> None:
    """No absolute path of this machine anywhere; the recipe by repo path and digest; views link to the store."""
    text = (built["recipe"] / "manifest.json").read_text()
    manifest = json.loads(text)

    def strings(node: object) -> list[str]:
        if isinstance(node, dict):
            return [s for value in node.values() for s in strings(value)]
        if isinstance(node, list):
            return [s for value in node for s in strings(value)]
        return [node] if isinstance(node, str) else []

    absolute = [s for s in strings(manifest) if s.startswith("/")]
    assert absolute == [] and str(built["artifacts"]) not in text and str(REPO) not in text
    recipe = manifest["recipe"]
    assert recipe["file"] == "recipes/a10-fp16.yaml"
    assert recipe["file_sha256"] == hashlib.sha256((REPO / "recipes" / "a10-fp16.yaml").read_bytes()).hexdigest()
    for label, entry in manifest["store"].items():
        assert (built["recipe"] / label).resolve() == (built["artifacts"] / entry).resolve()
        assert json.loads((built["artifacts"] / entry / "record.json").read_text())["key"] == Path(entry).name


def test_each_engine_records_its_fit_estimate_and_built_bytes(built: dict[str, Path]) -> None:
    """`fit`: the weight bytes the GPU fit check prices (from the checkpoint's headers, under the plan) and the built
    engine file's bytes; at tiny width the engine is mostly code, so no fit warning is due."""
    import re

    from safetensors import safe_open

    from stages.families.qwen_image.text_branch import TEXT_BRANCH_PATTERNS
    from stages.records.manifest import fit_warnings

    manifest = manifest_of(built)
    for component, entry in manifest["components"].items():
        engine = (built["recipe"] / component / "engine" / "engine.plan").stat().st_size
        assert entry["fit"]["engine_bytes"] == engine, component
    # a10-fp16's transformer: fp16 weights; the frozen text branch's GEMM weights bf16 (frozen_storage), the rest of
    # the branch (biases, norms) at fp32, its high precision; only the tensors the export kept (not the last block's
    # dead text-stream linears)
    import onnx

    export = onnx.load(str(built["recipe"] / "transformer" / "export" / "model.onnx"), load_external_data=False)
    kept = {t.name.removeprefix("model.") for t in export.graph.initializer}
    expected = 0
    for shard in (built["recipe"] / "checkpoint" / "transformer").glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                if name not in kept:
                    continue
                shape = handle.get_slice(name).get_shape()
                count = 1
                for size in shape:
                    count *= size
                frozen = any(re.search(p, name) for p in TEXT_BRANCH_PATTERNS)
                gemm = len(shape) == 2 and name.endswith(".weight")
                expected += count * (4 if frozen and not gemm else 2)
    assert manifest["components"]["transformer"]["fit"]["estimated_bytes"] == expected
    assert fit_warnings(manifest) == []


def test_an_engine_far_above_its_estimate_is_said_in_one_line() -> None:
    from stages.records.manifest import fit_warnings

    def manifest(estimated: int, engine: int) -> dict:
        return {"components": {"transformer": {"fit": {"estimated_bytes": estimated, "engine_bytes": engine}}}}

    gib = 2**30
    assert fit_warnings(manifest(30 * gib, int(31.4 * gib))) == []  # 4.7% over
    [line] = fit_warnings(manifest(30 * gib, 32 * gib))
    assert line.startswith("warning: transformer engine is 32.00 GiB, 7% above the fit check's 30.00 GiB estimate")
    assert fit_warnings(manifest(10 << 20, 40 << 20)) == [], "a few MB of engine code on a tiny model is not a miss"


def test_streaming_costs_are_priced_at_the_gpus_host_link() -> None:
    """A 61.0 GB transformer engine (the measured fp32-storage one) at a10-fp16's 16 GiB budget streams the rest over
    PCIe 4.0 x16 on every call; CFG runs as one batch-2 call per step, 50 steps an image."""
    from stages.recipe.load import load_recipe
    from stages.records.manifest import _streaming_entry

    entry = _streaming_entry(load_recipe("a10-fp16").recipe, "transformer", 61_000_000_000)
    streamed = 61_000_000_000 - 16 * 2**30
    assert entry["resident_bytes"] == 16 * 2**30 and entry["streamed_bytes_per_call"] == streamed
    assert entry["host_link"] == "PCIe 4.0 x16" and abs(entry["seconds_per_call"] - streamed / 31.5e9) < 1e-9
    assert entry["calls_per_image"] == 50 and abs(entry["seconds_per_image"] - 50 * streamed / 31.5e9) < 1e-6
    whole = _streaming_entry(load_recipe("l40s-fp8").recipe, "transformer", 30_700_000_000)
    assert whole["budget_gib"] is None and whole["streamed_bytes_per_call"] == 0 and whole["seconds_per_image"] == 0
