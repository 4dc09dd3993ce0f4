"""Validate stage: compare the built graph with the PyTorch fp32 model through Polygraphy's Comparator.

The reference is the stock diffusers forward (complex RoPE, `img_shapes`), so this also checks the export's
real-valued RoPE and input contract. ONNX Runtime runs the exact ONNX the engine was built from (what CI can
run); TrtRunner runs the engine only where a GPU of the engine's compute capability is present, and the
report says which of the two happened.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.inputs import StageInputs
from stages.recipe import LoadedRecipe, Tolerance, ValidateSettings

REFERENCE = "pytorch-fp32"
ORT = "onnxruntime"
TRT = "tensorrt-engine"


@dataclass(frozen=True)
class ValidateAgainstPytorch:
    component: str
    checkpoint_dir: Path
    onnx_path: Path
    engine_path: Path
    compute_capability: tuple[int, int]
    backend: str
    settings: ValidateSettings
    text_length: int
    comparison_graphs: tuple[tuple[str, Path], ...] = ()
    onnx_label: str = ""  # how the report names the graph (relative to the artifacts root: portable)

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        from polygraphy.comparator import RunResults
        from polygraphy.logger import G_LOGGER

        G_LOGGER.module_severity = G_LOGGER.WARNING
        from stages.models import component_module

        spec = component_module(self.component)
        model = spec.load(self.checkpoint_dir)
        cases = spec.validation_cases(model, self.settings, self.text_length)
        print(f"[validate] {len(cases)} cases: PyTorch fp32 reference", file=sys.stderr)
        results = RunResults()
        results.add([spec.reference_outputs(model, case) for case in cases], runner_name=REFERENCE)
        feeds = [case["feed"] for case in cases]
        print(f"[validate] ONNX Runtime on {self.onnx_path.name}", file=sys.stderr)
        results[ORT] = run_onnxruntime(self.onnx_path, feeds, ORT)
        for name, path in self.comparison_graphs:
            print(f"[validate] ONNX Runtime on comparison graph {name}", file=sys.stderr)
            results[f"{ORT}:{name}"] = run_onnxruntime(path, feeds, f"{ORT}:{name}")
        engine_status = self._maybe_run_engine(feeds, results)
        comparisons = compare(results, self.settings.tolerances, spec.OUTPUT_NAMES, comparison_pairs(results))
        results.save(str(out_dir / "results.json"))
        gated = [c for c in comparisons if c["gated"]]
        passed = all(c["passed"] for c in gated)
        lines = [format_line(c) for c in comparisons]
        for line in lines:
            print(f"[validate] {line}", file=sys.stderr)
        report = {
            "component": self.component,
            "passed": passed,
            "reference": REFERENCE,
            "runners": [name for name in results.keys() if name != REFERENCE],
            "onnxruntime": {"onnx": self.onnx_label or self.onnx_path.name, "ran": True},
            "engine": engine_status,
            "cases": [case["description"] for case in cases],
            "comparisons": gated,
            "measured_against_comparison_graphs": [c for c in comparisons if not c["gated"]],
            "freezing_effect": freezing_effect(comparisons),
            "results_file": "results.json",
        }
        if not passed:
            failed = [line for line, c in zip(lines, comparisons) if c["gated"] and not c["passed"]]
            report["failure"] = f"validation of {self.component} failed: " + "; ".join(failed)
        return report

    def _maybe_run_engine(self, feeds: list[dict[str, Any]], results: Any) -> dict[str, Any]:
        reason = engine_unrunnable_reason(self.compute_capability)
        if reason:
            print(f"[validate] engine run SKIPPED: {reason}", file=sys.stderr)
            return {"ran": False, "skipped_because": reason}
        results[TRT] = run_engine(self.engine_path, self.backend, feeds)
        return {"ran": True}


def run_onnxruntime(onnx_path: Path, feeds: list[dict[str, Any]], name: str) -> Any:
    """ONNX Runtime CPU on the graph; FP8 Q/DQ graphs get the session settings ORT needs to run them."""
    from polygraphy.backend.onnxrt import OnnxrtRunner
    from polygraphy.comparator import Comparator

    from stages.quantize import onnxruntime_session

    runner = OnnxrtRunner(lambda: onnxruntime_session(onnx_path), name=name)
    return Comparator.run([runner], data_loader=feeds)[name]


def comparison_pairs(results: Any) -> list[tuple[int, int]]:
    """Every runner against the fp32 reference, and the primary graph against the fp16 plan when there is one."""
    names = list(results.keys())
    pairs = [(0, index) for index in range(1, len(names))]
    fp16 = f"{ORT}:fp16_graph"
    if fp16 in names:
        pairs.append((names.index(fp16), names.index(ORT)))
    return pairs


def freezing_effect(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """How much freezing the text branch buys: error vs fp32 with freezing on minus with it off."""
    against_reference = {(r["runner"], r["output"]): r for r in rows if r["against"] == REFERENCE}
    effect = {}
    for output in {row["output"] for row in rows}:
        on = against_reference.get((ORT, output))
        off = against_reference.get((f"{ORT}:freezing_off", output))
        if on and off:
            effect[output] = {
                "max_abs_diff_frozen": on["max_abs_diff"], "max_abs_diff_unfrozen": off["max_abs_diff"],
                "cosine_frozen": on["min_cosine_similarity"], "cosine_unfrozen": off["min_cosine_similarity"],
                "cosine_gain_from_freezing": on["min_cosine_similarity"] - off["min_cosine_similarity"],
            }
    return effect or None


def run_engine(engine_path: Path, backend: str, feeds: list[dict[str, Any]]) -> Any:
    from stages import capabilities

    capabilities.activate_backend(backend)
    from polygraphy.backend.trt import EngineFromBytes, TrtRunner
    from polygraphy.comparator import Comparator

    runner = TrtRunner(EngineFromBytes(engine_path.read_bytes()), name=TRT)
    return Comparator.run([runner], data_loader=feeds)[TRT]


def engine_unrunnable_reason(compute_capability: tuple[int, int]) -> str | None:
    """Why the engine cannot run here, or None when a GPU of its compute capability is present."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible on this machine; validated the engine's exact ONNX with ONNX Runtime instead"
    found = torch.cuda.get_device_capability()
    if tuple(found) != tuple(compute_capability):
        return (f"GPU {torch.cuda.get_device_name()} has compute capability {found[0]}.{found[1]}; the engine was "
                f"built for {compute_capability[0]}.{compute_capability[1]}; validated its exact ONNX with ONNX Runtime")
    return None


