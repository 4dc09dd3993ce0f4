"""Quantize stage: explicit Q/DQ through ModelOpt's ONNX quantizer on CPU (TensorRT 11 / RTX are strongly typed).

Modes and what each produces (ModelOpt 0.47, base install, `calibration_eps=["cpu"]`):

- ``int8``: W8A8. Per-channel INT8 weights, per-tensor INT8 activations calibrated with ``max`` or ``entropy``.
- ``int8_weight_only``: W8A16. INT8 weights behind DequantizeLinear only (no activation Q/DQ), made by ModelOpt's
  INT4 RTN path with every GEMM listed in ``layers_8bit`` (per-channel INT8). No calibration data is needed.
- ``fp8``: FP8 E4M3 weights and activations, ``max`` calibration only (ModelOpt calibrates as INT8 and rescales).

Why the extra graph work around the quantizer:

- ONNX Runtime's QDQ quantizer shares one Q/DQ pair between all consumers of a tensor (``DedicatedQDQPair`` is off),
  so a node in ``nodes_to_exclude`` still reads a dequantized tensor when another consumer is quantized (seen here:
  ``txt_norm1``/``txt_norm2`` LayerNorms). :func:`detach_excluded` rewires excluded nodes to the unquantized tensor,
  then :func:`qdq_violations` proves no frozen or excluded node reads a DequantizeLinear output; otherwise we fail.
- The additive attention mask holds float32-min sentinels: ``entropy`` cannot histogram them ("Too many bins") and
  a scale of 3.4e38/127 overflows fp16. Nodes consuming such tensors are excluded (reason ``mask_sentinel``).
- Calibration must cover several image sizes, and the RoPE tables are indexed by image token on axis 0: ModelOpt's
  ``calibration_data`` dict is split along axis 0 of every input, which would cut those tables apart. Feeds therefore
  go in through a ``CalibrationDataReader`` (:func:`feed_reader`), one complete engine feed per calibration step.

At release size (``precision.blockwise``) the graph is quantized a piece of a block at a time
(:func:`run_modelopt_by_block`): memory holds at most :data:`SEGMENT_BYTES` of weights, each piece is calibrated on
its inputs as the chained unquantized graph computes them, and calibrated modes place their activation Q/DQ where
ModelOpt places them in the whole graph (:mod:`stages.graphs.placement`).

Capability rules for these modes live in :mod:`stages.targets.capabilities` (checked before any work).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from stages import log
from stages.calibration import load_feeds
from stages.errors import fail
from stages.graphs.blockwise import partition, write_segments
from stages.graphs.onnx_io import save_model
from stages.graphs.placement import Share, whole_graph_placement
from stages.graphs.qdq import (GEMM_OPS, QDQ_OPS, ONNX_FLOAT8E4M3FN, ONNX_INT8, calibration_ranges, dequantized_types,
                               bypass_inputs, detach_excluded, mask_sentinel_consumers, qdq_violations, quantized_nodes,
                               quantizer_skipped, unquantized_outputs, write_calibration_cache)
from stages.graphs.runners import ComparisonGraph, OnnxRuntimeRunner, onnxruntime_cpu_note
from stages.graphs.segmented import transform_segments
from stages.graphs.weights import (hide_weights, link_upstream_files, materialize, reference_casts,
                                   reference_unchanged, restore_weights)
from stages.inputs import StageInputs
from stages.precision import ConvertPrecision, surgery_inputs
from stages.store.local import scratch_beside
from stages.targets.capabilities import CALIBRATION_METHODS, QUANTIZATION_MODES, quantization_mode

if TYPE_CHECKING:
    from stages.recipe.schema import LoadedRecipe

LOG = log.get("quantize")

MODEL_FILE = "model.onnx"
RANGES_FILE = "calibration.json"
CACHE_FILE = "calibration.cache"
QUANTIZED_WEIGHTS = "quantized_weights.bin"  # tensors written by block-wise quantization, once
# Block-wise: ModelOpt is handed at most this many checkpoint bytes at once; it holds an fp32, transposed copy of
# what it quantizes and two or three more (~16x the bf16 bytes: 10.8 GB for one 0.68 GB release block).
SEGMENT_BYTES = 160 * 1024**2
EXTERNAL_MIN_BYTES = 1024  # smaller tensors stay inside the graph, as do Q/DQ scales and zero points
MODES = QUANTIZATION_MODES
HIGH_PRECISIONS = ("fp32", "fp16", "bf16")
EXCLUSION_KEYS = {"frozen_text_branch": "surgery.frozen_nodes", "recipe_pattern": "precision.exclude",
                  "mask_sentinel": "mask_sentinel"}

Feed = Mapping[str, np.ndarray]


mode_for = quantization_mode


# ----------------------------------------------------------------------------------------------------------------
# Calibration data
# ----------------------------------------------------------------------------------------------------------------


def feed_reader(feeds: Sequence[Feed]) -> Any:
    """An ORT `CalibrationDataReader` giving one complete engine feed per calibration step, read from `feeds` when
    asked for (feeds kept on disk are read one at a time).

    Shapes may differ between steps (image sizes, batch). Defined lazily so that the capability rules above
    can be imported by the task graph without importing ONNX Runtime.
    """
    from onnxruntime.quantization import CalibrationDataReader

    class FeedReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = list(feeds)
            self._iter = iter(self.feeds)

        def get_next(self) -> dict[str, np.ndarray] | None:
            feed = next(self._iter, None)
            return None if feed is None else dict(feed)

        def get_first(self) -> dict[str, np.ndarray]:
            return dict(self.feeds[0])

        def rewind(self) -> None:
            self._iter = iter(self.feeds)

        def __len__(self) -> int:
            return len(self.feeds)

    if not feeds:
        raise ValueError("calibration needs at least one feed")
    return FeedReader()


# ----------------------------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantizePrecision:
    """Quantize an fp32 ONNX graph; frozen and excluded nodes stay unquantized, at `high_precision`.

    `high_precision` is ModelOpt's `high_precision_dtype`: the dtype of everything that is not quantized (frozen
    text branch, excluded nodes, norms, softmax...). ModelOpt's quantizer cannot take an AutoCast graph as input
    (its output fails ONNX type checking), so a quantized engine has one high precision, not fp32 islands in fp16.
    """

    component: str
    source: Path
    mode: str
    calibration_method: str
    high_precision: str
    frozen_nodes: tuple[str, ...]
    exclude_patterns: tuple[str, ...]
    calibration_feeds: Callable[[], Sequence[Feed]] | Sequence[Feed] = field(default=(), compare=False, repr=False)
    calibration_cache: Path | None = None
    block_pattern: str | None = None  # set: calibrate and quantize one block at a time (stages.graphs.segmented)
    segment_bytes: int = SEGMENT_BYTES  # block-wise: blocks heavier than this are quantized in pieces

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        import onnx

        self.check_settings()
        graph = onnx.load(str(self.source), load_external_data=False)
        exclusions = self.exclusions(graph)
        feeds = self._feeds()
        LOG.info(f"{self.mode} ({self.calibration_method}, {len(feeds)} feeds), high precision "
              f"{self.high_precision}, {len(exclusions)} nodes excluded")
        if self.block_pattern:
            model = run_modelopt_by_block(self, sorted(exclusions), feeds, out_dir)
        else:
            model = run_modelopt(self, self.source, sorted(exclusions), feeds, out_dir)
        # ModelOpt re-imports a cache only if it holds every activation scale it places, detached ones included.
        cache = write_calibration_cache(calibration_ranges(model, self.mode), out_dir / CACHE_FILE) \
            if self.mode == "int8" else None
        detached = detach_excluded(model, set(exclusions))
        self.verify(model, exclusions)
        link_upstream_files(model, self.source.parent, out_dir)
        save_model(model, out_dir / MODEL_FILE)
        ranges = calibration_ranges(model, self.mode)
        ranges.update({"method": self.calibration_method, "samples": len(feeds)})
        (out_dir / RANGES_FILE).write_text(json.dumps(ranges, indent=2) + "\n")
        return self.report(model, exclusions, detached, ranges, cache, len(feeds))

    def check_settings(self) -> None:
        """Fail before any work on a mode, method or dtype this stage does not offer."""
        if self.mode not in MODES:
            raise fail(self.source, "precision.dtype", f"{self.mode!r} cannot be quantized here; allowed: {', '.join(MODES)}")
        methods = CALIBRATION_METHODS[self.mode]
        if self.calibration_method not in methods:
            raise fail(self.source, "precision.calibration.method",
                       f"{self.calibration_method!r} is not offered for {self.mode}; allowed: {', '.join(methods)}")
        if self.high_precision not in HIGH_PRECISIONS:
            raise fail(self.source, "precision.high_precision",
                       f"{self.high_precision!r}; allowed: {', '.join(HIGH_PRECISIONS)}")
        if self.calibration_cache and self.mode != "int8":
            raise fail(self.source, "precision.calibration.cache", f"a calibration cache is only read for int8, not {self.mode}")

    def exclusions(self, graph: Any) -> dict[str, str]:
        """Node name -> why it stays unquantized: frozen text branch, recipe pattern or mask sentinel."""
        names = [node.name for node in graph.graph.node]
        missing = sorted(set(self.frozen_nodes) - set(names))
        if missing:
            raise fail(self.source, "surgery.frozen_nodes", f"{len(missing)} frozen nodes are not in the graph: {missing[:3]}")
        reasons = {name: "frozen_text_branch" for name in self.frozen_nodes}
        patterns = [re.compile(p) for p in self.exclude_patterns]
        for name in names:
            if name not in reasons and any(p.search(name) for p in patterns):
                reasons[name] = "recipe_pattern"
        for name in mask_sentinel_consumers(graph):
            reasons.setdefault(name, "mask_sentinel")
        return reasons

    def verify(self, model: Any, exclusions: Mapping[str, str]) -> None:
        """Fail loudly if a frozen/excluded node reads a dequantized tensor or a weight is not the requested type."""
        violations = qdq_violations(model, exclusions)
        if violations:
            node, tensor = violations[0]
            raise fail(self.source, EXCLUSION_KEYS[exclusions[node]],
                       f"{len(violations)} inputs of excluded nodes come from DequantizeLinear, e.g. {node} reads "
                       f"{tensor}; allowed: unquantized inputs only")
        wanted = ONNX_FLOAT8E4M3FN if self.mode == "fp8" else ONNX_INT8
        wrong = [n for n, t in dequantized_types(model).items() if t != wanted]
        if wrong:
            raise fail(self.source, "precision.dtype", f"{len(wrong)} DequantizeLinear nodes are not {self.mode}: {wrong[:3]}")
        if not quantized_nodes(model):
            raise fail(self.source, "precision.dtype", f"the quantizer placed no Q/DQ for {self.mode}")

    def report(self, model: Any, exclusions: Mapping[str, str], detached: list[dict[str, str]],
               ranges: dict[str, Any], cache: str | None, samples: int) -> dict[str, Any]:
        import modelopt

        quantized = quantized_nodes(model)
        skipped = quantizer_skipped(model, exclusions)
        by_reason = Counter(exclusions.values())
        return {
            "component": self.component,
            "model_file": MODEL_FILE,
            "mode": self.mode,
            "weights": "fp8" if self.mode == "fp8" else "int8",
            "activations": {"int8": "int8", "fp8": "fp8", "int8_weight_only": self.high_precision}[self.mode],
            "high_precision": self.high_precision,
            "quantizer": f"modelopt.onnx.quantization {modelopt.__version__}",
            "blockwise": bool(self.block_pattern),
            "calibration": {"method": self.calibration_method, "samples": samples, "ranges_file": RANGES_FILE,
                            "cache_file": cache, "activation_tensors": len(ranges["activations"]),
                            "reused_cache": str(self.calibration_cache) if self.calibration_cache else None},
            "quantized_nodes": dict(sorted(Counter(quantized.values()).items())),
            "quantized_gemms": sorted(n for n, op in quantized.items() if op in GEMM_OPS),
            "excluded": {
                "frozen_text_branch": by_reason["frozen_text_branch"],
                "recipe_patterns": {p: sum(1 for n, r in exclusions.items() if r == "recipe_pattern" and re.search(p, n))
                                    for p in self.exclude_patterns},
                "mask_sentinel": sorted(n for n, r in exclusions.items() if r == "mask_sentinel"),
                "quantizer_choice": skipped,
            },
            "detached_shared_qdq": detached,
            "onnxruntime_cpu": onnxruntime_cpu_note(model),
        }

    def _feeds(self) -> list[Feed]:
        feeds = self.calibration_feeds() if callable(self.calibration_feeds) else self.calibration_feeds
        if self.mode != "int8_weight_only" and not feeds:
            raise fail(self.source, "precision.calibration", f"{self.mode} needs calibration feeds; got none")
        return list(feeds)


# ----------------------------------------------------------------------------------------------------------------
# Running ModelOpt
# ----------------------------------------------------------------------------------------------------------------


def run_modelopt(stage: QuantizePrecision, source: Path, excluded: list[str], feeds: Sequence[Feed], out_dir: Path,
                 share: Share | None = None) -> Any:
    """Quantize `source` in a scratch directory (ModelOpt writes intermediate files beside its input and output).

    ModelOpt reads its input with `onnx.load`, which refuses weights in hard-linked shards, so it gets a
    scratch copy with the weights read in. Weights it returns unchanged (excluded, frozen) are referenced in
    place again afterwards; only quantized or converted tensors are written by this stage. With a `share` (a
    piece's part of the whole graph's placement), ModelOpt quantizes just that."""
    import onnx

    with scratch_beside(out_dir, "quantize") as scratch:
        work = Path(scratch)
        readable = _readable_source(source, work, set(excluded))
        output = work / "quantized.onnx"
        patterns = [f"^{re.escape(name)}$" for name in excluded]
        if stage.mode == "int8_weight_only":
            _quantize_weight_only(readable, output, patterns, excluded)
        else:
            forced = {} if share is None else {"nodes_to_quantize": [f"^{re.escape(n)}$" for n in share.nodes],
                                               "no_quantize_inputs": share.within,
                                               "enable_gemv_detection_for_trt": not share.gemv_checked}
            _quantize_qdq(stage, readable, output, patterns, feeds, forced)
        model = onnx.load(str(output))
    if share is not None and share.across:
        LOG.debug(f"{bypass_inputs(model, share.across)} inputs left unquantized whose producers are in earlier pieces")
    original = onnx.load(str(source), load_external_data=False)
    referenced = reference_unchanged(model, original, source.parent)
    recast = reference_casts(model, original, source.parent)
    LOG.debug(f"{referenced} unchanged weights referenced in place, {recast} more read through a Cast")
    if stage.mode == "int8_weight_only":
        model = _to_high_precision(stage, model)
    return model


def run_modelopt_by_block(stage: QuantizePrecision, excluded: list[str], feeds: Sequence[Feed], out_dir: Path) -> Any:
    """Calibrate and quantize one segment (prologue, block or piece of a block, epilogue) at a time: memory holds
    at most `segment_bytes` of weights (one GEMM where a GEMM is heavier).

    Each segment is quantized with ModelOpt on its own, calibrated on its inputs as the unquantized graph
    computes them (the segments before it run on every calibration feed, chained), so activation ranges are
    those a whole-graph calibration would see; calibrated modes quantize their share of the whole graph's
    Q/DQ placement, not what ModelOpt would choose for the piece alone. The tensors a segment's quantization
    writes go straight to :data:`QUANTIZED_WEIGHTS` beside the graph; everything else stays referenced in place."""
    import onnx

    assert stage.block_pattern is not None
    graph = onnx.load(str(stage.source), load_external_data=False)
    part = partition(graph, stage.block_pattern, stage.segment_bytes)
    skip = set(excluded)
    placement = None if stage.mode == "int8_weight_only" or not feeds else \
        whole_graph_placement(graph, stage.mode, excluded, skip, {n: v.shape for n, v in feeds[0].items()})
    sink = _WeightFile(out_dir / QUANTIZED_WEIGHTS)
    steps = log.Steps(LOG, f"quantize {stage.component}, segments", len(part.segments))
    with scratch_beside(out_dir, "segments") as scratch:
        paths = write_segments(stage.source, part, Path(scratch))
        chain = _CalibrationInputs(paths, part, feeds, Path(scratch) / "feeds")

        def quantize_segment(index: int, segment: Any, piece: Any) -> Any:
            names = {node.name for node in piece.graph.node}
            share = placement.share(names) if placement is not None else None
            quantizable = bool(share.nodes) if share is not None else \
                any(n.op_type in GEMM_OPS and n.name not in skip for n in piece.graph.node)
            if quantizable:
                piece = run_modelopt(stage, paths[index], [n for n in excluded if n in names], chain.inputs(index),
                                     out_dir, share)
                unquantized_outputs(piece)
            else:
                piece = _to_high_precision(stage, piece)
            sink.take(piece)
            chain.advance(index)
            return _compact(piece)

        return transform_segments(graph, part, quantize_segment, progress=steps.update)


class _WeightFile:
    """Tensors a segment's quantization wrote, appended to one external-data file as the segments go by."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def take(self, model: Any) -> None:
        import onnx
        from onnx import numpy_helper

        scales = {n.input[i] for n in model.graph.node if n.op_type in QDQ_OPS for i in (1, 2) if i < len(n.input)}
        with open(self.path, "ab") as handle:
            for tensor in model.graph.initializer:
                if tensor.data_location == onnx.TensorProto.EXTERNAL or tensor.name in scales:
                    continue
                data = tensor.raw_data if tensor.HasField("raw_data") else numpy_helper.to_array(tensor).tobytes()
                if len(data) < EXTERNAL_MIN_BYTES:
                    continue
                offset = handle.tell()
                handle.write(data)
                for name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
                    tensor.ClearField(name)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(len(data)))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value


