"""Run what a recipe built: `EnginePipeline` (Python, called like diffusers' `QwenImagePipeline`) and `doit generate`.

    from stages.runtime import EnginePipeline
    pipe = EnginePipeline.from_manifest("artifacts/a10-fp16/manifest.json")

`built` and `request` are light (the task graph checks a `doit generate` with them before any task runs);
`pipeline` and `generate` load torch and the runners.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "EnginePipeline":
        from stages.runtime.pipeline import EnginePipeline

        return EnginePipeline
    raise AttributeError(name)
