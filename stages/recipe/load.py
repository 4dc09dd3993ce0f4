"""Recipe loading: YAML (with `extends:`) + command-line overrides -> one validated, checked LoadedRecipe.

Everything a build depends on is checked here, before any task runs, so a bad recipe never leaves
half-written artifacts behind. Light (pydantic + yaml): the task graph imports it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from stages.errors import ForgeError, fail
from stages.paths import RECIPES_DIR
from stages.recipe.checkpoint_checks import check_model_dir
from stages.recipe.fit import check_recipe_fits, pipeline_check_refusal, resolve_parts
from stages.recipe.prompts import check_settings
from stages.recipe.loras import parse_lora
from stages.recipe.schema import (MAX_RECIPE_BYTES, MAX_YAML_DEPTH, MAX_YAML_NODES, NAME_PATTERN, LoadedRecipe,
                                  ModelSource, Recipe)
from stages.recipe.target_checks import check_target
from stages.store.digests import sha256_file
from stages.targets.memory_fit import GIB
from stages.store.views import RESERVED as RESERVED_NAMES  # a view's name must not shadow the store or the caches

def check_name(name: str, source: str | Path) -> None:
    """Recipe names become folder and task names: a conservative character set, never `.`, `..` or a path."""
    if not NAME_PATTERN.fullmatch(name) or name in RESERVED_NAMES:
        raise fail(source, "recipe name", f"{name!r} is not allowed; use 1-64 letters, digits, '-', '_', '.' or '+', "
                   f"starting with a letter or digit, not {' or '.join(RESERVED_NAMES)}")


def resolve_recipe_path(recipe: str) -> Path:
    """`recipe=` takes a name from recipes/ or a path to a YAML file."""
    as_path = Path(recipe)
    if as_path.suffix in (".yaml", ".yml"):
        check_name(as_path.stem, recipe)
        if as_path.is_dir():
            raise fail(recipe, None, "is a directory, not a recipe file")
        if not as_path.is_file():
            shipped = RECIPES_DIR / f"{as_path.stem}.yaml"
            hint = (f"; did you mean recipe={as_path.stem} (the shipped recipe, named without .yaml)?"
                    if shipped.is_file() else f"; shipped recipes: {', '.join(shipped_recipes())} (or a path to a .yaml file)")
            raise fail("recipe=", None, f"recipe file {recipe!r} not found{hint}")
        return as_path
    check_name(recipe, "recipe=")
    named = RECIPES_DIR / f"{recipe}.yaml"
    if not named.is_file():
        raise fail("recipe=", None, f"no recipe named {recipe!r}; available: {', '.join(shipped_recipes())} "
                   "(or a path to a .yaml file)")
    return named


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def load_recipe(recipe: str, overrides: dict[str, str] | None = None, model: str | None = None,
                lora: str | None = None, generating: bool = False) -> LoadedRecipe:
    """Load, merge, override and validate a recipe; raises ForgeError with a one-line message. `lora`: the
    command line's `lora=`, which the pipeline check binds on `doit build` (and, for a recipe whose sampling requires
    a LoRA, on `doit generate`); `doit generate` binds it to its images either way."""
    path = resolve_recipe_path(recipe)
    if model is not None and not model.strip():
        raise fail("command line", "model=", "is empty; allowed: tiny (the built-in random-weight model) or the path "
                   "of a diffusers checkpoint directory")
    merged = _load_with_extends(path, seen=())
    parsed_overrides = {key: _parse_value(key, value) for key, value in (overrides or {}).items()}
    for key, value in parsed_overrides.items():
        _set_dotted(merged, key, value)
    if model is not None:
        merged.setdefault("model", {})["path"] = model
        parsed_overrides["model.path"] = model
    try:
        validated = Recipe.model_validate(merged)
    except ValidationError as error:
        raise _one_line_error(path, error, parsed_overrides) from None
    if not validated.model.is_tiny:
        check_model_dir(path, validated, from_command_line=model is not None)
        check_recipe_fits(path, validated)
    if validated.pipeline_check is not None:
        check_settings(validated.pipeline_check, validated.text_length, source=path)
    check_target(path, validated)
    loras = lora_files(path, validated, lora)
    split = resolve_parts(path, validated)
    resolved = validated.model_dump(mode="json", by_alias=True)
    for component, choice in split.items():
        resolved["components"][component]["build"]["parts"] = choice.count
        resolved["components"][component]["build"]["host_memory_gib"] = round(choice.host_memory_bytes / GIB, 2)
    return LoadedRecipe(
        name=view_name(path, validated.model, parsed_overrides),
        source=str(path),
        recipe=validated,
        resolved=resolved,
        overrides=parsed_overrides,
        parts={component: dataclasses.asdict(choice) for component, choice in split.items()},
        pipeline_check_not_run=pipeline_check_refusal(validated),
        lora=loras,
        lora_in_check=not generating or validated.sampling.lora == "required",
    )


def lora_files(path: Path, recipe: Recipe, text: str | None) -> list[dict[str, Any]]:
    """`lora=` as [{path, sha256, scale}] (its content enters the pipeline check's key); required where the
    recipe's sampling says so."""
    transformer = recipe.components.get("transformer")
    if text is None:
        if recipe.sampling.lora == "required":
            raise fail(path, "sampling.lora", "required: give lora=FILE[:SCALE] (the recipe samples with a "
                       "distillation LoRA, e.g. Qwen-Image-Lightning-8steps-V1.0.safetensors; "
                       "scripts/synthetic_lora.py writes one of the published shapes for tests)")
        return []
    found = parse_lora(text, transformer.lora if transformer is not None else None)
    return [{"path": str(file.resolve()), "sha256": sha256_file(file), "scale": scale} for file, scale in found]


def view_name(path: Path, model: ModelSource, overrides: dict[str, Any] | None = None) -> str:
    """Where a build's view lives (artifacts/<name>/) and what its tasks are called.

    A shipped recipe with the tiny model and no overrides keeps its plain name, so `artifacts/a10-fp16` holds only
    what recipes/a10-fp16.yaml says; a recipe file outside recipes/, a checkpoint directory or command-line
    overrides add a digest of them, so they can never replace or clean a shipped recipe's view.
    """
    variant: dict[str, Any] = {}
    if path.resolve().parent != RECIPES_DIR.resolve():
        variant["recipe"] = str(path.resolve())
    if not model.is_tiny:
        variant["model"] = str(Path(model.path).resolve())
    settings = build_overrides(overrides or {})
    if settings:
        variant["overrides"] = settings
    if not variant:
        return path.stem
    return f"{path.stem}-{hashlib.sha256(json.dumps(variant, sort_keys=True).encode()).hexdigest()[:8]}"


def build_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """The command-line overrides that change what is built: not `model=` (its own part of the view name) and not
    the `audit:` section, whose gates only `doit audit` reads."""
    return {key: value for key, value in overrides.items()
            if key != "model.path" and key != "audit" and not key.startswith("audit.")}


def read_yaml(path: Path) -> Any:
    """YAML from a file that may be anything: too big, binary, nested without end. One-line errors only."""
    try:
        size = path.stat().st_size
        if size > MAX_RECIPE_BYTES:
            raise fail(path, None, f"{size} bytes; a recipe is a YAML file of at most {MAX_RECIPE_BYTES} bytes")
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise fail(path, None, "not a UTF-8 text file; a recipe is YAML") from None
    except OSError as error:
        raise fail(path, None, f"cannot be read ({error.strerror})") from None
    if "\x00" in text:
        raise fail(path, None, "contains NUL bytes; a recipe is a YAML text file")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise fail(path, where, f"not valid YAML ({getattr(error, 'problem', None) or str(error).splitlines()[0]})") from None
    except RecursionError:
        raise fail(path, None, f"nested too deeply; a recipe is at most {MAX_YAML_DEPTH} levels deep") from None
    except (ValueError, TypeError, OverflowError) as error:
        raise fail(path, None, f"not a valid YAML recipe ({error})") from None
    _check_shape(path, data)
    return data


def _check_shape(path: Path, data: Any) -> None:
    """Bounded depth and size (also against alias bombs, which share nodes): checked without recursion."""
    pending, nodes = [(data, 1)], 0
    while pending:
        node, depth = pending.pop()
        nodes += 1
        if depth > MAX_YAML_DEPTH:
            raise fail(path, None, f"nested too deeply; a recipe is at most {MAX_YAML_DEPTH} levels deep")
        if nodes > MAX_YAML_NODES:
            raise fail(path, None, f"too large; a recipe has at most {MAX_YAML_NODES} values")
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        pending.extend((child, depth + 1) for child in children)


def _load_with_extends(path: Path, seen: tuple[Path, ...]) -> dict[str, Any]:
    if path.resolve() in seen:
        chain = " -> ".join(p.name for p in (*seen, path.resolve()))
        raise fail(path, "extends", f"circular inheritance ({chain})")
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise fail(path, None, "a recipe must be a YAML mapping of keys to values")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise fail(path, "extends", "must be a recipe name or a path to a YAML file")
    if not parent.endswith((".yaml", ".yml")):
        check_name(parent, f"{path}: extends")
    parent_path = (path.parent / parent) if parent.endswith((".yaml", ".yml")) else RECIPES_DIR / f"{parent}.yaml"
    if not parent_path.is_file():
        raise fail(path, "extends", f"parent recipe {parent!r} not found (looked at {parent_path})")
    return _deep_merge(_load_with_extends(parent_path, (*seen, path.resolve())), data)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Child values win; a child's `key: null` removes the parent's key (e.g. drop a component)."""
    merged = dict(base)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _parse_value(key: str, text: str) -> Any:
    """YAML semantics for command-line values, plus `1e-9` as a float (YAML 1.1 reads it as a string)."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except (RecursionError, ValueError, TypeError, OverflowError):
        raise fail("command line", key, "not a usable value (nested too deeply or malformed)") from None
    _check_shape(Path(f"command line: {key}"), value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set a dotted key; `key=null` removes it, as `key: null` does in a recipe that extends another."""
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise fail("command line", dotted, f"{key!r} holds a value, not a section; cannot set {dotted}")
        node = child
    if value is None:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value


def _one_line_error(path: Path, error: ValidationError, overrides: dict[str, Any]) -> ForgeError:
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"])
    source: str | Path = path
    if any(key == o or key.startswith(o + ".") or o.startswith(key + ".") for o in overrides):
        source = f"{path} (after command-line overrides)"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = f"unknown key; allowed here: {', '.join(_allowed_keys(first['loc']))}"
    elif first["type"] == "missing":
        message = "required key is missing"
    return fail(source, key or None, message)


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    """Walk the schema along the error's location to list the keys allowed where the unknown one stood."""
    annotation: Any = Recipe
    parts = list(loc[:-1])
    while parts:
        if get_origin(annotation) is dict:
            annotation = get_args(annotation)[1]
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            part = parts[0]
            field = next((f for n, f in annotation.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                break
            annotation = field.annotation
        else:
            break
        parts.pop(0)
    if get_origin(annotation) is dict:
        annotation = get_args(annotation)[1]
    if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
        return []
    return sorted(field.alias or name for name, field in annotation.model_fields.items())