class _CalibrationInputs:
    """Every calibration feed's values at the current cut, the unquantized segments run one after another.

    The values live on disk (:class:`_FeedOnDisk`) and one feed is read at a time, so memory does not grow with
    the number of samples: at 768x1024 a feed's values at a cut inside a release block are ~160 MB (the shipped
    16 samples: 2.6 GB held through every piece's quantization if they stayed in memory)."""

    def __init__(self, paths: Sequence[Path], part: Any, feeds: Sequence[Feed], folder: Path) -> None:
        self.paths, self.part = paths, part
        self.values = [_FeedOnDisk(folder / f"feed-{index}") for index in range(len(feeds))]
        for stored, feed in zip(self.values, feeds):
            stored.write(feed)

    def inputs(self, index: int) -> list[Feed]:
        names = self.part.segments[index].inputs
        return [stored.subset(names) for stored in self.values]

    def advance(self, index: int) -> None:
        if not self.values or index == len(self.part.segments) - 1:
            return
        segment = self.part.segments[index]
        with OnnxRuntimeRunner(self.paths[index], name=segment.name) as runner:
            for stored in self.values:
                stored.write(runner.infer(dict(stored.subset(segment.inputs))))
        dead = [n for n, last in self.part.last_use.items() if last == index and n not in self.part.graph_outputs]
        for stored in self.values:
            stored.drop(dead)


