"""`doit generate`: every prompt of a request through a built recipe, one PNG per image with its provenance.

The PNG text chunks say what made the image: recipe, manifest sha256, each engine's sha256, prompt, negative
prompt, seed, size, steps, CFG scale and which runner computed it. `seed=N` is diffusers'
`generator=torch.Generator().manual_seed(N)`, so the same image can be made again in PyTorch.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from stages import log
from stages.errors import fail
from stages.runtime.pipeline import EnginePipeline
from stages.runtime.request import SOURCE, GenerateRequest

LOG = log.get("generate")


def generate(request: GenerateRequest, manifest: Path) -> list[Path]:
    """Load, check every prompt's length, then write the images; nothing is written before the checks pass."""
    import torch

    with EnginePipeline.from_manifest(manifest, runner=request.runner) as pipe:
        if not _passed(pipe.built.manifest):
            LOG.warning("%s: the build's validation or pipeline check did not pass; see its junit.xml", pipe.built.name)
        truncated = check_lengths(pipe, request)
        pipe.set_lora(request.lora)
        request.out.mkdir(parents=True, exist_ok=True)
        metadata = provenance(pipe, request)
        written: list[Path] = []
        started = time.perf_counter()
        for index, prompt in enumerate(request.prompts):
            result = pipe(prompt=prompt, negative_prompt=request.negative_prompt, height=request.height,
                          width=request.width, num_inference_steps=request.steps, true_cfg_scale=request.cfg,
                          generator=torch.Generator().manual_seed(request.seed), num_images_per_prompt=request.batch)
            timings = pipe.timings
            for number, image in enumerate(result.images):
                path = request.out / f"{index:04d}-seed{request.seed}-{number}.png"
                fields = {**metadata, "prompt": prompt, "prompt_index": str(index), "image_index": str(number),
                          "truncated_tokens": str(truncated[index]), "timings": json.dumps(timings)}
                save_png(image, path, fields)
                written.append(path)
            LOG.info("prompt %d/%d: %d image%s, %.3f s per step", index + 1, len(request.prompts), len(result.images),
                     "s" if len(result.images) > 1 else "", timings["mean_step_s"] or 0.0)
        seconds = time.perf_counter() - started
    print(f"generate: {len(written)} image{'s' if len(written) != 1 else ''} in {seconds:.1f}s ({len(written) / seconds:.3f} images/s) on "
          f"{pipe.label}; written to {request.out}", file=sys.stderr)
    return written


def check_lengths(pipe: EnginePipeline, request: GenerateRequest) -> list[int]:
    """Tokens cut from each prompt: refused with `truncate=0`, otherwise said once per prompt."""
    limit = pipe.text_length
    cut = []
    for index, prompt in enumerate((*request.prompts, request.negative_prompt)):
        tokens = pipe.prompt_tokens(prompt)
        key = "negative_prompt" if index == len(request.prompts) else "prompt"
        if tokens > limit and not request.truncate:
            where = request.prompts_file if request.prompts_file and key == "prompt" else SOURCE
            raise fail(where, key, f"{'line ' + str(index + 1) + ': ' if where != SOURCE else ''}{tokens} tokens, "
                       f"more than the engines' text_length {limit}; allowed: at most {limit} tokens, or truncate=1 "
                       "to cut it")
        if tokens > limit:
            LOG.warning("%s %d: %d tokens, cut to the engines' text_length %d (truncate=0 refuses instead)", key,
                        index + 1, tokens, limit)
        cut.append(max(0, tokens - limit))
    return cut[: len(request.prompts)]


def provenance(pipe: EnginePipeline, request: GenerateRequest) -> dict[str, str]:
    built = pipe.built
    return {
        "software": "qwen-image-engine-forge",
        "recipe": built.name,
        "manifest_sha256": built.manifest_sha256,
        "engines_sha256": json.dumps(built.engine_sha256()),
        "negative_prompt": request.negative_prompt,
        "seed": str(request.seed),
        "generator": f"torch.Generator().manual_seed({request.seed}), num_images_per_prompt={request.batch}",
        "size": f"{request.height}x{request.width}",
        "steps": str(request.steps),
        "true_cfg_scale": f"{request.cfg:g}",
        "runner": pipe.label,
        "lora": json.dumps(pipe.loras),
    }


def save_png(image: Any, path: Path, fields: dict[str, str]) -> None:
    """The image with every field as a UTF-8 text chunk (iTXt: prompts may be Chinese)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in fields.items():
        info.add_itxt(key, value)
    partial = path.with_name(path.name + ".partial")
    image.save(partial, format="PNG", pnginfo=info)
    partial.replace(path)


def _passed(manifest: dict[str, Any]) -> bool:
    checks = [c.get("validation") or {} for c in manifest["components"].values()]
    return all(c.get("passed", True) for c in checks) and (manifest.get("pipeline_check") or {}).get("passed", True)
