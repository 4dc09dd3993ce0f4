"""End-to-end check: the stock QwenImagePipeline denoising loop, once in PyTorch and once on the built graphs.

Per-component validation compares single calls; errors that are harmless in one call can compound over the
denoising loop (CFG amplifies the difference of two transformer calls, the Euler steps integrate it). This
check runs the real loop — FlowMatchEulerDiscreteScheduler from the checkpoint (the released settings), true
CFG with a negative prompt — twice from the same seed and the same initial latents:

* reference: ``QwenImagePipeline.from_pretrained(checkpoint)`` in fp32, called with the prompt strings;
* graphs: the same pipeline class with its transformer replaced by an adapter onto the transformer graph,
  prompt embeddings from the text-encoder graph (fixed padding, ``tokenize_prompts``), and the VAE-decoder
  graph decoding the final latents through the pipeline's own unpack and postprocess.

Both runs record the latents after every step (``callback_on_step_end``); the report gives per-step cosine
similarity, the final images' PSNR and SSIM (scikit-image, uint8), and a side-by-side PNG per prompt. ONNX
Runtime runs the exact ONNX the engines are built from; the engines run only where a GPU of their compute
capability exists, and the report says which happened.

The reference passes ``max_sequence_length=text_length``: a prompt longer than the engines' fixed text length
is then cut identically in both runs, and the cut is reported (``truncated_tokens``) instead of showing up
as an unexplained metric drop.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stages import log
from stages.errors import fail
from stages.families import DEFAULT_FAMILY, FAMILIES
from stages.graphs.runners import OnnxRuntimeRunner, RunnerName, engine_runner, engine_unrunnable_reason
from stages.language import prompt_language

REFERENCE, ORT, TRT = RunnerName.REFERENCE.value, RunnerName.ONNXRUNTIME.value, RunnerName.ENGINE.value

METRICS_FILE = "metrics.json"
LOG = log.get("pipeline_check")

# Two English and two Chinese prompts, three of them asking for rendered text (English, mixed, Chinese).
DEFAULT_PROMPTS = (
    'A cozy corner coffee shop at dusk, a wooden shop sign above the door reading "Qwen Coffee 通义咖啡", '
    "warm light spilling onto the wet street.",
    'A vintage travel poster of snowy mountains under a clear sky, with the bold title "VISIT THE ALPS" at the top.',
    "一只橘猫坐在窗台上，窗外是下雪的城市夜景，暖黄色的灯光，电影感构图。",
    "书法作品：宣纸上用毛笔写着“春风得意”四个大字，左下角盖着红色印章，旁边小字写着“二〇二五年春”。",
)



@dataclass(frozen=True)
class Thresholds:
    """The check fails when any prompt's worst step cosine, PSNR (dB) or SSIM falls below these."""

    min_step_cosine: float
    min_psnr: float
    min_ssim: float


@dataclass(frozen=True)
class PipelineCheckSettings:
    """The recipe's `pipeline_check` section; any object with these attributes (the pydantic model) works too."""

    thresholds: Thresholds
    prompts: tuple[str, ...] = DEFAULT_PROMPTS
    negative_prompt: str = " "
    height: int = 1024
    width: int = 1024
    num_inference_steps: int = 50
    true_cfg_scale: float = 4.0
    seed: int = 0


@dataclass
class RunResult:
    """One generation: the final image (uint8 HxWx3), the latents after every step, tokens cut per prompt."""

    image: np.ndarray
    step_latents: list[np.ndarray]
    truncated: int = 0
    transformer_calls: int = 0