class _FeedOnDisk(Mapping[str, np.ndarray]):
    """One calibration feed's tensors, one `.npy` file each, read when asked for (a view of some of them with
    :meth:`subset`): what ModelOpt's calibration reader materialises is one feed at a time."""

    def __init__(self, folder: Path, files: dict[str, Path] | None = None,
                 numbers: Iterator[int] | None = None) -> None:
        self.folder = folder
        self.files = {} if files is None else files
        self._numbers = itertools.count() if numbers is None else numbers  # file names, shared with subsets

    def write(self, values: Mapping[str, np.ndarray]) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name, value in values.items():
            path = self.files.get(name) or self.folder / f"{next(self._numbers)}.npy"
            np.save(path, np.ascontiguousarray(value))
            self.files[name] = path

    def drop(self, names: Sequence[str]) -> None:
        for name in names:
            path = self.files.pop(name, None)
            if path is not None:
                path.unlink()

    def subset(self, names: Sequence[str]) -> _FeedOnDisk:
        files = {name: self.files[name] for name in names if name in self.files}
        return _FeedOnDisk(self.folder, files, self._numbers)

    def __getitem__(self, name: str) -> np.ndarray:
        return np.load(self.files[name])

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def _compact(model: Any) -> Any:
    """The same graph in a message of its own: a protobuf message keeps the memory of every tensor it ever held
    (its arena) until it is destroyed, so each segment's gigabytes would otherwise stay alive to the end."""
    import gc

    import onnx

    compact = onnx.ModelProto()
    compact.ParseFromString(model.SerializeToString())
    del model
    gc.collect()
    return compact


