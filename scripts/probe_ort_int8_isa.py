"""Probe: does ONNX Runtime's answer for an INT8 Q/DQ graph depend on the CPU's instruction set? (issue 15)

A toy W8A8 graph (x -> QuantizeLinear -> DequantizeLinear -> MatMul <- DequantizeLinear <- int8 W; 64x512 @
512x256, full-range int8 on both sides) and a weight-only one (float x @ DequantizeLinear(int8 W)) run on ORT's
CPU provider at every graph-optimization level, against the exact answer: int32-accumulated integer products with
the scales applied after (what TensorRT's int8 kernels compute), in float64. It prints the ISA ORT's MLAS can
pick from (CPUID read here, not /proc/cpuinfo, which qemu-user does not emulate), the ops ORT fused the graph
into and the error per level. `--model Q.onnx --reference F.onnx --feeds F.npz` also compares a real quantized
graph with its fp32 source, per level (the npz holds `f"{case}/{input}"` arrays, e.g. tests/test_quantize.py's
held-out `make_feeds(model, 7, [[256, 384], [512, 256]], [0.7, 0.1])`).

Run natively and on an emulated AVX2-only CPU (Debian's qemu-user, `apt-get install qemu-user`):
    .venv/bin/python scripts/probe_ort_int8_isa.py
    qemu-x86_64 -cpu Haswell .venv/bin/python scripts/probe_ort_int8_isa.py    # ~40 s; warnings about pcid etc.

What it showed (ORT 1.31.1, qemu 7.2, 2026-12-02), max|diff| against the exact answer (|y| up to 106):
  W8A8 toy       ORT_ENABLE_ALL (QuantizeLinear + MatMulIntegerToFloat)   ORT_DISABLE_ALL (as written)
  native VNNI    5.4e-6, cosine 1.000000                                   3.1e-5, cosine 1.000000
  Haswell        21.4, cosine 0.982051 (U8S8 VPMADDUBSW saturates)         3.1e-5, cosine 1.000000
The weight-only toy is fused into MatMulNBits at ORT_ENABLE_ALL/EXTENDED, which quantizes the activations to
int8 on the fly: max|diff| 0.40 of 66.8 (cosine 0.999986) on both CPUs; as written 1.8e-5. ORT_ENABLE_BASIC
leaves Q/DQ as written. On the tiny Qwen-Image transformer (tests/test_quantize.py's int8 and woq graphs and its
held-out feeds saved to npz), min cosine to the fp32 graph: W8A8 native 0.999769 at either level, Haswell
0.990507 at ORT_ENABLE_ALL (issue 15's 0.99051) and 0.999769 at ORT_DISABLE_ALL; weight-only 0.999961 fused
(MatMulNBits) and 0.999984 as written, on both CPUs. `stages.graphs.runners.onnxruntime_session` now runs both toys as
written (3.1e-5 and 1.8e-5 on both CPUs).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import mmap
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

LEVELS = {"ORT_ENABLE_ALL": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
          "ORT_ENABLE_EXTENDED": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
          "ORT_ENABLE_BASIC": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
          "ORT_DISABLE_ALL": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
M, K, N = 64, 512, 256
X_SCALE, W_SCALE = 0.02, 0.01

# push rbx; mov r8, rdx; mov eax, edi; mov ecx, esi; cpuid; mov [r8..r8+12], eax/ebx/ecx/edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex("53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3")


def cpuid(leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
    """EAX, EBX, ECX, EDX of CPUID on this (possibly emulated) CPU: what MLAS's dispatch reads."""
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(_CPUID_CODE)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    function = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint32))(address)
    out = (ctypes.c_uint32 * 4)()
    function(leaf, subleaf, out)
    result = tuple(out)
    del function
    return result  # type: ignore[return-value]


def isa() -> dict[str, bool]:
    _, _, ecx1, _ = cpuid(1)
    _, ebx7, ecx7, _ = cpuid(7, 0)
    eax71, _, _, _ = cpuid(7, 1)
    return {"avx": bool(ecx1 >> 28 & 1), "fma": bool(ecx1 >> 12 & 1), "avx2": bool(ebx7 >> 5 & 1),
            "avx512f": bool(ebx7 >> 16 & 1), "avx512bw": bool(ebx7 >> 30 & 1), "avx512_vnni": bool(ecx7 >> 11 & 1),
            "avx_vnni": bool(eax71 >> 4 & 1)}


def toy_graph(weight_only: bool, w_q: np.ndarray) -> onnx.ModelProto:
    """W8A8 (ModelOpt's layout: Q->DQ on the activation, DQ on the weight, float output) or weight-only INT8."""
    inits = [numpy_helper.from_array(w_q, "w_q"), numpy_helper.from_array(np.array(W_SCALE, np.float32), "w_scale"),
             numpy_helper.from_array(np.array(0, np.int8), "zero")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale", "zero"], ["w"], name="dq_w")]
    if weight_only:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul"))
    else:
        inits.append(numpy_helper.from_array(np.array(X_SCALE, np.float32), "x_scale"))
        nodes += [helper.make_node("QuantizeLinear", ["x", "x_scale", "zero"], ["x_q"], name="q_x"),
                  helper.make_node("DequantizeLinear", ["x_q", "x_scale", "zero"], ["x_dq"], name="dq_x"),
                  helper.make_node("MatMul", ["x_dq", "w"], ["y"], name="matmul")]
    graph = helper.make_graph(nodes, "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [M, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [M, N])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def session(path: Path, level: Any, optimized: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def errors(expected: np.ndarray, got: np.ndarray) -> dict[str, float]:
    a, b = expected.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    return {"max_abs_diff": float(np.abs(a - b).max()), "max_abs_expected": float(np.abs(a).max()),
            "cosine": float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))}