def compare(results: Any, tolerances: dict[str, Tolerance], output_names: list[str],
            pairs: list[tuple[int, int]]) -> list[dict[str, Any]]:
    """Per runner pair and output: worst-case errors over all cases, checked against the recipe's tolerances.

    Only the built graph and the engine against the fp32 reference gate the build; comparison graphs are
    measured with the same tolerances and reported.
    """
    from polygraphy.comparator import Comparator, CosineSimilarityCompareFunc, SimpleCompareFunc

    default = tolerances.get("") or next(iter(tolerances.values()))
    atol = {name: tolerances.get(name, default).atol for name in output_names}
    rtol = {name: tolerances.get(name, default).rtol for name in output_names}
    cosine = {name: tolerances.get(name, default).cosine for name in output_names}
    simple, similarity = Comparator.compare_accuracy(
        results,
        comparisons=pairs,
        compare_func=[
            SimpleCompareFunc(atol=atol, rtol=rtol, check_error_stat="elemwise"),
            CosineSimilarityCompareFunc(cosine_similarity_threshold=cosine),
        ],
    )
    rows = []
    for pair in simple.keys():
        for name in output_names:
            stats = [iteration[name] for iteration in simple[pair]]
            sims = [iteration[name] for iteration in similarity[pair]]
            worst_cosine = min(s.cosine_similarity for s in sims)
            rows.append({
                "runner": pair[1],
                "against": pair[0],
                "gated": pair[0] == REFERENCE and pair[1] in (ORT, TRT),
                "output": name,
                "max_abs_diff": max(s.max_absdiff for s in stats),
                "max_rel_diff": max(s.max_reldiff for s in stats),
                "mean_abs_diff": max(s.mean_absdiff for s in stats),
                "min_cosine_similarity": worst_cosine,
                "tolerance": {"atol": atol[name], "rtol": rtol[name], "cosine": cosine[name]},
                "elementwise_passed": all(bool(s) for s in stats),
                "cosine_passed": worst_cosine >= cosine[name],
                "would_pass_with": {"atol": max(s.max_absdiff for s in stats), "cosine": worst_cosine},
            })
            rows[-1]["passed"] = rows[-1]["elementwise_passed"] and rows[-1]["cosine_passed"]
    return rows


def format_line(row: dict[str, Any]) -> str:
    tol = row["tolerance"]
    verdict = "PASS" if row["passed"] else "FAIL"
    against = "" if row.get("against", REFERENCE) == REFERENCE else f" vs {row['against']}"
    return (f"{row['runner']}{against} {row['output']}: max|diff| {row['max_abs_diff']:.3g} (atol {tol['atol']:g}, "
            f"rtol {tol['rtol']:g}), cosine {row['min_cosine_similarity']:.6f} (min {tol['cosine']:g}) -> {verdict}; "
            f"would pass with atol >= {row['would_pass_with']['atol']:.3g} at rtol 0, "
            f"cosine >= {row['would_pass_with']['cosine']:.6f}" + ("" if row.get("gated", True) else " (measured, not gated)"))


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> ValidateAgainstPytorch:
    assert component is not None
    precision_dir = inputs.dir("precision", component)
    precision = inputs.report("precision", component)
    graphs = tuple((name, precision_dir / path) for name, path in precision.get("comparison_graphs", {}).items())
    return ValidateAgainstPytorch(
        component=component,
        checkpoint_dir=inputs.weights,
        onnx_path=precision_dir / "model.onnx",
        engine_path=inputs.dir("engine", component) / "engine.plan",
        compute_capability=loaded.recipe.target.compute_capability,
        backend=loaded.recipe.target.backend,
        settings=loaded.recipe.components[component].validate_,
        text_length=loaded.recipe.text_length,
        comparison_graphs=graphs,
        onnx_label=inputs.relative(precision_dir / "model.onnx"),
    )