@dataclass(frozen=True)
class PipelineCheck:
    checkpoint_dir: Path
    onnx_paths: Mapping[str, Path]
    text_length: int
    settings: Any  # PipelineCheckSettings or the recipe's pydantic section with the same fields
    engine_paths: Mapping[str, Sequence[Path]] = field(default_factory=dict)  # per component: its engine or parts
    engine_parts: Mapping[str, Sequence[Mapping[str, Any]]] = field(default_factory=dict)  # split: part contracts
    compute_capability: tuple[int, int] | None = None
    backend: str = "tensorrt-rtx"
    display_root: Path | None = None  # reports name graphs relative to it (the artifacts root): portable
    family: str = DEFAULT_FAMILY
    transformer_max_batch: int = 2  # the transformer profile's batch max: CFG's two branches as one call within it
    loras: tuple[tuple[Path, float], ...] = ()  # `lora=`: bound to the transformer's LoRA inputs, loaded by PEFT in PyTorch
    lora_targets: tuple[str, ...] = ()
    scheduler: Mapping[str, Any] = field(default_factory=dict)  # the recipe's sampling.scheduler overrides

    @property
    def hooks(self) -> Any:
        """The family's pipeline adapters (loading the stock pipeline, running it on graphs)."""
        return FAMILIES[self.family].pipeline()

    @property
    def graph_components(self) -> tuple[str, ...]:
        return tuple(FAMILIES[self.family].components)

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        check_configuration(self)
        settings = self.settings
        LOG.info("%d prompts, %dx%d, %d steps, CFG %s: PyTorch fp32 reference, then the built graphs",
                 len(settings.prompts), settings.height, settings.width, settings.num_inference_steps,
                 settings.true_cfg_scale)
        latents, references, scheduler_report, tokenizer = self._reference_runs()
        bound, loras = (self.hooks.lora_binding(list(self.loras), self.onnx_paths["transformer"],
                                                list(self.lora_targets)) if self.loras else ({}, []))
        runs = {ORT: self._graph_runs(ORT, latents, tokenizer, bound)}
        engine = self._engine_status()
        if engine["ran"]:
            runs[TRT] = self._graph_runs(TRT, latents, tokenizer, bound)
        prompts = [self._prompt_entry(index, reference, runs, out_dir) for index, reference in enumerate(references)]
        report = self._report(prompts, runs, engine, scheduler_report, loras)
        (out_dir / METRICS_FILE).write_text(json.dumps({"thresholds": report["thresholds"], "prompts": prompts},
                                                       indent=2, ensure_ascii=False) + "\n")
        for line in report["summary"]:
            LOG.info("%s", line)
        return report

    # -- runs -----------------------------------------------------------------------------------------------

    def _reference_runs(self) -> tuple[Any, list[RunResult], dict[str, Any], Any]:
        """All prompts through the family's stock pipeline; the model is freed before any graph session opens."""
        latents, runs, scheduler_report, tokenizer = self.hooks.reference_runs(
            self.checkpoint_dir, self.settings, self.text_length, capture_steps, self.loras, dict(self.scheduler))
        return latents, [RunResult(image, steps) for image, steps in runs], scheduler_report, tokenizer

    def _graph_runs(self, runner: str, latents: Any, tokenizer: Any, bound: Mapping[str, Any]) -> dict[str, Any]:
        """All prompts with every component that has a graph replaced by it (ONNX Runtime or the engine); `bound`:
        the transformer's LoRA inputs."""
        with contextlib.ExitStack() as stack:
            components, kinds = self._component_runs(runner, stack, bound)
            LOG.debug("%s: %s", runner, ", ".join(f"{c} on {k}" for c, k in kinds.items()))
            runs, negative_cut = self.hooks.graph_runs(self.checkpoint_dir, components, self.settings,
                                                       self.text_length, latents, tokenizer, capture_steps,
                                                       self.transformer_max_batch, dict(self.scheduler))
        results = [RunResult(image, steps, cut, calls) for image, steps, cut, calls in runs]
        return {"components": kinds, "results": results, "negative_prompt_truncated": negative_cut}

    def _component_runs(self, runner: str, stack: contextlib.ExitStack, bound: Mapping[str, Any]
                        ) -> tuple[dict[str, Any], dict[str, str]]:
        hooks = self.hooks
        runs, kinds = {}, {}
        for component in self.graph_components:
            config = hooks.feed_config(self.checkpoint_dir, component)
            if runner == TRT and component in self.engine_paths:
                session = stack.enter_context(engine_runner(self.engine_paths[component], self.backend,
                                                            self.engine_parts.get(component, ())))
                infer = _with_feed(session.infer, bound if component == "transformer" else {})
                runs[component], kinds[component] = hooks.graph_component_run(component, infer, config), TRT
            elif component in self.onnx_paths:
                session = stack.enter_context(OnnxRuntimeRunner(self.onnx_paths[component]))
                infer = _with_feed(session.infer, bound if component == "transformer" else {})
                runs[component], kinds[component] = hooks.graph_component_run(component, infer, config), ORT
            else:
                runs[component] = hooks.torch_component_run(component, self.checkpoint_dir)
                kinds[component] = f"{REFERENCE} (no graph built for it)"
        return runs, kinds

    def _engine_status(self) -> dict[str, Any]:
        if not self.engine_paths or self.compute_capability is None:
            return {"ran": False, "skipped_because": "no engines configured for this check"}
        reason = engine_unrunnable_reason(self.compute_capability)
        if reason:
            LOG.debug("engine run skipped: %s", reason)
            return {"ran": False, "skipped_because": reason}
        missing = {c: str(p) for c, paths in self.engine_paths.items() for p in paths if not Path(p).is_file()}
        if missing:
            raise fail(next(iter(missing.values())), "engine_paths", f"engines not found for {sorted(missing)} "
                       "(run the engine stage first)")
        return {"ran": True, "engines": {c: [str(p) for p in paths] for c, paths in self.engine_paths.items()}}

    # -- metrics and report ---------------------------------------------------------------------------------

    def _prompt_entry(self, index: int, reference: RunResult, runs: dict[str, Any], out_dir: Path) -> dict[str, Any]:
        prompt = self.settings.prompts[index]
        entry: dict[str, Any] = {"index": index, "prompt": prompt, "language": prompt_language(prompt), "runs": {}}
        for runner, run in runs.items():
            result: RunResult = run["results"][index]
            metrics = compare_runs(reference, result)
            failures = threshold_failures(metrics, self.settings.thresholds)
            entry["runs"][runner] = {**metrics, "truncated_tokens": result.truncated,
                                     "transformer_calls": result.transformer_calls,
                                     "passed": not failures, "failures": failures}
        images = [reference.image, *(run["results"][index].image for run in runs.values())]
        entry["image"] = save_side_by_side(images, out_dir / f"{index}.png")
        entry["panels"] = [REFERENCE, *runs]
        return entry

    def _report(self, prompts: list[dict[str, Any]], runs: dict[str, Any], engine: dict[str, Any],
                scheduler: dict[str, Any], loras: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        thresholds = {name: getattr(s.thresholds, name) for name in ("min_step_cosine", "min_psnr", "min_ssim")}
        failed = [f"prompt {p['index']} ({_short(p['prompt'])}) on {runner}: {', '.join(run['failures'])}"
                  for p in prompts for runner, run in p["runs"].items() if run["failures"]]
        truncated = {str(p["index"]): p["runs"][ORT]["truncated_tokens"] for p in prompts if p["runs"][ORT]["truncated_tokens"]}
        report: dict[str, Any] = {
            "passed": not failed,
            "runner": ORT,
            "runners": list(runs),
            "reference": REFERENCE,
            "engine": engine,
            "components": {runner: run["components"] for runner, run in runs.items()},
            "onnx": {c: _display_path(p, self.display_root) for c, p in self.onnx_paths.items()},
            "scheduler": scheduler,
            "lora": loras,  # what was bound: file, sha256, scale, rank
            "settings": {"height": s.height, "width": s.width, "num_inference_steps": s.num_inference_steps,
                         "true_cfg_scale": s.true_cfg_scale, "seed": s.seed, "negative_prompt": s.negative_prompt,
                         "text_length": self.text_length},
            "thresholds": thresholds,
            "truncated_prompts": len(truncated),
            "truncated_tokens": truncated,
            "negative_prompt_truncated_tokens": runs[ORT]["negative_prompt_truncated"],
            "prompts": prompts,
            "images": [p["image"] for p in prompts],
            "metrics_file": METRICS_FILE,
        }
        report["summary"] = summary_lines(report)
        if failed:
            report["failure"] = "end-to-end pipeline check failed: " + "; ".join(failed)
        return report


# -- building blocks ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def capture_steps() -> Iterator[tuple[Any, list[np.ndarray]]]:
    """A `callback_on_step_end` that keeps a float64 copy of the latents after every denoising step."""
    steps: list[np.ndarray] = []

    def callback(pipeline: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        steps.append(tensors["latents"].detach().double().cpu().numpy().copy())
        return {}

    yield callback, steps


def step_cosines(reference: Sequence[np.ndarray], graphs: Sequence[np.ndarray]) -> list[float]:
    """Cosine similarity of the flattened latents after each step (float64)."""
    if len(reference) != len(graphs):
        raise ValueError(f"step latents: the reference has {len(reference)} steps, the graph run {len(graphs)}")
    values = []
    for ref, got in zip(reference, graphs):
        a, b = np.ravel(ref).astype(np.float64), np.ravel(got).astype(np.float64)
        denominator = np.linalg.norm(a) * np.linalg.norm(b)
        values.append(float(a @ b / denominator) if denominator > 0 else float("nan"))
    return values


def image_metrics(reference: np.ndarray, image: np.ndarray) -> dict[str, Any]:
    """PSNR (dB) and SSIM of two uint8 HxWx3 images; identical images have no finite PSNR (reported as null)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    if reference.shape != image.shape or reference.dtype != np.uint8 or image.dtype != np.uint8:
        raise ValueError(f"images: need two uint8 arrays of one shape, got {reference.shape} {reference.dtype} "
                         f"and {image.shape} {image.dtype}")
    identical = bool(np.array_equal(reference, image))
    psnr = None if identical else float(peak_signal_noise_ratio(reference, image, data_range=255))
    ssim = float(structural_similarity(reference, image, channel_axis=-1, data_range=255))
    difference = np.abs(reference.astype(np.int16) - image.astype(np.int16))
    return {"psnr_db": psnr, "ssim": ssim, "identical": identical, "max_pixel_diff": int(difference.max())}


def compare_runs(reference: RunResult, graphs: RunResult) -> dict[str, Any]:
    cosines = step_cosines(reference.step_latents, graphs.step_latents)
    return {"step_cosine": cosines, "min_step_cosine": min(cosines), **image_metrics(reference.image, graphs.image)}


def threshold_failures(metrics: dict[str, Any], thresholds: Any) -> list[str]:
    """One line per metric below its threshold; NaN fails (comparisons are written so NaN never passes)."""
    psnr = float("inf") if metrics["identical"] else metrics["psnr_db"]
    checks = [("min step latent cosine", metrics["min_step_cosine"], "min_step_cosine", thresholds.min_step_cosine),
              ("PSNR", psnr, "min_psnr", thresholds.min_psnr),
              ("SSIM", metrics["ssim"], "min_ssim", thresholds.min_ssim)]
    return [f"{label} {value:.6g} < {key} {limit:g}" for label, value, key, limit in checks if not value >= limit]


def save_side_by_side(images: Sequence[np.ndarray], path: Path) -> str:
    """[PyTorch | graph run(s)] as one PNG, panels left to right in the report's `panels` order."""
    from PIL import Image

    height, width = images[0].shape[:2]
    canvas = Image.new("RGB", (width * len(images), height))
    for position, image in enumerate(images):
        canvas.paste(Image.fromarray(image), (position * width, 0))
    canvas.save(path, format="PNG")
    return path.name


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for prompt in report["prompts"]:
        for runner, run in prompt["runs"].items():
            psnr = "identical" if run["identical"] else f"{run['psnr_db']:.2f} dB"
            verdict = "PASS" if run["passed"] else "FAIL"
            lines.append(f"prompt {prompt['index']} [{prompt['language']}] {runner}: min step cosine "
                         f"{run['min_step_cosine']:.6f}, PSNR {psnr}, SSIM {run['ssim']:.4f} -> {verdict}")
    engine = report["engine"]
    lines.append("engine ran (TrtRunner)" if engine["ran"] else f"engine NOT run: {engine['skipped_because']}")
    return lines


def _display_path(path: Path, root: Path | None) -> str:
    """Relative to the artifacts root when the graph is a build artifact, else the file name: portable."""
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve())) if root else Path(path).name
    except ValueError:
        return Path(path).name