def toy(weight_only: bool, work: Path) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    w_q = rng.integers(-127, 128, size=(K, N), dtype=np.int8)
    x_q = rng.integers(-128, 128, size=(M, K)).astype(np.int64)
    x = (x_q * X_SCALE).astype(np.float32)  # exactly representable grid points: QuantizeLinear gives x_q back
    if weight_only:
        x = rng.standard_normal((M, K)).astype(np.float32)
        exact = x.astype(np.float64) @ (w_q.astype(np.float64) * np.float64(np.float32(W_SCALE)))
    else:
        assert np.array_equal(np.clip(np.rint(x / np.float32(X_SCALE)), -128, 127), x_q)
        scale = np.float64(np.float32(X_SCALE)) * np.float64(np.float32(W_SCALE))
        exact = (x_q @ w_q.astype(np.int64)).astype(np.float64) * scale
    path = work / ("weight_only.onnx" if weight_only else "w8a8.onnx")
    onnx.save(toy_graph(weight_only, w_q), str(path))
    rows: dict[str, Any] = {}
    for name, level in LEVELS.items():
        optimized = work / f"{path.stem}.{name}.onnx"
        y = session(path, level, optimized).run(None, {"x": x})[0]
        rows[name] = {**errors(exact, y), "ops": [n.op_type for n in onnx.load(str(optimized)).graph.node]}
    from stages.graphs.runners import onnxruntime_cpu_note, onnxruntime_session

    rows["stages.graphs.runners.onnxruntime_session"] = {**errors(exact, onnxruntime_session(path).run(None, {"x": x})[0]),
                                                  "note": onnxruntime_cpu_note(onnx.load(str(path)))}
    return rows


def real(model: Path, reference: Path, feeds: Path) -> dict[str, Any]:
    """A quantized graph against its fp32 source on the same feeds, per optimization level of the quantized one."""
    stored = np.load(feeds)
    cases = sorted({key.split("/", 1)[0] for key in stored.files})
    inputs = [{key.split("/", 1)[1]: stored[key] for key in stored.files if key.startswith(case + "/")}
              for case in cases]
    expected = [session(reference, LEVELS["ORT_ENABLE_ALL"]).run(None, feed)[0] for feed in inputs]
    written = {n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node}
    rows = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("ORT_ENABLE_ALL", "ORT_DISABLE_ALL"):
            optimized = Path(scratch) / f"{name}.onnx"
            runner = session(model, LEVELS[name], optimized)
            got = [runner.run(None, feed)[0] for feed in inputs]
            per_case = [errors(e, g) for e, g in zip(expected, got)]
            ops = Counter(n.op_type for n in onnx.load(str(optimized), load_external_data=False).graph.node)
            rows[name] = {"min_cosine": min(r["cosine"] for r in per_case),
                          "max_abs_diff": max(r["max_abs_diff"] for r in per_case),
                          "new_ops": {op: count for op, count in sorted(ops.items()) if op not in written}}
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a quantized ONNX graph")
    parser.add_argument("--reference", type=Path, help="its fp32 source graph")
    parser.add_argument("--feeds", type=Path, help="npz of '<case>/<input>' arrays")
    parser.add_argument("--json", action="store_true", help="print everything measured as JSON")
    args = parser.parse_args()
    ort.set_default_logger_severity(3)
    report: dict[str, Any] = {"onnxruntime": ort.__version__, "cpuid": isa()}
    with tempfile.TemporaryDirectory() as scratch:
        report["w8a8"] = toy(False, Path(scratch))
        report["weight_only"] = toy(True, Path(scratch))
    if args.model:
        report["model"] = real(args.model, args.reference, args.feeds)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"onnxruntime {report['onnxruntime']}; cpuid: " + ", ".join(k for k, v in report["cpuid"].items() if v))
    for graph in ("w8a8", "weight_only"):
        for name, row in report[graph].items():
            how = " ".join(row["ops"]) if "ops" in row else f"graph_optimization: {row['note']['graph_optimization']}"
            print(f"{graph:11s} {name:36s} max|diff| {row['max_abs_diff']:.3g} of {row['max_abs_expected']:.4g}, "
                  f"cosine {row['cosine']:.6f}  [{how}]")
    for name, row in report.get("model", {}).items():
        print(f"model       {name:36s} max|diff| {row['max_abs_diff']:.3g}, min cosine {row['min_cosine']:.6f} "
              f"vs fp32  [ops not in the written graph: {row['new_ops'] or 'none'}]")


if __name__ == "__main__":
    main()
