"""Quantize stage on the real (tiny, random-weight) Qwen-Image transformer graph.

The graph comes from the real pipeline (`doit surgery` into a temporary artifacts dir). References are computed
independently of the code under test: the fp32 ONNX graph on ONNX Runtime, activation maxima measured by running
that graph, and a graph walk written here rather than reusing the stage's own checker.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from stages.errors import ForgeError
from stages.families.qwen_image import transformer as qwen_image
from stages.graphs.qdq import qdq_violations, read_calibration_cache
from stages.graphs.runners import onnxruntime_session
from stages.graphs.weights import load_with_weights
from stages.quantize import EXTERNAL_MIN_BYTES, SEGMENT_BYTES, QuantizePrecision
from stages.recipe.schema import PixelRange, Profile, Range, ValidateSettings
from stages.targets.backends.rtx_inspect import rtx_build_report

REPO = Path(__file__).resolve().parent.parent
TEXT_LENGTH = 256
MASK_ADDS = {"/transformer_blocks/0/attn/Add_5", "/transformer_blocks/1/attn/Add_4"}
EXCLUDE = r"img_mlp/net/2/"
BLOCK_PATTERN = r"^/transformer_blocks/(\d+)/"


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def surgery(built: dict[str, Path], built_int8: tuple) -> SimpleNamespace:
    """The surgery stage's transformer output of the session's a10-int8 build (a10-fp16's passes, without LoRA
    inputs: quantized plans have none), and the real tiny transformer."""
    recipe = built["artifacts"] / "a10-int8"
    record = json.loads((recipe / "transformer" / "surgery" / "record.json").read_text())
    config = json.loads((recipe / "checkpoint" / "transformer" / "config.json").read_text())
    return SimpleNamespace(onnx=recipe / "transformer" / "surgery" / "model.onnx", config=config,
                           frozen=tuple(record["report"]["frozen_nodes"]), model=qwen_image.load(recipe / "checkpoint"))


def make_feeds(model: Any, seed: int, sizes: list[list[int]], timesteps: list[float]) -> list[dict]:
    settings = ValidateSettings(sizes=sizes, batch=2, timesteps=timesteps, text_tokens=[37, 180], seed=seed,
                                tolerances={"sample": {"max_error": 1, "rms_error": 1, "cosine": 0.5}})
    return [case["feed"] for case in qwen_image.validation_cases(model, settings, TEXT_LENGTH)]


@pytest.fixture(scope="session")
def calibration(surgery: SimpleNamespace) -> list[dict]:
    return make_feeds(surgery.model, 0, [[256, 256], [384, 512]], [1.0, 0.3])


@pytest.fixture(scope="session")
def evaluation(surgery: SimpleNamespace) -> list[dict]:
    """Held-out feeds: other sizes, timesteps and noise than calibration."""
    return make_feeds(surgery.model, 7, [[256, 384], [512, 256]], [0.7, 0.1])


TINY_SEGMENT_BYTES = 96 * 1024  # a tiny block in pieces, as SEGMENT_BYTES cuts a release block

def quantize(surgery: SimpleNamespace, out: Path, mode: str, method: str, high: str, feeds: list[dict],
             patterns: tuple[str, ...] = (), cache: Path | None = None, by_block: bool = False,
             segment_bytes: int = SEGMENT_BYTES) -> SimpleNamespace:
    out.mkdir(parents=True)
    stage = QuantizePrecision("transformer", surgery.onnx, mode, method, high, surgery.frozen, patterns, feeds, cache,
                              block_pattern=BLOCK_PATTERN if by_block else None, segment_bytes=segment_bytes)
    report = stage(out)
    return SimpleNamespace(dir=out, path=out / "model.onnx", report=report, stage=stage,
                           model=load_with_weights(out / "model.onnx"),
                           ranges=json.loads((out / "calibration.json").read_text()))


@pytest.fixture(scope="session")
def int8(surgery: SimpleNamespace, calibration: list[dict], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return quantize(surgery, tmp_path_factory.mktemp("q") / "int8", "int8", "max", "fp32", calibration, (EXCLUDE,))


@pytest.fixture(scope="session")
def fp8(surgery: SimpleNamespace, calibration: list[dict], tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return quantize(surgery, tmp_path_factory.mktemp("q") / "fp8", "fp8", "max", "fp32", calibration)


@pytest.fixture(scope="session")
def woq(surgery: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    return quantize(surgery, tmp_path_factory.mktemp("q") / "woq", "int8_weight_only", "max", "fp16", [])


@pytest.fixture(scope="session")
def shapes(surgery: SimpleNamespace) -> dict[str, list[tuple[int, ...]]]:
    profile = Profile(batch=Range(min=1, opt=1, max=2), height=PixelRange(min=256, opt=512, max=512),
                      width=PixelRange(min=256, opt=512, max=512))
    return qwen_image.profile_shapes(profile, TEXT_LENGTH, surgery.config)


# ------------------------------------------------------------------------------------------------ helpers


def dq_inputs(model: Any) -> dict[str, list[str]]:
    """Node -> its inputs produced by DequantizeLinear (independent of the stage's own graph helpers)."""
    dq_outputs = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {n.name: [i for i in n.input if i in dq_outputs] for n in model.graph.node
            if n.op_type not in ("QuantizeLinear", "DequantizeLinear")}


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def observed_max(source: Path, tensors: list[str], feeds: list[dict]) -> dict[str, float]:
    """max |x| of each tensor over the feeds, measured on the fp32 graph."""
    model = load_with_weights(source)
    inputs = {i.name for i in model.graph.input}
    for name in tensors:
        if name not in inputs:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    peaks = dict.fromkeys(tensors, 0.0)
    for feed in feeds:
        values = {**feed, **dict(zip(names, session.run(names, feed)))}
        for name in tensors:
            peaks[name] = max(peaks[name], float(np.abs(values[name]).max()))
    return peaks


def compare_to_fp32(source: Path, session: Any, feeds: list[dict]) -> tuple[float, float]:
    reference = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    pairs = [(reference.run(None, f)[0], session.run(None, f)[0]) for f in feeds]
    return min(cosine(a, b) for a, b in pairs), max(float(np.abs(a - b).max()) for a, b in pairs)


# ------------------------------------------------------------------------------------------------ Q/DQ placement


def test_frozen_text_branch_has_no_qdq(int8: SimpleNamespace, surgery: SimpleNamespace) -> None:
    fed = dq_inputs(int8.model)
    assert all(name in fed for name in surgery.frozen), "frozen nodes must survive quantization"
    assert {name: fed[name] for name in surgery.frozen if fed[name]} == {}


def test_excluded_pattern_stays_unquantized_but_is_quantized_otherwise(int8: SimpleNamespace, fp8: SimpleNamespace) -> None:
    matched = [n for n in dq_inputs(int8.model) if EXCLUDE in n]
    assert len(matched) >= 4
    assert all(dq_inputs(int8.model)[n] == [] for n in matched)
    assert any(dq_inputs(fp8.model)[n] for n in matched if n.endswith("MatMul_0")), "without the pattern they quantize"
    assert int8.report["excluded"]["recipe_patterns"] == {EXCLUDE: len(matched)}


def test_image_stream_matmuls_are_int8_on_both_operands(int8: SimpleNamespace) -> None:
    fed = dq_inputs(int8.model)
    inits = {i.name: i for i in int8.model.graph.initializer}
    producers = {o: n for n in int8.model.graph.node for o in n.output}
    for block in (0, 1):
        for proj in ("to_q", "to_k", "to_v", "to_out/0"):
            node = f"/transformer_blocks/{block}/attn/{proj}/MatMul_0"
            assert len(fed[node]) == 2, node
            for tensor in fed[node]:
                quantize_node = producers[producers[tensor].input[0]]
                assert inits[quantize_node.input[2]].data_type == onnx.TensorProto.INT8
    assert int8.report["quantized_nodes"]["MatMul"] >= 12


def test_attention_mask_consumers_are_excluded(int8: SimpleNamespace) -> None:
    """The joint mask carries float32-min sentinels; its Adds must stay out of calibration and quantization."""
    assert set(int8.report["excluded"]["mask_sentinel"]) == MASK_ADDS
    fed = dq_inputs(int8.model)
    assert all(fed[name] == [] for name in MASK_ADDS)


def test_verifier_rejects_qdq_feeding_a_frozen_node(int8: SimpleNamespace, surgery: SimpleNamespace) -> None:
    broken = copy.deepcopy(int8.model)
    dq_output = next(n.output[0] for n in broken.graph.node if n.op_type == "DequantizeLinear")
    victim = next(n for n in broken.graph.node if n.name == "/txt_in/MatMul_0")
    victim.input[0] = dq_output
    assert qdq_violations(broken, surgery.frozen) == [("/txt_in/MatMul_0", dq_output)]
    exclusions = int8.stage.exclusions(onnx.load(str(surgery.onnx), load_external_data=False))
    with pytest.raises(ForgeError, match=r"surgery\.frozen_nodes.*txt_in/MatMul_0"):
        int8.stage.verify(broken, exclusions)


def test_weight_only_has_dq_on_weights_only(woq: SimpleNamespace, surgery: SimpleNamespace) -> None:
    inits = {i.name: i for i in woq.model.graph.initializer}
    dqs = [n for n in woq.model.graph.node if n.op_type == "DequantizeLinear"]
    assert not [n for n in woq.model.graph.node if n.op_type == "QuantizeLinear"]
    assert len(dqs) == 19 and all(inits[n.input[0]].data_type == onnx.TensorProto.INT8 for n in dqs)
    assert {dq_inputs(woq.model)[n] == [] for n in surgery.frozen} == {True}
    assert woq.report["activations"] == "fp16"


# ------------------------------------------------------------------------------------------------ numerics on ORT CPU


def test_int8_matches_fp32_onnx(int8: SimpleNamespace, surgery: SimpleNamespace, evaluation: list[dict]) -> None:
    worst_cosine, worst_diff = compare_to_fp32(surgery.onnx, onnxruntime_session(int8.path), evaluation)
    assert worst_cosine >= 0.999
    assert worst_diff > 1e-4, "identical outputs would mean the Q/DQ do nothing"


def test_fp8_runs_on_ort_cpu_only_without_graph_rewrites(fp8: SimpleNamespace, surgery: SimpleNamespace,
                                                         evaluation: list[dict]) -> None:
    with pytest.raises(Exception, match="float8"):
        ort.InferenceSession(str(fp8.path), providers=["CPUExecutionProvider"])
    worst_cosine, worst_diff = compare_to_fp32(surgery.onnx, onnxruntime_session(fp8.path), evaluation)
    assert 0.99 <= worst_cosine < 0.99999 and worst_diff > 1e-3
    assert fp8.report["onnxruntime_cpu"]["graph_optimization"] == "disabled"


def test_weight_only_fp16_matches_fp32_onnx(woq: SimpleNamespace, surgery: SimpleNamespace, evaluation: list[dict]) -> None:
    worst_cosine, _ = compare_to_fp32(surgery.onnx, onnxruntime_session(woq.path), evaluation)
    assert worst_cosine >= 0.9995


# ------------------------------------------------------------------------------------------------ calibration artifact


@pytest.mark.parametrize("which", ["int8", "fp8"])
def test_max_calibration_amax_is_the_observed_maximum(which: str, request: pytest.FixtureRequest,
                                                      surgery: SimpleNamespace, calibration: list[dict]) -> None:
    result = request.getfixturevalue(which)
    activations = result.ranges["activations"]
    assert len(activations) >= 20
    peaks = observed_max(surgery.onnx, sorted(activations), calibration)
    for tensor, entry in activations.items():
        assert entry["amax"] == pytest.approx(peaks[tensor], rel=1e-4), tensor


def test_entropy_calibration_clips_inside_the_observed_range(surgery: SimpleNamespace, calibration: list[dict],
                                                              tmp_path: Path) -> None:
    result = quantize(surgery, tmp_path / "entropy", "int8", "entropy", "fp32", calibration)
    activations = result.ranges["activations"]
    peaks = observed_max(surgery.onnx, sorted(activations), calibration)
    assert all(entry["amax"] <= peaks[t] * (1 + 1e-4) for t, entry in activations.items())
    assert sum(entry["amax"] < 0.9 * peaks[t] for t, entry in activations.items()) >= 5


def test_calibration_cache_reproduces_scales(int8: SimpleNamespace, surgery: SimpleNamespace, evaluation: list[dict],
                                             tmp_path: Path) -> None:
    cache = read_calibration_cache(int8.dir / "calibration.cache")
    by_initializer = {tensor: entry["scale"] for tensor, entry in int8.ranges["activations"].items()}
    assert {k: cache[k] for k in by_initializer} == pytest.approx(by_initializer, rel=1e-6) and len(cache) >= 20
    louder = [{k: (v * 3 if k == "hidden_states" else v) for k, v in feed.items()} for feed in evaluation]
    again = quantize(surgery, tmp_path / "again", "int8", "max", "fp32", louder, (EXCLUDE,), int8.dir / "calibration.cache")
    reused = {tensor: entry["scale"] for tensor, entry in again.ranges["activations"].items()}
    assert set(reused) == set(by_initializer)
    assert reused == pytest.approx({k: cache[k] for k in reused}, rel=1e-6), "3x louder inputs must not recalibrate"


def test_settings_are_checked_before_any_work(surgery: SimpleNamespace) -> None:
    stage = QuantizePrecision("transformer", surgery.onnx, "fp8", "entropy", "fp16", surgery.frozen, ())
    with pytest.raises(ForgeError, match=r"precision\.calibration\.method.*allowed: max"):
        stage.check_settings()
    stage = QuantizePrecision("transformer", surgery.onnx, "int4", "max", "fp16", surgery.frozen, ())
    with pytest.raises(ForgeError, match=r"precision\.dtype.*allowed: int8, int8_weight_only, fp8"):
        stage.check_settings()


# ------------------------------------------------------------------------------------------------ TensorRT-RTX builds


def gemms_touching(report: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    return [g for g in report["gemms"] if any(n.startswith(prefix) for n in g["onnx_nodes"])]


def test_weight_only_builds_for_a10_with_int8_weights(woq: SimpleNamespace, shapes: dict, tmp_path: Path) -> None:
    from stages.engine import BuildEngine

    BuildEngine("transformer", woq.path, "tensorrt-rtx", (8, 6), shapes, optimization_level=3)(tmp_path)
    assert (tmp_path / "engine.plan").stat().st_size > 100_000
    report = rtx_build_report(woq.path, (8, 6), shapes)
    proj_out = gemms_touching(report, "/proj_out/MatMul_0")
    assert proj_out and all("Int8" in g["constants"] and g["inputs"] == ["Half"] for g in proj_out)
    frozen = gemms_touching(report, "/txt_in/MatMul_0") + gemms_touching(report, "/transformer_blocks/0/txt_mlp/")
    assert frozen and all("Int8" not in g["constants"] + g["inputs"] for g in frozen)


@pytest.mark.parametrize("cc", [(8, 9), (12, 0)])
def test_fp8_builds_with_fp8_gemms_on_ada_and_blackwell(fp8: SimpleNamespace, shapes: dict, cc: tuple[int, int]) -> None:
    report = rtx_build_report(fp8.path, cc, shapes)
    assert report["built"] and not report["errors"]
    to_q = gemms_touching(report, "/transformer_blocks/0/attn/to_q/")
    assert to_q and all(g["inputs"] == ["FP8"] and "FP8" in g["constants"] for g in to_q)
    frozen = gemms_touching(report, "/transformer_blocks/0/attn/add_q_proj/")
    assert frozen and all("FP8" not in g["constants"] + g["inputs"] for g in frozen)


def test_fp8_build_for_a10_returns_no_engine(fp8: SimpleNamespace, shapes: dict) -> None:
    report = rtx_build_report(fp8.path, (8, 6), shapes)
    assert not report["built"] and any("sm86" in e and "fp8" in e for e in report["errors"])


# ------------------------------------------------------------------------------------------------ one block at a time


@pytest.fixture(scope="session")
def woq_by_block(surgery: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Block-wise with the release-size weight limit scaled down: ModelOpt quantizes pieces of blocks."""
    return quantize(surgery, tmp_path_factory.mktemp("q") / "woq-blocks", "int8_weight_only", "max", "fp16", [],
                    by_block=True, segment_bytes=TINY_SEGMENT_BYTES)


@pytest.fixture(scope="session")
def fp8_by_block(surgery: SimpleNamespace, calibration: list[dict],
                 tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """Calibrated FP8 in pieces of blocks, as SEGMENT_BYTES cuts a release block; `gemv_runs` counts ModelOpt's
    GEMV checks made by running a piece with every MatMul output held (at release width 1.6 GB more at the peak)."""
    from unittest import mock

    from modelopt.onnx.quantization import graph_utils

    original = graph_utils._exclude_matmuls_by_inference
    with mock.patch.object(graph_utils, "_exclude_matmuls_by_inference", side_effect=original) as spy:
        result = quantize(surgery, tmp_path_factory.mktemp("q") / "fp8-blocks", "fp8", "max", "fp32", calibration,
                          by_block=True, segment_bytes=TINY_SEGMENT_BYTES)
    result.gemv_runs = spy.call_count
    return result


def int8_weights(model: Any) -> dict[str, bytes]:
    return {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.INT8}


def test_weight_only_by_block_writes_the_whole_graph_weights(woq: SimpleNamespace, woq_by_block: SimpleNamespace) -> None:
    """Same INT8 bytes under the same names, written once into the entry's own file; the graph file stays small."""
    whole, blocks = int8_weights(woq.model), int8_weights(woq_by_block.model)
    assert whole and blocks == whole
    assert woq_by_block.report["blockwise"] and woq_by_block.report["quantized_gemms"] == woq.report["quantized_gemms"]
    graph = onnx.load(str(woq_by_block.path), load_external_data=False)
    stored = {t.name for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
              and {e.key: e.value for e in t.external_data}["location"] == "quantized_weights.bin"}
    assert {name for name, data in whole.items() if len(data) >= EXTERNAL_MIN_BYTES} <= stored
    checkpoint = {t.name for t in onnx.load(str(woq_by_block.stage.source), load_external_data=False).graph.initializer
                  if t.data_location == onnx.TensorProto.EXTERNAL}
    assert checkpoint and not stored & checkpoint, "weights referenced in place are never rewritten (not even as fp16)"
    assert (woq_by_block.dir / "quantized_weights.bin").stat().st_size >= sum(
        len(v) for v in whole.values() if len(v) >= EXTERNAL_MIN_BYTES)


def test_weight_only_by_block_runs_like_the_whole_graph(woq: SimpleNamespace, woq_by_block: SimpleNamespace,
                                                       evaluation: list[dict]) -> None:
    whole = onnxruntime_session(woq.path)
    blocks = onnxruntime_session(woq_by_block.path)
    for feed in evaluation[:2]:
        a, b = whole.run(None, feed)[0], blocks.run(None, feed)[0]
        assert cosine(a, b) > 0.99999 and float(np.abs(a - b).max()) < 1e-2


def dq_reads(model: Any) -> set[tuple[str, int]]:
    """(node, input index) of every input that reads a DequantizeLinear output, Q/DQ nodes aside."""
    dq = {o for n in model.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return {(n.name, k) for n in model.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            for k, name in enumerate(n.input) if name in dq}


def test_fp8_in_pieces_places_qdq_like_the_whole_graph(fp8: SimpleNamespace, fp8_by_block: SimpleNamespace,
                                                       surgery: SimpleNamespace, evaluation: list[dict]) -> None:
    """Each piece calibrated on its inputs as the chained unquantized graph computes them, and quantized with its
    share of the whole graph's placement: the whole graph's ranges and Q/DQ, less only the reads of a Q/DQ pair
    that ONNX Runtime shares between a quantized node and a reader of the same tensor in another piece."""
    from stages.graphs.blockwise import partition

    segments = partition(onnx.load(str(surgery.onnx), load_external_data=False), BLOCK_PATTERN, TINY_SEGMENT_BYTES)
    assert len(segments.segments) > 8, "the tiny blocks must really be cut into pieces"
    assert fp8_by_block.report["quantized_gemms"] == fp8.report["quantized_gemms"]
    whole, pieces = fp8.ranges["activations"], fp8_by_block.ranges["activations"]
    assert pieces and set(pieces) <= set(whole)
    for tensor in pieces:
        assert pieces[tensor]["amax"] == pytest.approx(whole[tensor]["amax"], rel=1e-5), tensor
    a, b = dq_reads(fp8.model), dq_reads(fp8_by_block.model)
    assert b <= a and len(b) >= 0.95 * len(a)
    ops = {n.name: n.op_type for n in fp8.model.graph.node}
    assert {ops[node] for node, _ in a - b} <= {"LayerNormalization"}, sorted(a - b)
    x = onnxruntime_session(fp8.path).run(None, evaluation[0])[0]
    y = onnxruntime_session(fp8_by_block.path).run(None, evaluation[0])[0]
    assert cosine(x, y) > 0.9999
    assert fp8_by_block.gemv_runs == 0, "the whole graph's shape-inferred GEMV exclusions stand for the pieces"


def test_placement_from_the_structure_is_the_whole_graph_quantizers(fp8: SimpleNamespace,
                                                                    surgery: SimpleNamespace) -> None:
    """ModelOpt's placement asked of the weightless surgery graph (weight chains folded as shapes, no byte read)
    names exactly the nodes ModelOpt quantized when it was handed the whole graph with its weights."""
    from stages.graphs.placement import FP8_OP_TYPES, whole_graph_placement

    graph = onnx.load(str(surgery.onnx), load_external_data=False)
    excluded = sorted(fp8.stage.exclusions(graph))
    feed = fp8.stage.calibration_feeds[0]
    placement = whole_graph_placement(graph, "fp8", excluded, set(excluded), {n: v.shape for n, v in feed.items()})
    ops = {n.name: n.op_type for n in graph.graph.node}
    quantized = {node for node, _ in dq_reads(fp8.model) if ops.get(node) in FP8_OP_TYPES}
    assert quantized and {node for node in placement.nodes if ops[node] in FP8_OP_TYPES} == quantized
    assert placement.gemv_checked, "the GEMV check was made by shape inference: pieces need not run it"


def test_quantized_graph_is_cut_with_each_blocks_weights_in_its_block(woq_by_block: SimpleNamespace) -> None:
    """DequantizeLinear of a block's weight runs in that block's segment: nothing hands weights across a cut."""
    from stages.graphs.blockwise import partition

    model = onnx.load(str(woq_by_block.path), load_external_data=False)
    producer = {o: n for n in model.graph.node for o in n.output}
    part = partition(model, BLOCK_PATTERN)
    crossing = [o for s in part.segments for o in s.outputs if getattr(producer.get(o), "op_type", "") == "DequantizeLinear"]
    assert len(part.segments) == 4 and not crossing


def test_calibration_chain_holds_one_feed_in_memory(surgery: SimpleNamespace, calibration: list[dict],
                                                    tmp_path: Path) -> None:
    """The chained values the pieces are calibrated on live on disk and are read one feed at a time, so memory does
    not grow with the number of samples (at release width a feed's values at a cut are ~160 MB at 768x1024); what
    the reader hands out is what running the segments in memory gives."""
    import tracemalloc

    from stages.graphs.blockwise import partition, write_segments
    from stages.quantize import _CalibrationInputs, feed_reader

    graph = onnx.load(str(surgery.onnx), load_external_data=False)
    part = partition(graph, BLOCK_PATTERN, TINY_SEGMENT_BYTES)
    paths = write_segments(surgery.onnx, part, tmp_path / "segments")
    largest = max(calibration, key=lambda feed: sum(v.nbytes for v in feed.values()))  # sizes differ
    values, one_feed = dict(largest), 0  # the reference: one feed chained in memory, its largest cut in bytes
    for index in range(len(part.segments) - 1):
        session = onnxruntime_session(paths[index])
        outputs = session.run(None, {n: values[n] for n in part.segments[index].inputs})
        values.update(zip([o.name for o in session.get_outputs()], outputs))
        values = {n: v for n, v in values.items() if part.last_use.get(n, index + 1) > index or n in part.graph_outputs}
        one_feed = max(one_feed, sum(v.nbytes for v in values.values()))

    def chained(count: int, folder: Path) -> tuple[dict, int]:
        tracemalloc.start()
        try:
            chain = _CalibrationInputs(paths, part, [largest] * count, folder)
            for index in range(len(part.segments) - 1):
                chain.advance(index)
            reader = feed_reader(chain.inputs(len(part.segments) - 1))
            first = reader.get_next()
            while reader.get_next() is not None:
                pass
            return first, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    chained(1, tmp_path / "warm-up")  # first-use imports and caches
    first, peak = chained(8, tmp_path / "eight")
    _, alone = chained(1, tmp_path / "one")
    last = part.segments[-1].inputs
    assert set(first) == set(last) and all(np.array_equal(first[n], values[n]) for n in last)
    assert peak < alone + one_feed, f"8 feeds: {peak} bytes traced, 1 feed: {alone}; a feed's values at a cut: {one_feed}"
