"""Recipe schema and loading: YAML (with `extends:`) + command-line overrides -> one validated Recipe.

Everything a build depends on is checked here, before any task runs, so a bad recipe never leaves
half-written artifacts behind. This module stays light (pydantic + yaml): the task graph imports it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from stages import capabilities
from stages.backends import BACKENDS
from stages.errors import ForgeError, fail
from stages.paths import RECIPES_DIR, REPO_DIR
from stages.views import RESERVED as RESERVED_NAMES  # a view's name must not shadow the store or the caches
from stages.families import ALL_COMPONENTS, DEFAULT_FAMILY, FAMILIES, Family

TINY_MODEL = "tiny"
TINY_WARNING = "TINY RANDOM-WEIGHT MODEL: not Qwen-Image; accuracy numbers do not transfer"

SurgeryPass = Literal["fold_constants", "infer_shapes", "cleanup", "fix_text_padding", "freeze_text_branch"]
Dtype = Literal["fp32", "fp16", "bf16"]
PlanDtype = Literal["fp32", "fp16", "bf16", "int8", "fp8", "fp4"]
QUANTIZED = ("int8", "fp8", "fp4")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 100_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(Strict):
    gpu: Literal[tuple(capabilities.GPUS)]  # type: ignore[valid-type]
    backend: Literal[tuple(BACKENDS)] = "tensorrt-rtx"  # type: ignore[valid-type]

    @property
    def compute_capability(self) -> tuple[int, int]:
        return capabilities.GPUS[self.gpu]


class ModelSource(Strict):
    """`path: tiny` builds the built-in random-weight model; anything else is a diffusers checkpoint dir."""

    path: str = TINY_MODEL
    seed: int = 0

    @property
    def is_tiny(self) -> bool:
        return self.path == TINY_MODEL


class Range(Strict):
    min: int = Field(gt=0)
    opt: int = Field(gt=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max, got min={self.min}, opt={self.opt}, max={self.max}")
        return self


class PixelRange(Range):
    @model_validator(mode="after")
    def _multiple_of_16(self) -> PixelRange:
        bad = [v for v in (self.min, self.opt, self.max) if v % 16]
        if bad:
            raise ValueError(f"pixel sizes must be multiples of 16 (8x VAE x 2x2 patches), got {bad}")
        return self


class Profile(Strict):
    """Pixel ranges apply to image components (transformer, VAE); the text encoder has a batch range only."""

    batch: Range
    height: PixelRange | None = None
    width: PixelRange | None = None


class ExportSettings(Strict):
    opset: int = Field(default=20, ge=18, le=23)


class SurgerySettings(Strict):
    passes: list[SurgeryPass] = ["fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup"]


def _check_regexes(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as error:
            raise ValueError(f"{pattern!r} is not a valid regular expression ({error})") from None
    return patterns


class CalibrationSettings(Strict):
    """Real inputs captured from the PyTorch pipeline; identical settings share one calibration artifact."""

    method: Literal["max", "entropy"] = "max"
    prompts: str = "prompts/calibration.yaml"
    sizes: list[Size] = [[512, 512]]
    num_inference_steps: int = Field(default=8, gt=0, le=100)
    steps: Literal["all"] | list[Annotated[int, Field(ge=0)]] = "all"
    samples: int = Field(default=16, gt=0)
    true_cfg_scale: float = Field(default=4.0, ge=1.0)
    seed: int = 0

    @property
    def prompts_file(self) -> Path:
        """`prompts` relative to the repository, or as given."""
        repo_relative = REPO_DIR / self.prompts
        return repo_relative if repo_relative.is_file() else Path(self.prompts)

    @model_validator(mode="after")
    def _steps_exist(self) -> CalibrationSettings:
        if self.steps != "all":
            beyond = [step for step in self.steps if step >= self.num_inference_steps]
            if beyond or not self.steps:
                raise ValueError(f"steps {beyond or '[]'} must be indices below num_inference_steps "
                                 f"{self.num_inference_steps}, or `all`")
        if not (REPO_DIR / self.prompts).is_file() and not Path(self.prompts).is_file():
            raise ValueError(f"prompts file {self.prompts!r} not found (a YAML list of prompts, relative to the repo)")
        return self


class PrecisionSettings(Strict):
    dtype: PlanDtype = "fp16"
    weight_only: bool = False
    high_precision: Dtype = "fp32"
    exclude: list[str] = []
    calibration: CalibrationSettings | None = None
    # true: AutoCast / quantize one block at a time (time linear in layers, one block's weights in memory);
    # auto: when the component's checkpoint weights exceed stages.blockwise.AUTO_BYTES.
    blockwise: Literal["auto"] | bool = "auto"

    _regexes = field_validator("exclude")(_check_regexes)

    @property
    def quantized(self) -> bool:
        return self.dtype in QUANTIZED

    @property
    def needs_calibration(self) -> bool:
        return self.quantized and not self.weight_only

    @model_validator(mode="after")
    def _plan_is_coherent(self) -> PrecisionSettings:
        if self.dtype in ("fp16", "bf16") and self.high_precision not in ("fp32", self.dtype):
            raise ValueError(f"high_precision: with dtype {self.dtype} kept nodes stay fp32 (AutoCast); "
                             f"allowed: fp32, {self.dtype}")
        if self.weight_only and self.dtype != "int8":
            raise ValueError(f"weight_only: applies to dtype int8 only, not {self.dtype}")
        if self.needs_calibration and self.calibration is None:
            raise ValueError(f"calibration: dtype {self.dtype} needs a calibration section (method, prompts, samples)")
        if self.quantized and self.high_precision == "bf16":
            raise ValueError("high_precision: bf16 around Q/DQ cannot be validated on ONNX Runtime CPU "
                             "(no bf16 QuantizeLinear kernel); allowed: fp16, fp32")
        return self


class WeightStreaming(Strict):
    """Build the engine with WEIGHT_STREAMING: weights beyond `budget_gib` stay in host memory and stream to
    the GPU at each call (the runtime sets the budget; the manifest records it)."""

    budget_gib: float = Field(gt=0)


class BuildSettings(Strict):
    optimization_level: int = Field(default=3, ge=0, le=5)
    timing_cache: bool = True
    weight_streaming: WeightStreaming | None = None


class Tolerance(Strict):
    atol: float = Field(gt=0)
    rtol: float = Field(gt=0)
    cosine: float = Field(gt=0, le=1)


Size = Annotated[list[int], Field(min_length=2, max_length=2)]


class ValidateSettings(Strict):
    sizes: list[Size] = []
    batch: int = Field(default=2, gt=0)
    timesteps: list[Annotated[float, Field(gt=0, le=1)]] = []
    text_tokens: list[Annotated[int, Field(ge=0)]] = []
    seed: int = 0
    tolerances: dict[str, Tolerance]
    # true: run the reference and the graph block by block (one block's weights in memory; per-block errors);
    # auto: when the component's checkpoint weights exceed stages.blockwise.AUTO_BYTES.
    blockwise: Literal["auto"] | bool = "auto"
    # the first N cases only (a release-size model on CPU: one small case); the report lists the cases run
    max_cases: int | None = Field(default=None, gt=0)


class Component(Strict):
    profile: Profile
    export: ExportSettings = ExportSettings()
    surgery: SurgerySettings = SurgerySettings()
    precision: PrecisionSettings = PrecisionSettings()
    build: BuildSettings = BuildSettings()
    validate_: ValidateSettings = Field(alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="after")
    def _validation_inside_profile(self) -> Component:
        p, v = self.profile, self.validate_
        if not p.batch.min <= v.batch <= p.batch.max:
            raise ValueError(f"validate.batch: {v.batch} lies outside the profile ({p.batch.min}-{p.batch.max})")
        if p.height is None or p.width is None:
            return self
        for height, width in v.sizes:
            if not (p.height.min <= height <= p.height.max and p.width.min <= width <= p.width.max):
                raise ValueError(
                    f"validate.sizes: {height}x{width} lies outside the profile "
                    f"(height {p.height.min}-{p.height.max}, width {p.width.min}-{p.width.max})"
                )
            if height % 16 or width % 16:
                raise ValueError(f"validate.sizes: {height}x{width} must be multiples of 16")
        return self


def check_component(name: str, component: Component, text_length: int, family: Family) -> None:
    """What each component kind needs (see stages.families); raises ValueError naming the key."""
    if name not in family.components:
        raise ValueError(f"components.{name}: not a component of {family.name}; allowed: {', '.join(family.components)}")
    info = family.components[name]
    prefix = f"components.{name}"
    v = component.validate_
    if set(v.tolerances) != set(info.outputs):
        wrong = sorted(set(v.tolerances) - set(info.outputs)) or sorted(set(info.outputs) - set(v.tolerances))
        raise ValueError(f"{prefix}.validate.tolerances: {wrong} do not match the outputs of {name}; "
                         f"give one tolerance per output: {', '.join(info.outputs)}")
    if "sizes" in info.validate_requires:
        if component.profile.height is None or component.profile.width is None:
            raise ValueError(f"{prefix}.profile: {name} needs height and width ranges (pixels)")
        if len({tuple(size) for size in v.sizes}) < 2:
            raise ValueError(f"{prefix}.validate.sizes: needs at least two different image sizes")
    if "timesteps" in info.validate_requires and len(set(v.timesteps)) < 2:
        raise ValueError(f"{prefix}.validate.timesteps: needs at least two timesteps in (0, 1]")
    if "text_tokens" in info.validate_requires and not v.text_tokens:
        raise ValueError(f"{prefix}.validate.text_tokens: needs the real-token count of each batch entry")
    too_long = [n for n in v.text_tokens if n > text_length]
    if too_long:
        raise ValueError(f"{prefix}.validate.text_tokens: {too_long} exceed text_length {text_length}")
    for section, choice in (("validate", v.blockwise), ("precision", component.precision.blockwise)):
        if choice is True and not info.block_pattern:
            raise ValueError(f"{prefix}.{section}.blockwise: {name} has no repeated blocks to work on one by one; "
                             f"allowed: auto, false")
    if component.precision.quantized and not info.quantizable:
        raise ValueError(f"{prefix}.precision.dtype: {name} is kept in fp32/fp16/bf16; quantization applies to "
                         f"{', '.join(n for n, i in family.components.items() if i.quantizable)}")
    unsupported = [p for p in component.surgery.passes if p not in info.surgery_passes]
    if unsupported:
        raise ValueError(f"{prefix}.surgery.passes: {unsupported} do not apply to {name}; "
                         f"allowed: {', '.join(info.surgery_passes)}")


class PipelineCheckThresholds(Strict):
    min_step_cosine: float = Field(gt=0, le=1)
    min_psnr: float = Field(gt=0)
    min_ssim: float = Field(gt=0, le=1)


class PipelineCheckSection(Strict):
    """End-to-end denoising with every component on its built graph vs all-PyTorch (see stages.pipeline_check)."""

    prompts: list[str] = Field(min_length=4)
    negative_prompt: str = " "
    height: int = Field(default=1024, gt=0)
    width: int = Field(default=1024, gt=0)
    num_inference_steps: int = Field(default=50, ge=1)
    true_cfg_scale: float = Field(default=4.0, gt=1)
    seed: int = 0
    thresholds: PipelineCheckThresholds


class AuditThresholds(Strict):
    """Optional gates of `doit audit` on rendered text (stages.audit.ocr); unset means reported, not gated.

    min_ocr_agreement: OCR of every built image vs OCR of its PyTorch reference (character agreement, 0-1).
    min_text_accuracy: OCR of every built image vs the text its prompt quotes (character accuracy, 0-1).
    """

    min_ocr_agreement: float | None = Field(default=None, ge=0, le=1)
    min_text_accuracy: float | None = Field(default=None, ge=0, le=1)


class Recipe(Strict):
    description: str = ""
    target: Target
    model: ModelSource = ModelSource()
    text_length: int = Field(gt=0, le=1024)
    family: Literal[tuple(FAMILIES)] = DEFAULT_FAMILY  # type: ignore[valid-type]
    components: dict[Literal[ALL_COMPONENTS], Component] = Field(min_length=1)  # type: ignore[valid-type]
    pipeline_check: PipelineCheckSection | None = None
    audit: AuditThresholds = AuditThresholds()

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for name, component in self.components.items():
            check_component(name, component, self.text_length, self.family_spec)
        return self


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from; `name` keys artifacts/ and the task names."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    recipe: Recipe
    resolved: dict[str, Any]
    overrides: dict[str, Any]

    @property
    def family(self) -> Family:
        return self.recipe.family_spec


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


def load_recipe(recipe: str, overrides: dict[str, str] | None = None, model: str | None = None) -> LoadedRecipe:
    """Load, merge, override and validate a recipe; raises ForgeError with a one-line message."""
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
    _check_model_dir(path, validated, from_command_line=model is not None)
    if validated.pipeline_check is not None:
        from stages.prompts import check_settings

        check_settings(validated.pipeline_check, validated.text_length, source=path)
    _check_target(path, validated)
    return LoadedRecipe(
        name=view_name(path, validated.model, parsed_overrides),
        source=str(path),
        recipe=validated,
        resolved=validated.model_dump(mode="json", by_alias=True),
        overrides=parsed_overrides,
    )


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


def _check_target(path: Path, recipe: Recipe) -> None:
    """Refuse a target/backend/precision combination the hardware or TensorRT flavour cannot honour."""
    target = recipe.target
    cc = target.compute_capability
    refusal = capabilities.backend_refusal(target.backend, target.gpu, cc)
    if refusal:
        raise fail(path, "target.backend", refusal)
    for name, component in recipe.components.items():
        plan = component.precision
        key = f"components.{name}.precision"
        if plan.quantized:
            capabilities.check_quantization(path, f"{key}.dtype", target.backend, target.gpu, cc, plan.dtype,
                                            plan.weight_only)
            if plan.calibration is not None:
                capabilities.check_calibration_method(path, f"{key}.calibration.method", plan.dtype,
                                                      plan.weight_only, plan.calibration.method)
        checks = [("high_precision", plan.high_precision)] if plan.quantized else [
            ("dtype", plan.dtype), ("high_precision", plan.high_precision)]
        for field_name, dtype in checks:
            refusal = capabilities.dtype_refusal(target.gpu, cc, dtype)
            if refusal:
                raise fail(path, f"{key}.{field_name}", refusal)


def _check_model_dir(path: Path, recipe: Recipe, from_command_line: bool) -> None:
    """The checkpoint directory, checked folder by folder and header by header before any task runs; errors
    name `model=` when the directory came from the command line."""
    from stages.model_dir import check_checkpoint

    if recipe.model.is_tiny:
        return
    family = recipe.family_spec
    folders = {folder: f"component {name}" for name in recipe.components
               for folder in family.components[name].checkpoint_folders}
    configs = tuple(dict.fromkeys(family.components[name].config_folder for name in recipe.components))
    pipeline = recipe.pipeline_check is not None or any(c.precision.needs_calibration for c in recipe.components.values())
    if pipeline:
        folders.update({folder: "the pipeline check / calibration" for folder in family.checkpoint_folders()
                        if folder not in folders and folder not in family.pipeline_files})
        configs = tuple(dict.fromkeys((*configs, *(info.config_folder for info in family.components.values()))))
    source, key = ("command line", "model=") if from_command_line else (path, "model.path")
    check_checkpoint(source, key, recipe.model.path, folders, configs, family.pipeline_files if pipeline else ())
    from stages.fit import check_recipe_fits

    check_recipe_fits(path, recipe)
