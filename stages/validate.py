"""Validate stage: compare the built graph with the PyTorch fp32 model through Polygraphy's Comparator.

The reference is the stock diffusers forward (complex RoPE, `img_shapes`), so this also checks the export's
real-valued RoPE and input contract. ONNX Runtime runs the exact ONNX the engine was built from (what CI can
run); TrtRunner runs the engine only where a GPU of the engine's compute capability is present, and the
report says which of the two happened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stages import log
from stages.errors import fail
from stages.families import DEFAULT_FAMILY, FAMILIES, component_module
from stages.graphs import blockwise, parts
from stages.graphs.runners import (ChainedRunner, ComparisonGraph, OnnxRuntimeRunner, Runner, RunnerName,
                                   engine_runner, engine_unrunnable_reason, onnxruntime_execution, run_all)
from stages.inputs import StageInputs
from stages.reports import (BlockError, Comparison, EngineRun, FreezingEffect, OnnxRuntimeRun, Tolerances,
                            ValidationReport, WouldPass)
from stages.store.local import scratch_beside

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe, LoraSettings, Tolerance, ValidateSettings

REFERENCE = RunnerName.REFERENCE.value
ORT = RunnerName.ONNXRUNTIME.value
TRT = RunnerName.ENGINE.value
LOG = log.get("validate")
GIB = 1 << 30


@dataclass(frozen=True)
class ValidateAgainstPytorch:
    component: str
    checkpoint_dir: Path
    onnx_path: Path
    engine_paths: tuple[Path, ...]
    compute_capability: tuple[int, int]
    backend: str
    settings: ValidateSettings
    text_length: int
    comparison_graphs: tuple[tuple[ComparisonGraph, Path], ...] = ()
    onnx_label: str = ""  # how the report names the graph (relative to the artifacts root: portable)
    family: str = DEFAULT_FAMILY
    blockwise: bool = False
    part_contracts: tuple[dict[str, Any], ...] = ()  # the engine's parts (stages.graphs.parts), when it is split
    lora: LoraSettings | None = None  # the graph has LoRA inputs: also validate with LoRAs bound
    lora_targets: tuple[str, ...] = ()

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        from polygraphy.comparator import RunResults

        spec = component_module(self.component, self.family)
        execution = onnxruntime_execution(self.onnx_path)
        LOG.info("%s %s on %s: %s", self.component, ORT, self.onnx_label or self.onnx_path.name, execution)
        blocks, lora_report = None, None
        results = RunResults()
        with scratch_beside(out_dir, "parts") as scratch:
            built_graph = self._built_graph(spec, Path(scratch))
            if self.blockwise:
                blocks, cases, not_run, lora_report = self._blockwise(spec, out_dir, results, Path(scratch))
            else:
                model = spec.load(self.checkpoint_dir)
                cases, not_run = self._cases(spec, model)
                if self.lora is not None:
                    extra, lora_report = self._lora_cases(spec, model, cases, Path(scratch))
                    cases = [*cases, *extra]
                LOG.debug("%d cases: PyTorch fp32 reference", len(cases))
                results.add([spec.reference_outputs(model, case) for case in cases], runner_name=REFERENCE)
                del model
                LOG.debug("ONNX Runtime on %s", self.onnx_path.name)
                results.add(run_all(built_graph, [c["feed"] for c in cases]), runner_name=ORT)
        if not self.blockwise:
            for graph, path in self.comparison_graphs:
                LOG.debug("ONNX Runtime on comparison graph %s", graph.value)
                results.add(run_all(OnnxRuntimeRunner(path, graph.runner), [c["feed"] for c in cases]),
                            runner_name=graph.runner)
        feeds = [case["feed"] for case in cases]
        engine_status = self._maybe_run_engine(feeds, results)
        comparisons = compare(results, self.settings.tolerances, spec.OUTPUT_NAMES, comparison_pairs(results))
        results.save(str(out_dir / "results.json"))
        gated = [c for c in comparisons if c.gated]
        passed = all(c.passed for c in gated)
        for comparison in comparisons:
            LOG.info("%s %s", self.component, format_line(comparison))
        failed = [format_line(c) for c in gated if not c.passed]
        return ValidationReport(
            component=self.component,
            passed=passed,
            reference=REFERENCE,
            runners=[name for name in results.keys() if name != REFERENCE],
            onnxruntime=OnnxRuntimeRun(onnx=self.onnx_label or self.onnx_path.name, ran=True, execution=execution,
                                       parts=len(self.part_contracts) or None),
            engine=engine_status,
            cases=[case["description"] for case in cases],
            cases_not_run=not_run,
            comparisons=gated,
            measured_against_comparison_graphs=[c for c in comparisons if not c.gated],
            freezing_effect=freezing_effect(comparisons),
            results_file="results.json",
            blockwise=self.blockwise,
            blocks=blocks,
            lora=lora_report,
            failure=f"validation of {self.component} failed: " + "; ".join(failed) if failed else None,
        ).dump()

    def _lora_cases(self, spec: Any, model: Any, cases: list[dict[str, Any]], work: Path
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        import onnx

        assert self.lora is not None
        graph = onnx.load(str(self.onnx_path), load_external_data=False).graph
        declared = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim]) for v in graph.input]
        extra, report = spec.lora_cases(model, cases, self.lora_targets, self.lora.max_rank, self.lora.validate_scale,
                                        work, self.settings.seed, declared)
        LOG.debug("%d LoRA cases against diffusers + PEFT", len(extra))
        return extra, report

    def _built_graph(self, spec: Any, work: Path) -> Runner:
        """ONNX Runtime on the graph the engine was built from: the precision graph, or for a split engine its part
        graphs chained, each checked to be the very graph its engine part was built from."""
        if not self.part_contracts:
            return OnnxRuntimeRunner(self.onnx_path)
        import onnx

        model = onnx.load(str(self.onnx_path), load_external_data=False)
        pattern = FAMILIES[self.family].components[self.component].block_pattern
        plans = parts.plan_parts(model, pattern, len(self.part_contracts))
        runners = []
        for plan, contract in zip(plans, self.part_contracts):
            path, sha256 = parts.write_part(self.onnx_path, plan, work, model)
            if sha256 != contract["graph_sha256"]:
                raise fail(self.engine_paths[plan.index], "part", f"{plan.name} of {self.component} was built from "
                           "another graph than this precision graph's part; rebuild the engine")
            runners.append(OnnxRuntimeRunner(path, name=f"{ORT} {plan.name}"))
        LOG.info("%s: %d engine parts; ONNX Runtime runs their graphs chained", self.component, len(plans))
        return ChainedRunner(runners, [p.inputs for p in plans], spec.OUTPUT_NAMES, ORT)

    def _cases(self, spec: Any, model: Any) -> tuple[list[dict[str, Any]], list[str]]:
        """(the recipe's cases to run, why the others are not run): the first `max_cases`, less those whose
        activations exceed `case_memory_gib`; refuses in one line when none is left."""
        cases = spec.validation_cases(model, self.settings, self.text_length)[: self.settings.max_cases]
        budget = self.settings.case_memory_gib * GIB
        kept, not_run = [], []
        for case in cases:
            if case.get("activation_bytes", 0) <= budget:
                kept.append(case)
                continue
            not_run.append(f"{case['description']}: ~{case['activation_bytes'] / GIB:.1f} GiB of activations "
                           f"(validate.case_memory_gib {self.settings.case_memory_gib:g})")
            LOG.warning("%s: case not run: %s", self.component, not_run[-1])
        if not kept:
            raise fail("validate", "case_memory_gib", f"every {self.component} case needs more than "
                       f"{self.settings.case_memory_gib:g} GiB of activations; raise it or add a smaller validate.sizes entry")
        return kept, not_run

    def _blockwise(self, spec: Any, out_dir: Path, results: Any, work: Path
                   ) -> tuple[list[BlockError], list[dict[str, Any]], list[str], dict[str, Any] | None]:
        """Reference and graphs run block by block (one block's weights in memory); errors after every block."""
        model = spec.load_meta(self.checkpoint_dir)
        cases, not_run = self._cases(spec, model)
        lora_report = None
        if self.lora is not None:
            extra, lora_report = self._lora_cases(spec, model, cases, work)
            lora_report["reference"] += ", block by block (the LoRAs injected into the meta model)"
            cases = [*cases, *extra]
        pattern = FAMILIES[self.family].components[self.component].block_pattern
        with scratch_beside(out_dir, "segments") as scratch:
            work = Path(scratch)
            graphs = [(ORT, self.onnx_path), *((g.runner, p) for g, p in self.comparison_graphs)]
            chained = {name: _Chain(path, pattern, work / str(number)) for number, (name, path) in enumerate(graphs)}
            reference, outputs, per_block = [], {name: [] for name in chained}, {}
            for number, case in enumerate(cases):
                LOG.info("block-wise case %d/%d: %s", number + 1, len(cases), case["description"])
                ref_blocks, final = spec.blockwise_reference(self.checkpoint_dir, case)
                reference.append(final)
                for name, chain in chained.items():
                    block_outputs, graph_final = chain.run(case["feed"])
                    outputs[name].append(graph_final)
                    if name == ORT:
                        _worst_block_errors(per_block, ref_blocks, block_outputs)
        results.add(reference, runner_name=REFERENCE)
        for name, runs in outputs.items():
            results.add(runs, runner_name=name)
        return [per_block[b] for b in sorted(per_block)], cases, not_run, lora_report

    def _maybe_run_engine(self, feeds: list[dict[str, Any]], results: Any) -> EngineRun:
        reason = engine_unrunnable_reason(self.compute_capability)
        if reason:
            LOG.debug("engine run skipped: %s", reason)
            return EngineRun(ran=False, skipped_because=reason)
        results.add(run_all(engine_runner(self.engine_paths, self.backend, self.part_contracts), feeds), runner_name=TRT)
        return EngineRun(ran=True)


def comparison_pairs(results: Any) -> list[tuple[int, int]]:
    """Every runner against the fp32 reference, and the primary graph against the fp16 plan when there is one."""
    names = list(results.keys())
    pairs = [(0, index) for index in range(1, len(names))]
    fp16 = ComparisonGraph.FP16_PLAN.runner
    if fp16 in names:
        pairs.append((names.index(fp16), names.index(ORT)))
    return pairs


class _Chain:
    """A graph cut into block segments once, run on any number of feeds."""

    def __init__(self, onnx_path: Path, pattern: str, work: Path) -> None:
        import onnx

        work.mkdir(parents=True)
        self.part = blockwise.partition(onnx.load(str(onnx_path), load_external_data=False), pattern)
        self.paths = blockwise.write_segments(onnx_path, self.part, work)

    def run(self, feed: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        blocks, final = [], {}
        for segment, outputs in blockwise.run_chained(self.paths, self.part, feed):
            if segment.block is not None:
                blocks.append(outputs)
            final = outputs
        return blocks, {name: final[name] for name in self.part.graph_outputs}


def _worst_block_errors(per_block: dict[int, BlockError], reference: list[dict[str, Any]],
                        graph: list[dict[str, Any]]) -> None:
    """Match each block's reference streams to the graph's block outputs (same shape, closest by cosine:
    the exporter may hand more tensors across a cut) and keep the worst error per block over cases.

    A block's reference holds the stream that reaches the output first (the transformer's image stream, the
    text encoder's hidden states) and, for a dual-stream block, `text`."""
    import numpy as np

    def error(expected: Any, outputs: dict[str, Any]) -> tuple[float, float] | None:
        best = None
        for value in outputs.values():
            if tuple(value.shape) != tuple(expected.shape):
                continue
            a, b = expected.astype(np.float64).ravel(), np.asarray(value, np.float64).ravel()
            cosine = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            candidate = (float(np.abs(a - b).max()), cosine)
            best = candidate if best is None or candidate[1] > best[1] else best
        return best

    for index, (expected, outputs) in enumerate(zip(reference, graph)):
        main = next(iter(expected.values()))  # the stream that reaches the output comes first
        image = error(main, outputs)
        text = error(expected["text"], outputs) if "text" in expected else None
        if image is None:
            continue
        previous = per_block.get(index)
        worst = BlockError(block=index, max_abs_diff=image[0], cosine=image[1],
                           text_max_abs_diff=text[0] if text else None, text_cosine=text[1] if text else None)
        if previous is not None:
            worst = BlockError(
                block=index, max_abs_diff=max(previous.max_abs_diff, worst.max_abs_diff),
                cosine=min(previous.cosine, worst.cosine),
                text_max_abs_diff=_worst(max, previous.text_max_abs_diff, worst.text_max_abs_diff),
                text_cosine=_worst(min, previous.text_cosine, worst.text_cosine))
        per_block[index] = worst


def _worst(pick: Any, a: float | None, b: float | None) -> float | None:
    values = [v for v in (a, b) if v is not None]
    return pick(values) if values else None


def freezing_effect(rows: list[Comparison]) -> dict[str, FreezingEffect] | None:
    """How much freezing the text branch buys: error vs fp32 with freezing on minus with it off."""
    against_reference = {(r.runner, r.output): r for r in rows if r.against == REFERENCE}
    effect = {}
    for output in sorted({row.output for row in rows}):
        on = against_reference.get((ORT, output))
        off = against_reference.get((ComparisonGraph.FREEZING_OFF.runner, output))
        if on and off:
            effect[output] = FreezingEffect(
                max_abs_diff_frozen=on.max_abs_diff, max_abs_diff_unfrozen=off.max_abs_diff,
                cosine_frozen=on.min_cosine_similarity, cosine_unfrozen=off.min_cosine_similarity,
                cosine_gain_from_freezing=on.min_cosine_similarity - off.min_cosine_similarity)
    return effect or None


def compare(results: Any, tolerances: dict[str, Tolerance], output_names: list[str],
            pairs: list[tuple[int, int]]) -> list[Comparison]:
    """Per runner pair and output: worst-case errors over all cases, gated relative to the reference's scale.

    Absolute tolerances set on the tiny model fail at release width, where the hidden states are much larger and
    an fp16 graph's absolute error grows with them; errors as fractions of the reference's own max|x| and rms, with
    the cosine, mean the same at every width. Only the built graph and the engine against the fp32 reference gate
    the build; comparison graphs are measured with the same gates and reported.
    """
    missing = [name for name in output_names if name not in tolerances]
    if missing:
        raise fail("validate", "tolerances", f"no tolerance for outputs {missing}; every output needs one")
    names = list(results.keys())
    rows = []
    for first, second in pairs:
        reference, runner = results[names[first]], results[names[second]]
        for name in output_names:
            cases = [case_errors(ref[name], out[name]) for ref, out in zip(reference, runner)]
            tol = tolerances[name]
            worst = WouldPass(max_error=max(c["max_error"] for c in cases),
                              rms_error=max(c["rms_error"] for c in cases),
                              cosine=min(c["cosine"] for c in cases))
            error_passed = worst.max_error <= tol.max_error and worst.rms_error <= tol.rms_error
            cosine_passed = worst.cosine >= tol.cosine
            rows.append(Comparison(
                runner=names[second], against=names[first], output=name,
                gated=names[first] == REFERENCE and names[second] in (ORT, TRT),
                max_abs_diff=max(c["max_abs_diff"] for c in cases),
                mean_abs_diff=max(c["mean_abs_diff"] for c in cases),
                reference_max_abs=min(c["reference_max_abs"] for c in cases),
                reference_rms=min(c["reference_rms"] for c in cases),
                max_error=worst.max_error, rms_error=worst.rms_error, min_cosine_similarity=worst.cosine,
                tolerance=Tolerances(max_error=tol.max_error, rms_error=tol.rms_error, cosine=tol.cosine),
                error_passed=error_passed, cosine_passed=cosine_passed, would_pass_with=worst,
                passed=error_passed and cosine_passed,
            ))
    return rows


def case_errors(reference: Any, output: Any) -> dict[str, float]:
    """One case's errors in float64; a zero reference scale makes any difference an infinite relative error."""
    import numpy as np

    ref = np.asarray(reference, dtype=np.float64).ravel()
    out = np.asarray(output, dtype=np.float64).ravel()
    if ref.shape != out.shape:
        raise fail("validate", "outputs", f"shape {np.shape(output)} against the reference's {np.shape(reference)}")
    diff = np.abs(out - ref)
    ref_max, ref_rms = float(np.abs(ref).max(initial=0.0)), float(np.sqrt(np.mean(ref * ref)))
    diff_max, diff_rms = float(diff.max(initial=0.0)), float(np.sqrt(np.mean(diff * diff)))
    norms = float(np.linalg.norm(ref) * np.linalg.norm(out))
    finite = bool(np.isfinite(out).all())

    def relative(error: float, scale: float) -> float:
        return error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))

    return {"max_abs_diff": diff_max if finite else float("inf"),
            "mean_abs_diff": float(diff.mean()) if finite else float("inf"),
            "reference_max_abs": ref_max, "reference_rms": ref_rms,
            "max_error": relative(diff_max, ref_max) if finite else float("inf"),
            "rms_error": relative(diff_rms, ref_rms) if finite else float("inf"),
            "cosine": float(np.dot(ref, out) / norms) if norms > 0 and finite else (1.0 if diff_max == 0 else 0.0)}


def format_line(row: Comparison) -> str:
    """One line per output: the worst errors relative to the reference's scale, the gate, the verdict, and what
    would have passed."""
    tol, need = row.tolerance, row.would_pass_with
    verdict = "PASS" if row.passed else "FAIL"
    against = "" if row.against == REFERENCE else f" vs {row.against}"
    return (f"{row.runner}{against} {row.output}: max|diff| {row.max_abs_diff:.3g} = {row.max_error:.3g} of "
            f"max|ref| {row.reference_max_abs:.3g} (max_error {tol.max_error:g}), rms_error {row.rms_error:.3g} "
            f"(max {tol.rms_error:g}), cosine {row.min_cosine_similarity:.6f} (min {tol.cosine:g}) -> {verdict}; "
            f"would pass with max_error >= {need.max_error:.3g}, rms_error >= {need.rms_error:.3g}, "
            f"cosine >= {need.cosine:.6f}" + ("" if row.gated else " (measured, not gated)"))


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> ValidateAgainstPytorch:
    assert component is not None
    precision_dir = inputs.dir("precision", component)
    precision = inputs.report("precision", component)
    lora = loaded.recipe.components[component].lora
    graphs = tuple((ComparisonGraph(name), precision_dir / path)
                   for name, path in precision.get("comparison_graphs", {}).items())
    return ValidateAgainstPytorch(
        component=component,
        checkpoint_dir=inputs.weights,
        onnx_path=precision_dir / "model.onnx",
        engine_paths=tuple(path / "engine.plan" for path in inputs.parts("engine", component)),
        compute_capability=loaded.recipe.target.compute_capability,
        backend=loaded.recipe.target.backend,
        settings=loaded.recipe.components[component].validate_,
        text_length=loaded.recipe.text_length,
        comparison_graphs=graphs,
        onnx_label=inputs.relative(precision_dir / "model.onnx"),
        part_contracts=inputs.part_contracts("engine", component),
        family=loaded.recipe.family,
        blockwise=blockwise.wanted(loaded.recipe.components[component].validate_.blockwise, loaded.family,
                                   component, inputs.weights),
        lora=lora,
        lora_targets=loaded.lora_targets(component),
    )


