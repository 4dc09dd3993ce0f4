"""`doit generate`'s variables, checked against the recipe before any task runs (no torch, no artifacts read).

Sizes and batch are checked against the engines' profiles, which the recipe sets: an image the engines cannot
serve is refused naming the allowed range and the recipe key, before the build or the generation starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.errors import fail
from stages.runtime.built import COMPONENTS

RUNNERS = ("auto", "engine", "onnxruntime")
VARIABLES = ("prompt", "prompts", "negative_prompt", "height", "width", "steps", "cfg", "seed", "batch", "out",
             "runner", "truncate", "lora")
SOURCE = "command line"


@dataclass(frozen=True)
class GenerateRequest:
    """One `doit generate`: every prompt at one size, seed, step count and CFG scale."""

    prompts: tuple[str, ...]
    negative_prompt: str
    height: int
    width: int
    steps: int
    cfg: float
    seed: int
    batch: int
    out: Path
    runner: str
    truncate: bool
    prompts_file: Path | None = None
    lora: tuple[tuple[Path, float], ...] = ()


def parse_request(cli_vars: dict[str, str], loaded: Any, root: Path) -> GenerateRequest:
    """The request from `key=value` variables, or a one-line ForgeError naming the variable and what is allowed."""
    prompts, prompts_file = _prompts(cli_vars)
    components = loaded.recipe.components
    missing = [c for c in COMPONENTS if components.get(c) is None]
    if missing:
        raise fail(loaded.source, "components", f"builds no {', '.join(missing)}; doit generate needs the text "
                   "encoder, transformer and VAE decoder engines")
    transformer = components["transformer"].profile
    height = _int(cli_vars, "height", transformer.height.opt, minimum=16)
    width = _int(cli_vars, "width", transformer.width.opt, minimum=16)
    if height % 16 or width % 16:
        raise fail(SOURCE, "height" if height % 16 else "width",
                   f"{height}x{width}: both sides must be multiples of 16 (8x VAE, 2x2 patches)")
    for component in ("transformer", "vae_decoder"):
        profile = components[component].profile
        if not profile.serves(height, width):
            raise fail(SOURCE, "height/width", f"{height}x{width} is outside the {loaded.name} {component} engine's "
                       f"profile ({profile.bounds()}); allowed: a size inside it, or widen "
                       f"components.{component}.profile in the recipe and rebuild")
    batch = _int(cli_vars, "batch", 1, minimum=1)
    if batch > transformer.batch.max:
        raise fail(SOURCE, "batch", f"{batch} is above the transformer profile's batch max {transformer.batch.max} "
                   f"(components.transformer.profile.batch.max); allowed: 1-{transformer.batch.max}")
    runner = cli_vars.get("runner", "auto")
    if runner not in RUNNERS:
        raise fail(SOURCE, "runner", f"{runner!r}; allowed: {', '.join(RUNNERS)}")
    truncate = cli_vars.get("truncate", "1")
    if truncate not in ("0", "1"):
        raise fail(SOURCE, "truncate", f"{truncate!r}; allowed: 1 (cut long prompts, say so) or 0 (refuse them)")
    out = Path(cli_vars["out"]) if cli_vars.get("out") else root / "generated" / loaded.name
    if out.exists() and not out.is_dir():
        raise fail(SOURCE, "out", f"{out} is a file; allowed: a folder (created if missing)")
    return GenerateRequest(
        prompts=prompts, negative_prompt=cli_vars.get("negative_prompt", " "), height=height, width=width,
        steps=_int(cli_vars, "steps", loaded.recipe.sampling.num_inference_steps, minimum=1),
        cfg=_float(cli_vars, "cfg", loaded.recipe.sampling.true_cfg_scale), seed=_int(cli_vars, "seed", 0, minimum=0),
        batch=batch, out=out, runner=runner, truncate=truncate == "1", prompts_file=prompts_file,
        lora=tuple((Path(item["path"]), float(item["scale"])) for item in loaded.lora))


def _prompts(cli_vars: dict[str, str]) -> tuple[tuple[str, ...], Path | None]:
    if ("prompt" in cli_vars) == ("prompts" in cli_vars):
        raise fail(SOURCE, "prompt", "give one of prompt=TEXT or prompts=FILE (one prompt a line)")
    if "prompt" in cli_vars:
        if not cli_vars["prompt"].strip():
            raise fail(SOURCE, "prompt", "is empty; allowed: any text")
        return (cli_vars["prompt"],), None
    path = Path(cli_vars["prompts"])
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise fail(path, "prompts", f"cannot be read ({error.strerror}); allowed: a UTF-8 text file, one prompt a line") from None
    except UnicodeDecodeError:
        raise fail(path, "prompts", "is not UTF-8 text; allowed: a UTF-8 text file, one prompt a line") from None
    prompts = tuple(line.strip() for line in lines if line.strip())
    if not prompts:
        raise fail(path, "prompts", "holds no prompt; allowed: one prompt a line")
    return prompts, path


def _int(cli_vars: dict[str, str], key: str, default: int, minimum: int) -> int:
    value = _number(cli_vars, key, default, int, "an integer")
    if value < minimum:
        raise fail(SOURCE, key, f"{value}; allowed: {minimum} or more")
    return value


def _float(cli_vars: dict[str, str], key: str, default: float) -> float:
    value = _number(cli_vars, key, default, float, "a number")
    if not value >= 0 or value == float("inf"):
        raise fail(SOURCE, key, f"{cli_vars[key]}; allowed: a finite number >= 0 (1 or less: no CFG)")
    return value


def _number(cli_vars: dict[str, str], key: str, default: Any, kind: type, what: str) -> Any:
    text = cli_vars.get(key)
    if text is None:
        return default
    try:
        return kind(text)
    except ValueError:
        raise fail(SOURCE, key, f"{text!r} is not {what}") from None