def _to_high_precision(stage: QuantizePrecision, model: Any) -> Any:
    """Everything unquantized to the high precision, as ModelOpt does for Q/DQ modes, with the weights referenced
    in place hidden: a Cast is inserted where an fp16 node reads a bf16 checkpoint weight (TensorRT folds it)
    instead of writing an fp16 copy of, say, the whole frozen text branch."""
    if stage.high_precision == "fp32":
        return model
    from modelopt.onnx.autocast import convert_to_f16

    hidden = hide_weights(model)
    model = convert_to_f16(model, low_precision_type=stage.high_precision, keep_io_types=True)
    changed = restore_weights(model, hidden)
    if changed:
        raise fail(stage.source, "precision.high_precision", f"the conversion changed the dtype of weights {changed[:3]}")
    return model


def _readable_source(source: Path, work: Path, protected: set[str]) -> Path:
    """A scratch copy of the model with its weights read in, which `onnx.load` (inside ModelOpt) accepts.

    Weights enter the exported graph in checkpoint layout through Transpose (and, for bf16, Cast) nodes; the
    quantizer only recognises a weight that feeds its GEMM directly, so those chains are folded here, in the
    copy. Chains read by protected (frozen, excluded) nodes are left alone: those nodes survive and their
    weights stay byte-identical, so they are referenced in place again afterwards."""
    import onnx
    from polygraphy.backend.onnx import fold_constants

    model = onnx.load(str(source), load_external_data=False)
    kept = {name for node in model.graph.node if node.name in protected for name in node.input}
    hidden = hide_weights(model, kept)
    materialize(model, source.parent)
    model = fold_constants(model, error_ok=False)
    restore_weights(model, hidden)
    materialize(model, source.parent)
    save_model(model, work / source.name)
    return work / source.name


