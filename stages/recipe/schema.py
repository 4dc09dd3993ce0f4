"""The recipe schema: every key a recipe may hold, its type, its default and its own consistency rules.

Light (pydantic only): the task graph and the manifest read it. Loading and the before-work checks are in
stages.recipe.load.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from stages.families import ALL_COMPONENTS, DEFAULT_FAMILY, FAMILIES, Family
from stages.paths import REPO_DIR
from stages.targets import capabilities
from stages.targets.backends import BACKENDS

TINY_MODEL = "tiny"
TINY_WARNING = "TINY RANDOM-WEIGHT MODEL: not Qwen-Image; accuracy numbers do not transfer"

SurgeryPass = Literal["fold_constants", "infer_shapes", "cleanup", "fix_text_padding", "freeze_text_branch",
                      "drop_softmax_nan_guard"]
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


Size = Annotated[list[int], Field(min_length=2, max_length=2)]


class Profile(Strict):
    """Pixel ranges apply to image components (transformer, VAE); the text encoder has a batch range only.

    `sizes` lists the [height, width] sizes the engine must serve (e.g. Qwen-Image's native resolutions). An engine
    that takes image tokens rather than height and width (the transformer) then serves image areas up to the
    largest of them, not height.max x width.max: 1664x928 and 928x1664 need 1664 on both sides, but their area is
    that of 1248x1248, not 1664x1664. The GPU fit prices activations at that largest area.
    """

    batch: Range
    height: PixelRange | None = None
    width: PixelRange | None = None
    sizes: list[Size] = []

    @model_validator(mode="after")
    def _sizes_inside_ranges(self) -> Profile:
        if self.sizes and (self.height is None or self.width is None):
            raise ValueError("sizes: needs the height and width ranges they lie in")
        for height, width in self.sizes:
            if height % 16 or width % 16:
                raise ValueError(f"sizes: {height}x{width} must be multiples of 16 (8x VAE x 2x2 patches; "
                                 f"QwenImagePipeline rounds a side down to one, e.g. 1140 -> 1136)")
            assert self.height is not None and self.width is not None
            if not (self.height.min <= height <= self.height.max and self.width.min <= width <= self.width.max):
                raise ValueError(f"sizes: {height}x{width} lies outside height {self.height.min}-{self.height.max}, "
                                 f"width {self.width.min}-{self.width.max}")
        if self.sizes and self.largest[0] * self.largest[1] < self.height.opt * self.width.opt:  # type: ignore[union-attr]
            raise ValueError(f"sizes: the largest area {self.largest[0]}x{self.largest[1]} is below the profile's "
                             f"opt {self.height.opt}x{self.width.opt}")  # type: ignore[union-attr]
        return self

    @property
    def largest(self) -> tuple[int, int]:
        """The [height, width] of the largest image area served: the largest of `sizes`, else the ranges' max."""
        assert self.height is not None and self.width is not None
        if self.sizes:
            height, width = max(self.sizes, key=lambda size: (size[0] * size[1], size[0]))
            return height, width
        return self.height.max, self.width.max

    def bounds(self) -> str:
        """`height a-b, width c-d[, area up to HxW]`: what `serves` accepts, for error messages."""
        assert self.height is not None and self.width is not None
        area = f", area up to {self.largest[0]}x{self.largest[1]}" if self.sizes else ""
        return f"height {self.height.min}-{self.height.max}, width {self.width.min}-{self.width.max}{area}"

    def serves(self, height: int, width: int) -> bool:
        """Whether an image of this size lies in the ranges and, with `sizes`, within the largest area."""
        assert self.height is not None and self.width is not None
        largest = self.largest
        return (self.height.min <= height <= self.height.max and self.width.min <= width <= self.width.max
                and height * width <= largest[0] * largest[1])


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
    # the frozen text branch's GEMMs: at high_precision, or bf16 (they read the checkpoint's bf16 weights as stored
    # and compute in bf16, the rest of the branch stays at high_precision; stages.graphs.bf16, docs/scale.md)
    frozen_storage: Literal["high_precision", "bf16"] = "high_precision"
    calibration: CalibrationSettings | None = None
    # true: AutoCast / quantize one block at a time (time linear in layers, one block's weights in memory), and
    # run the calibration capture's models block by block (the same feeds); auto: per component, when its
    # checkpoint weights exceed stages.graphs.blockwise.AUTO_BYTES.
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
        if self.frozen_storage == "bf16" and (self.quantized or self.high_precision != "fp32"):
            raise ValueError("frozen_storage: bf16 applies to fp16/bf16 plans with high_precision fp32 (a quantized "
                             "plan keeps the frozen branch at its high_precision, fp16: the same bytes); "
                             "allowed: high_precision")
        if self.quantized and self.high_precision == "bf16":
            raise ValueError("high_precision: bf16 around Q/DQ cannot be validated on ONNX Runtime CPU "
                             "(no bf16 QuantizeLinear kernel); allowed: fp16, fp32")
        return self


class WeightStreaming(Strict):
    """Build the engine with WEIGHT_STREAMING: weights beyond `budget_gib` stay in host memory and stream to
    the GPU at each call (the runtime sets the budget; the manifest records it)."""

    budget_gib: float = Field(gt=0)


class BuildSettings(Strict):
    """`parts`: build the engine as N consecutive block-range engines (stages.graphs.parts); `auto` picks the
    fewest whose builder peak stays under `host_memory_gib` (default: 60% of the building machine's RAM)."""

    optimization_level: int = Field(default=3, ge=0, le=5)
    timing_cache: bool = True
    weight_streaming: WeightStreaming | None = None
    parts: Literal["auto"] | Annotated[int, Field(ge=1, le=1024)] = "auto"
    host_memory_gib: float | None = Field(default=None, gt=0, le=1 << 20)


class Tolerance(Strict):
    """Errors relative to the reference output's own scale (stages.validate.compare), and its cosine."""

    max_error: float = Field(gt=0)  # max|diff| / max|reference|
    rms_error: float = Field(gt=0)  # rms(diff) / rms(reference)
    cosine: float = Field(gt=0, le=1)


class ValidateSettings(Strict):
    sizes: list[Size] = []
    batch: int = Field(default=2, gt=0)
    timesteps: list[Annotated[float, Field(gt=0, le=1)]] = []
    text_tokens: list[Annotated[int, Field(ge=0)]] = []
    seed: int = 0
    tolerances: dict[str, Tolerance]
    # true: run the reference and the graph block by block (one block's weights in memory; per-block errors);
    # auto: when the component's checkpoint weights exceed stages.graphs.blockwise.AUTO_BYTES.
    blockwise: Literal["auto"] | bool = "auto"
    # the first N cases only (a release-size model on CPU: one small case); the report lists the cases run
    max_cases: int | None = Field(default=None, gt=0)
    # cases whose estimated activations exceed this are not run (and listed as such): a native size on ONNX Runtime
    # CPU needs ~15 GiB at release width (an unfused [batch, heads, tokens, tokens] score matrix, the VAE's im2col)
    case_memory_gib: float = Field(default=4.0, gt=0)


class LoraSettings(Strict):
    """LoRA branches as engine inputs (stages.graphs.lora): one engine serves the base model and any LoRA up to
    `max_rank`, bound at run time. `targets`: linears of each block (the family's defaults when empty)."""

    max_rank: int = Field(ge=1, le=1024)
    targets: list[str] = []
    # LoRAs bound in validation (synthetic, of the targets' shapes: rank max_rank and a lower one), at this scale
    validate_scale: float = Field(default=0.8, gt=0)


class Component(Strict):
    profile: Profile
    lora: LoraSettings | None = None
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
            if not p.serves(height, width):
                raise ValueError(f"validate.sizes: {height}x{width} lies outside the profile ({p.bounds()})")
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
    parts = component.build.parts
    if parts != "auto" and parts > 1 and not info.block_pattern:
        raise ValueError(f"{prefix}.build.parts: {name} has no repeated blocks to split its engine at; allowed: auto, 1")
    if component.precision.quantized and not info.quantizable:
        raise ValueError(f"{prefix}.precision.dtype: {name} is kept in fp32/fp16/bf16; quantization applies to "
                         f"{', '.join(n for n, i in family.components.items() if i.quantizable)}")
    if component.lora is not None:
        if not info.lora_targets:
            raise ValueError(f"{prefix}.lora: {name} takes no LoRA; LoRA branches apply to "
                             f"{', '.join(n for n, i in family.components.items() if i.lora_targets) or 'no component'}")
        wrong = [t for t in component.lora.targets if t not in info.lora_targets]
        if wrong:
            raise ValueError(f"{prefix}.lora.targets: {wrong} are not linears of a block; allowed: "
                             f"{', '.join(info.lora_targets)}")
        if component.precision.quantized:
            raise ValueError(f"{prefix}.lora: LoRA branches with {component.precision.dtype} GEMMs are not supported "
                             "yet; allowed: fp16/bf16/fp32 plans, or lora: null")
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
    true_cfg_scale: float = Field(default=4.0, ge=1)  # 1: no CFG (a distilled sampler's one call per step)
    seed: int = 0
    thresholds: PipelineCheckThresholds
    # the check holds the whole fp32 reference pipeline: with a checkpoint whose fp32 weights exceed this it is not
    # run (the manifest and the build's last lines say so); the release needs ~108 GiB
    memory_gib: float = Field(default=6.0, gt=0)


SCHEDULER_KEYS = ("base_image_seq_len", "base_shift", "invert_sigmas", "max_image_seq_len", "max_shift",
                  "num_train_timesteps", "shift", "shift_terminal", "stochastic_sampling", "time_shift_type",
                  "use_beta_sigmas", "use_dynamic_shifting", "use_exponential_sigmas", "use_karras_sigmas")


class Sampling(Strict):
    """How images are made by default (`doit generate`, `EnginePipeline`) and the scheduler the pipeline check runs:
    `scheduler` overrides the checkpoint's FlowMatchEulerDiscreteScheduler config (a distillation LoRA's published
    settings); `lora: required` makes `lora=FILE` mandatory (the recipe is a distilled sampler's)."""

    num_inference_steps: int = Field(default=50, ge=1, le=1000)
    true_cfg_scale: float = Field(default=4.0, ge=1.0)
    scheduler: dict[str, Any] = {}
    lora: Literal["optional", "required"] = "optional"

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        wrong = sorted(set(value) - set(SCHEDULER_KEYS))
        if wrong:
            raise ValueError(f"{wrong} are not FlowMatchEulerDiscreteScheduler settings; allowed: "
                             f"{', '.join(SCHEDULER_KEYS)}")
        return value


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
    sampling: Sampling = Sampling()
    audit: AuditThresholds = AuditThresholds()

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        for name, component in self.components.items():
            check_component(name, component, self.text_length, self.family_spec)
        check = self.pipeline_check
        for name, component in self.components.items() if check is not None else ():
            p = component.profile
            if p.height is not None and p.width is not None and not p.serves(check.height, check.width):
                raise ValueError(f"pipeline_check: {check.height}x{check.width} lies outside components.{name}.profile "
                                 f"({p.bounds()})")
        return self


class LoadedRecipe(BaseModel):
    """A validated recipe plus where it came from; `name` keys artifacts/ and the task names."""

    model_config = ConfigDict(frozen=True)

    name: str
    source: str
    recipe: Recipe
    resolved: dict[str, Any]
    overrides: dict[str, Any]
    parts: dict[str, dict[str, Any]] = {}  # component -> stages.recipe.fit.PartsChoice as a dict
    pipeline_check_not_run: str | None = None  # why the recipe's pipeline check does not run with this checkpoint
    lora: list[dict[str, Any]] = []  # `lora=` on the command line: [{path, sha256, scale}]
    lora_in_check: bool = False  # the pipeline check binds them (doit build, or a recipe that requires a LoRA)

    @property
    def check_loras(self) -> list[dict[str, Any]]:
        return self.lora if self.lora_in_check else []

    @property
    def family(self) -> Family:
        return self.recipe.family_spec

    def lora_targets(self, component: str) -> tuple[str, ...]:
        """The block linears that get LoRA branches: the recipe's `lora.targets`, else the family's defaults;
        () where the component has no `lora` section."""
        section = self.recipe.components.get(component)
        if section is None or section.lora is None:
            return ()
        return tuple(section.lora.targets or self.family.components[component].lora_defaults)

    def part_count(self, component: str) -> int:
        """How many engines the component is built as (`build.parts` resolved at load time)."""
        return int(self.resolved["components"][component]["build"].get("parts", 1))