def _short(prompt: str, limit: int = 40) -> str:
    return repr(prompt if len(prompt) <= limit else prompt[: limit - 1] + "…")


# -- configuration checks and recipe wiring -----------------------------------------------------------------


def check_configuration(check: PipelineCheck) -> None:
    """Everything the run needs, checked before loading any model; raises ForgeError naming the key. (The prompt
    rules are the recipe's, checked when it loads: stages.recipe.prompts.)"""
    components = check.graph_components
    unknown = sorted(set(check.onnx_paths) - set(components))
    if unknown:
        raise fail("pipeline_check", "onnx_paths", f"unknown components {unknown}; allowed: {', '.join(components)}")
    if not check.onnx_paths:
        raise fail("pipeline_check", "onnx_paths", f"needs at least one built graph of {', '.join(components)}")
    for component, path in check.onnx_paths.items():
        if not Path(path).is_file():
            raise fail(path, component, "built graph not found (run the precision stage first)")
    if not (Path(check.checkpoint_dir) / "model_index.json").is_file():
        raise fail(check.checkpoint_dir, "checkpoint_dir", "not a diffusers-layout checkpoint (no model_index.json)")


def _with_feed(infer: Any, extra: Mapping[str, Any]) -> Any:
    """A session's infer with inputs bound for the whole check (the transformer's LoRA inputs)."""
    return (lambda feed: infer({**feed, **extra})) if extra else infer