def _quantize_qdq(stage: QuantizePrecision, source: Path, output: Path, patterns: list[str], feeds: Sequence[Feed],
                  forced: Mapping[str, Any]) -> None:
    from modelopt.onnx.quantization import quantize

    quantize(
        str(source),
        quantize_mode=stage.mode,
        calibration_method=stage.calibration_method,
        calibration_data_reader=feed_reader(feeds),
        calibration_cache_path=str(stage.calibration_cache) if stage.calibration_cache else None,
        calibration_eps=["cpu"],
        nodes_to_exclude=patterns,
        high_precision_dtype=stage.high_precision,
        output_path=str(output),
        log_level=logging.getLevelName(log.tool_level()),
        **forced,
    )


def _quantize_weight_only(source: Path, output: Path, patterns: list[str], excluded: list[str]) -> None:
    """INT8 weight-only = ModelOpt's INT4 RTN DQ-only path with every GEMM promoted to per-channel 8 bit."""
    import onnx

    from modelopt.onnx.quantization import quantize

    graph = onnx.load(str(source), load_external_data=False).graph
    skip = set(excluded)
    gemms = [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.name not in skip]
    quantize(
        str(source),
        quantize_mode="int4",
        calibration_method="rtn_dq",
        calibration_eps=["cpu"],
        nodes_to_exclude=patterns,
        layers_8bit=",".join(gemms),
        output_path=str(output),
        log_level=logging.getLevelName(log.tool_level()),
    )


