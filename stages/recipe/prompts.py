"""The rules a pipeline check's settings must meet (checked when the recipe loads, before any task)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.errors import fail
from stages.language import QUOTED, prompt_language

def check_settings(settings: Any, text_length: int, source: str | Path | None = None) -> None:
    """The issue's requirements on a check: >= 2 English and >= 2 Chinese prompts, rendered text, CFG, sizes.

    Raises ForgeError keyed `pipeline_check.<key>`; pass the recipe file as `source` to have it named too.
    """

    def error(key: str, message: str) -> Exception:
        return fail(source, f"pipeline_check.{key}", message)

    prompts = list(settings.prompts)
    languages = [prompt_language(p) for p in prompts if isinstance(p, str) and p.strip()]
    if len(languages) != len(prompts):
        raise error("prompts", "every prompt must be a non-empty string")
    for language, name in (("en", "English"), ("zh", "Chinese")):
        if languages.count(language) < 2:
            raise error("prompts", f"needs at least two {name} prompts, got {languages.count(language)} "
                        f"(languages found: {languages})")
    if not any(QUOTED.search(p) for p in prompts):
        raise error("prompts", 'needs at least one prompt asking for rendered text, quoted as "..." or “...”')
    if not settings.true_cfg_scale >= 1:
        raise error("true_cfg_scale", f"must be > 1 (CFG with the negative prompt) or 1 (no CFG: a distilled "
                    f"sampler such as Qwen-Image-Lightning), got {settings.true_cfg_scale}")
    for key in ("height", "width"):
        value = getattr(settings, key)
        if not isinstance(value, int) or value <= 0 or value % 16:
            raise error(key, f"must be a positive multiple of 16 (8x VAE x 2x2 patches), got {value!r}")
    if not isinstance(settings.num_inference_steps, int) or settings.num_inference_steps < 1:
        raise error("num_inference_steps", f"must be a positive int, got {settings.num_inference_steps!r}")
    if not 0 < text_length <= 1024:
        raise fail(source, "text_length", f"must be in 1..1024 (the pipeline's max_sequence_length cap), got {text_length}")