def from_recipe(loaded: Any, component: str | None, inputs: Any) -> PipelineCheck:
    """Recipe-wide stage: every component the recipe builds runs on its graph; the others stay PyTorch."""
    section = getattr(loaded.recipe, "pipeline_check", None)
    if section is None:
        raise fail(loaded.source, "pipeline_check", "the recipe has no pipeline_check section (prompts, negative_prompt, "
                   "height, width, num_inference_steps, true_cfg_scale, seed, thresholds)")
    built = [c for c in loaded.family.components if c in loaded.recipe.components]
    return PipelineCheck(
        checkpoint_dir=inputs.weights,
        onnx_paths={c: inputs.dir("precision", c) / "model.onnx" for c in built},
        engine_paths={c: tuple(path / "engine.plan" for path in inputs.parts("engine", c)) for c in built},
        engine_parts={c: inputs.part_contracts("engine", c) for c in built},
        text_length=loaded.recipe.text_length,
        settings=section,
        compute_capability=loaded.recipe.target.compute_capability,
        backend=loaded.recipe.target.backend,
        display_root=inputs.root,
        family=loaded.recipe.family,
        transformer_max_batch=(loaded.recipe.components["transformer"].profile.batch.max
                               if "transformer" in built else 2),
        loras=tuple((Path(item["path"]), float(item["scale"])) for item in loaded.check_loras),
        lora_targets=loaded.lora_targets("transformer"),
        scheduler=dict(loaded.recipe.sampling.scheduler),
    )