@dataclass(frozen=True)
class QuantizeWithComparisons:
    """The quantized graph plus the graphs its cost is measured against: the fp16 plan and freezing switched off.

    Validation runs all of them, so the accuracy cost of quantizing and of (not) freezing the text branch are
    numbers in the manifest; only the primary graph is built into an engine and gated.
    """

    primary: Any
    fp16_plan: ConvertPrecision
    freezing_off: Any | None

    def __call__(self, out_dir: Path) -> dict[str, Any]:
        report = self.primary(out_dir)
        graphs = {ComparisonGraph.FP16_PLAN.value: self.fp16_plan}
        if self.freezing_off is not None:
            graphs[ComparisonGraph.FREEZING_OFF.value] = self.freezing_off
        report["comparison_graphs"] = {}
        for name, stage in graphs.items():
            folder = out_dir / "comparisons" / name
            folder.mkdir(parents=True)
            LOG.debug(f"comparison graph: {name}")
            stage(folder)
            report["comparison_graphs"][name] = f"comparisons/{name}/{MODEL_FILE}"
        return report


def from_recipe(loaded: LoadedRecipe, component: str | None, inputs: StageInputs) -> QuantizeWithComparisons:
    """INT8/FP8 plans: the quantized graph, the fp16 plan and (if the text branch is frozen) freezing switched off."""
    assert component is not None
    source, frozen, pattern = surgery_inputs(loaded, component, inputs)
    plan = loaded.recipe.components[component].precision
    feeds: Any = ()
    if plan.needs_calibration:
        folder = inputs.dir("calibration", component)
        feeds = lambda: load_feeds(folder)  # noqa: E731 - loaded only when the quantizer runs
    method = plan.calibration.method if plan.calibration else "max"

    def quantizer(frozen_nodes: tuple[str, ...]) -> Any:
        return QuantizePrecision(component, source, mode_for(plan.dtype, plan.weight_only), method,
                                 plan.high_precision, frozen_nodes, tuple(plan.exclude), calibration_feeds=feeds,
                                 block_pattern=pattern)

    return QuantizeWithComparisons(
        primary=quantizer(frozen),
        fp16_plan=ConvertPrecision(component, source, "fp16", "fp32", frozen, tuple(plan.exclude), pattern),
        freezing_off=quantizer(()) if frozen else None,
    )
