"""Probe which weight-stripped / refittable / weight-streaming TensorRT-RTX builds work on a machine without a GPU.

Why: issue 9 wants engines for a 41 GB transformer. A weight-stripped ("weightless") engine refitted from the
checkpoint at deploy time would avoid writing the weights a second time; NOTES records that STRIP_PLAN and
REFIT builds failed here with a Myelin CUDA check. This script reproduces every relevant flag combination on
small graphs and prints one row per combination: built or not, engine bytes (vs the plain build), build time
and the first error the builder logged. Each build runs in its own subprocess, so a crash in the builder is
recorded as a row instead of ending the probe.

Graphs (all fp16, static shapes, built for SM86 = A10 through CPU-only AOT):
  * ``matmul``: ONNX, 4 x (MatMul with a 1024x1024 fp16 initializer, Add bias, Relu): the transformer's shape
    of work, which TensorRT-RTX compiles through Myelin.
  * ``matmul_inputs``: the same ONNX with the weights as graph *inputs* instead of initializers (a weightless
    engine by construction; the runtime binds the checkpoint's tensors as inputs).
  * ``conv``: network API, 2 x IConvolutionLayer 3x3 with real fp16 kernels (non-Myelin path).
  * ``conv_placeholder``: the same with 1.7's null weight placeholders (``Weights(type, 0, count)``), which the
    TensorRT-RTX 1.7 / TensorRT 11.3 API docs allow for convolution/deconvolution/scale weights only, with
    kSTRIP_PLAN + kREFIT_INDIVIDUAL.
  * ``linear_conv[_placeholder]``: the MatMul layers written as 1x1 convolutions (network API).
  * ``onnx_conv_*``: the 1x1-conv form as ONNX, trying placeholders through the parser (``load_initializer`` with
    a null pointer) and through the layer setters.
  * ``constant_placeholder``: MatMul on ``add_constant(shape, Weights(fp16, 0, n))`` (network API).
  * ``onnx_matmul_swap`` / ``onnx_matmul_rewire``: the parsed ONNX MatMul graph with its constants set to null
    (setters) or replaced by new placeholder constants that its consumers are rewired to.

See docs/tensorrt-rtx-weightless.md for the results and what they mean for the forge.

Usage: .venv/bin/python scripts/probe_rtx_weightless.py [--json out.json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WIDTH = int(os.environ.get("PROBE_WIDTH", "1024"))  # --width / --layers travel to the subprocesses this way
MATMULS = int(os.environ.get("PROBE_LAYERS", "4"))
CONV_CHANNELS = 256

# name -> (graph, builder flags, mark every initializer refittable, extra option)
COMBOS: dict[str, tuple[str, tuple[str, ...], bool, str | None]] = {
    "plain": ("matmul", (), False, None),
    "STRIP_PLAN": ("matmul", ("STRIP_PLAN",), False, None),
    "STRIP_PLAN+REFIT": ("matmul", ("STRIP_PLAN", "REFIT"), False, None),
    "STRIP_PLAN+REFIT_IDENTICAL": ("matmul", ("STRIP_PLAN", "REFIT_IDENTICAL"), False, None),
    "STRIP_PLAN+REFIT_INDIVIDUAL": ("matmul", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "STRIP_PLAN+REFIT_INDIVIDUAL+mark": ("matmul", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), True, None),
    "REFIT": ("matmul", ("REFIT",), False, None),
    "REFIT_IDENTICAL": ("matmul", ("REFIT_IDENTICAL",), False, None),
    "REFIT_INDIVIDUAL": ("matmul", ("REFIT_INDIVIDUAL",), False, None),
    "REFIT_INDIVIDUAL+mark": ("matmul", ("REFIT_INDIVIDUAL",), True, None),
    "WEIGHT_STREAMING": ("matmul", ("WEIGHT_STREAMING",), False, None),
    "WEIGHT_STREAMING+STRIP_PLAN": ("matmul", ("WEIGHT_STREAMING", "STRIP_PLAN"), False, None),
    "WEIGHT_STREAMING+REFIT_INDIVIDUAL+mark": ("matmul", ("WEIGHT_STREAMING", "REFIT_INDIVIDUAL"), True, None),
    "STRIP_PLAN opt-level 0": ("matmul", ("STRIP_PLAN", "REFIT_IDENTICAL"), False, "opt0"),
    "CURRENT (no GPU)": ("matmul", (), False, "current"),
    "weights as inputs": ("matmul_inputs", (), False, None),
    "conv plain": ("conv", (), False, None),
    "conv STRIP_PLAN+REFIT_INDIVIDUAL+mark": ("conv", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), True, None),
    "conv STRIP_PLAN+REFIT_IDENTICAL": ("conv", ("STRIP_PLAN", "REFIT_IDENTICAL"), False, None),
    "conv placeholder STRIP_PLAN+REFIT_INDIVIDUAL": ("conv_placeholder", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "conv placeholder STRIP_PLAN+REFIT_IDENTICAL": ("conv_placeholder", ("STRIP_PLAN", "REFIT_IDENTICAL"), False, None),
    "conv placeholder REFIT_INDIVIDUAL (no strip)": ("conv_placeholder", ("REFIT_INDIVIDUAL",), False, None),
    "conv placeholder +WEIGHT_STREAMING": ("conv_placeholder", ("STRIP_PLAN", "REFIT_INDIVIDUAL", "WEIGHT_STREAMING"),
                                           False, None),
    "linear as 1x1 conv plain": ("linear_conv", (), False, None),
    "linear as 1x1 conv placeholder": ("linear_conv_placeholder", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "onnx 1x1 Conv, load_initializer(null)": ("onnx_conv_null", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "onnx 1x1 Conv, kernels set to null": ("onnx_conv_swap", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "MatMul with IConstantLayer placeholder": ("constant_placeholder", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "onnx MatMul, constants set to null": ("onnx_matmul_swap", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False, None),
    "onnx MatMul, constants rewired to placeholders": ("onnx_matmul_rewire", ("STRIP_PLAN", "REFIT_INDIVIDUAL"), False,
                                                       None),
}


def parse_matmul_onnx(trt: Any, network: Any, logger: Any, workdir: Path) -> str | None:
    """Parse the probe's MatMul ONNX (written once per workdir) into `network`; the parser's error, or None."""
    onnx_path = workdir / "matmul.onnx"
    if not onnx_path.exists():
        write_matmul_onnx(onnx_path, weights_as_inputs=False)
    parser = trt.OnnxParser(network, logger)
    return None if parser.parse_from_file(str(onnx_path)) else parser.get_error(0).desc()


def write_matmul_onnx(path: Path, weights_as_inputs: bool) -> None:
    """Four fp16 MatMul+Add+Relu layers; weights as initializers (default) or as graph inputs."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, inputs = [], [], [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [8, WIDTH])]
    current = "x"
    for index in range(MATMULS):
        weight, bias = f"layer{index}.weight", f"layer{index}.bias"
        w = (rng.standard_normal((WIDTH, WIDTH)) * 0.02).astype(np.float16)
        b = (rng.standard_normal(WIDTH) * 0.02).astype(np.float16)
        if weights_as_inputs:
            inputs.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT16, [WIDTH, WIDTH]))
            inputs.append(helper.make_tensor_value_info(bias, TensorProto.FLOAT16, [WIDTH]))
        else:
            inits += [numpy_helper.from_array(w, weight), numpy_helper.from_array(b, bias)]
        nodes += [helper.make_node("MatMul", [current, weight], [f"mm{index}"]),
                  helper.make_node("Add", [f"mm{index}", bias], [f"add{index}"]),
                  helper.make_node("Relu", [f"add{index}"], [f"y{index}"])]
        current = f"y{index}"
    graph = helper.make_graph(nodes, "probe", inputs, [helper.make_tensor_value_info(current, TensorProto.FLOAT16,
                                                                                     [8, WIDTH])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def rewire_constants_to_placeholders(trt: Any, network: Any) -> list[str]:
    """Replace every parsed IConstantLayer by a placeholder constant (same name, dtype, count, shape).

    The setter refuses null weights, so a new layer is created (placeholders are only accepted at layer
    creation) and every consumer is pointed at it; the parsed constant is left without consumers."""
    constants = []
    for index in range(network.num_layers):
        layer = network.get_layer(index)
        if layer.type == trt.LayerType.CONSTANT:
            layer.__class__ = trt.IConstantLayer
            constants.append(layer)
    replaced: list[str] = []
    for layer in constants:
        old_output = layer.get_output(0)
        weights = layer.weights
        count = int(weights.size)
        if count < 2:  # scalars (shape constants) stay as they are
            continue
        dtype = old_output.dtype
        placeholder = network.add_constant(layer.shape, trt.Weights(dtype, 0, count))
        # The parser already registered the ONNX initializer name for the parsed weights, and a weights name
        # can't be moved; the placeholder gets the initializer name plus a suffix (the refit key at deploy).
        name = layer.name
        placeholder.name = f"{name}:placeholder"
        network.set_weights_name(placeholder.weights, f"{name}:placeholder")
        for index in range(network.num_layers):
            consumer = network.get_layer(index)
            for slot in range(consumer.num_inputs):
                if consumer.get_input(slot) is not None and consumer.get_input(slot).name == old_output.name:
                    consumer.set_input(slot, placeholder.get_output(0))
        replaced.append(placeholder.name)
    return replaced


def write_conv1x1_onnx(path: Path) -> None:
    """The matmul graph's four layers as ONNX 1x1 Conv on [1, WIDTH, 8, 1] (a Linear written as a convolution)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes, inits, current = [], [], "x"
    for index in range(MATMULS):
        weight, bias = f"layer{index}.weight", f"layer{index}.bias"
        inits += [numpy_helper.from_array((rng.standard_normal((WIDTH, WIDTH, 1, 1)) * 0.02).astype(np.float16), weight),
                  numpy_helper.from_array((rng.standard_normal(WIDTH) * 0.02).astype(np.float16), bias)]
        nodes += [helper.make_node("Conv", [current, weight, bias], [f"conv{index}"]),
                  helper.make_node("Relu", [f"conv{index}"], [f"y{index}"])]
        current = f"y{index}"
    shape = [1, WIDTH, 8, 1]
    graph = helper.make_graph(nodes, "probe_conv", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, shape)],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT16, shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    onnx.checker.check_model(model)
    onnx.save(model, path)


def weight_bytes(graph: str) -> int:
    if graph.startswith(("matmul", "linear_conv", "onnx_", "constant")):
        return MATMULS * (WIDTH * WIDTH + WIDTH) * 2
    return 2 * (CONV_CHANNELS * CONV_CHANNELS * 9 + CONV_CHANNELS) * 2


def build_one(name: str, workdir: Path) -> dict[str, Any]:
    """One build in this process; returns the row."""
    import numpy as np
    import tensorrt_rtx as trt

    graph, flags, mark, extra = COMBOS[name]
    messages: list[str] = []
    messages_info: dict[str, Any] = {}

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                messages.append(msg.strip().splitlines()[0][:300])

    logger = Logger()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    config = builder.create_builder_config()
    config.num_compute_capabilities = 1
    config.set_compute_capability(trt.ComputeCapability.CURRENT if extra == "current" else trt.ComputeCapability.SM86, 0)
    if extra == "opt0":
        config.builder_optimization_level = 0
    for flag in flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    weight_names: list[str] = []
    keep_alive: list[Any] = []
    if graph.startswith("matmul"):
        onnx_path = workdir / f"{graph}.onnx"
        if not onnx_path.exists():
            write_matmul_onnx(onnx_path, weights_as_inputs=graph == "matmul_inputs")
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            return {"name": name, "built": False, "error": parser.get_error(0).desc()}
        weight_names = [f"layer{i}.{kind}" for i in range(MATMULS) for kind in ("weight", "bias")]
    elif graph == "onnx_conv_swap":
        onnx_path = workdir / "conv1x1.onnx"
        if not onnx_path.exists():
            write_conv1x1_onnx(onnx_path)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            return {"name": name, "built": False, "error": parser.get_error(0).desc()}
        swapped = 0
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.CONVOLUTION:
                layer.__class__ = trt.IConvolutionLayer
                names = (f"{layer.name}.kernel", f"{layer.name}.bias")
                layer.kernel = trt.Weights(trt.float16, 0, layer.kernel.size)
                layer.bias = trt.Weights(trt.float16, 0, layer.bias.size)
                network.set_weights_name(layer.kernel, names[0])
                network.set_weights_name(layer.bias, names[1])
                swapped += 1
        if swapped == 0:
            messages.append("no convolution layers found to set to null")
    elif graph == "onnx_matmul_swap":
        error = parse_matmul_onnx(trt, network, logger, workdir)
        if error:
            return {"name": name, "built": False, "error": error}
        for index in range(network.num_layers):
            layer = network.get_layer(index)
            if layer.type == trt.LayerType.CONSTANT:
                layer.__class__ = trt.IConstantLayer
                old_weights = layer.weights
                layer.weights = trt.Weights(trt.float16, 0, int(old_weights.size))
                weight_names.append(layer.name)
    elif graph == "onnx_matmul_rewire":
        error = parse_matmul_onnx(trt, network, logger, workdir)
        if error:
            return {"name": name, "built": False, "error": error}
        names = rewire_constants_to_placeholders(trt, network)
        messages_info["placeholders"] = names
    elif graph == "constant_placeholder":
        current = network.add_input("x", trt.float16, (8, WIDTH))
        for index in range(MATMULS):
            constant = network.add_constant((WIDTH, WIDTH), trt.Weights(trt.float16, 0, WIDTH * WIDTH))
            network.set_weights_name(constant.weights, f"layer{index}.weight")
            product = network.add_matrix_multiply(current, trt.MatrixOperation.NONE, constant.get_output(0),
                                                  trt.MatrixOperation.NONE)
            current = network.add_activation(product.get_output(0), trt.ActivationType.RELU).get_output(0)
        network.mark_output(current)
    elif graph == "onnx_conv_null":
        onnx_path = workdir / "conv1x1.onnx"
        if not onnx_path.exists():
            write_conv1x1_onnx(onnx_path)
        parser = trt.OnnxParser(network, logger)
        ok = parser.load_model_proto(onnx_path.read_bytes(), str(onnx_path))
        for index in range(MATMULS):
            for kind, size in (("weight", WIDTH * WIDTH * 2), ("bias", WIDTH * 2)):
                ok = parser.load_initializer(f"layer{index}.{kind}", 0, size) and ok
        if not ok or not parser.parse_model_proto():
            error = parser.get_error(0).desc() if parser.num_errors else "load_initializer returned False"
            return {"name": name, "graph": graph, "flags": "+".join(flags), "built": False,
                    "weight_bytes": weight_bytes(graph), "error": f"parser: {error}"}
    else:
        channels, kernel, side, layers = ((WIDTH, 1, 8, MATMULS) if graph.startswith("linear_conv")
                                          else (CONV_CHANNELS, 3, 32, 2))
        rng = np.random.default_rng(0)
        current = network.add_input("x", trt.float16, (1, channels, side, 1 if kernel == 1 else side))
        for index in range(layers):
            count = channels * channels * kernel * kernel
            if graph.endswith("placeholder"):
                kernel_w, bias_w = trt.Weights(trt.float16, 0, count), trt.Weights(trt.float16, 0, channels)
            else:
                k = (rng.standard_normal(count) * 0.02).astype(np.float16)
                b = (rng.standard_normal(channels) * 0.02).astype(np.float16)
                keep_alive += [k, b]
                kernel_w, bias_w = trt.Weights(k), trt.Weights(b)
            layer = network.add_convolution_nd(current, channels, (kernel, kernel), kernel_w, bias_w)
            layer.padding_nd = (kernel // 2, kernel // 2)
            layer.name = f"conv{index}"
            for role, weights_name in ((trt.WeightsRole.KERNEL, f"conv{index}.weight"),
                                       (trt.WeightsRole.BIAS, f"conv{index}.bias")):
                weights = layer.kernel if role == trt.WeightsRole.KERNEL else layer.bias
                network.set_weights_name(weights, weights_name)
                weight_names.append(weights_name)
            current = network.add_activation(layer.get_output(0), trt.ActivationType.RELU).get_output(0)
        network.mark_output(current)
    marked = [network.mark_weights_refittable(weight) for weight in weight_names] if mark else []
    started = time.perf_counter()
    try:
        engine = builder.build_serialized_network(network, config)
    except Exception as error:  # noqa: BLE001 - the builder's exception text is the finding
        engine, messages = None, messages + [f"{type(error).__name__}: {error}"]
    seconds = time.perf_counter() - started
    row: dict[str, Any] = {"name": name, "graph": graph, "flags": "+".join(flags) or "-", "built": engine is not None,
                           "seconds": round(seconds, 2), "weight_bytes": weight_bytes(graph),
                           "marked": f"{sum(marked)}/{len(marked)}" if mark else ""}
    if engine is not None:
        row["engine_bytes"] = engine.nbytes
        (workdir / f"{name.replace(' ', '_').replace('+', '_')}.engine").write_bytes(bytes(engine))
        row.update(read_back(trt, logger, messages, engine))
    row["error"] = messages[0] if messages else ""
    row["errors"] = messages[:4]
    row.update(messages_info)
    row["peak_rss_mb"] = peak_rss_mb()
    return row


def peak_rss_mb() -> int:
    """This process's own RSS high-water mark. VmHWM, not getrusage: Linux carries ru_maxrss across execve, so a
    child started by a parent that wrote the graphs would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def read_back(trt: Any, logger: Any, messages: list[str], engine: Any) -> dict[str, Any]:
    """What can be read from a serialized engine without a GPU: deserialization (and then the weight stats)."""
    runtime = trt.Runtime(logger)
    before = len(messages)
    try:
        cuda_engine = runtime.deserialize_cuda_engine(engine)
    except Exception as error:  # noqa: BLE001
        cuda_engine = None
        messages.append(f"deserialize: {type(error).__name__}: {error}")
    if cuda_engine is None:
        text = messages[before] if len(messages) > before else "returned None"
        del messages[before:]
        return {"deserialize": f"no ({text[:160]})"}
    return {"deserialize": "yes", "streamable_weights_size": cuda_engine.streamable_weights_size,
            "total_weights_size": cuda_engine.get_engine_stat(trt.EngineStat.TOTAL_WEIGHTS_SIZE)}


def run_all(keep: Path | None, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="rtx_weightless_") as temporary:
        workdir = keep or Path(temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        # Graphs are written here, not in the builds, so each build's peak RSS is the builder's own.
        for graph_file, writer in (("matmul.onnx", lambda path: write_matmul_onnx(path, False)),
                                   ("matmul_inputs.onnx", lambda path: write_matmul_onnx(path, True)),
                                   ("conv1x1.onnx", write_conv1x1_onnx)):
            if not (workdir / graph_file).exists():
                writer(workdir / graph_file)
        for name in names:
            result = subprocess.run([sys.executable, __file__, "--one", name, "--workdir", str(workdir)],
                                    capture_output=True, text=True, timeout=300, env={**os.environ})
            lines = [line for line in result.stdout.splitlines() if line.startswith("ROW ")]
            if lines:
                rows.append(json.loads(lines[-1][4:]))
            else:
                tail = (result.stderr.strip().splitlines() or ["no output"])[-1][:200]
                rows.append({"name": name, "built": False, "error": f"process exited {result.returncode}: {tail}"})
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    plain = next((row.get("engine_bytes") for row in rows if row["name"] == "plain"), None)
    conv_plain = next((row.get("engine_bytes") for row in rows if row["name"] == "conv plain"), None)
    linear_plain = next((row.get("engine_bytes") for row in rows if row["name"] == "linear as 1x1 conv plain"), None)
    print(f"{'combination':46} {'built':5} {'engine':>10} {'vs plain':>8} {'weights':>10} {'s':>5} {'RSS MB':>6}  "
          "deserialize / error")
    for row in rows:
        size = row.get("engine_bytes")
        graph = row.get("graph", "")
        base = conv_plain if graph.startswith("conv") else linear_plain if graph.startswith(("linear", "onnx_conv")) else plain
        ratio = f"{size / base:.2f}x" if size and base else ""
        note = row.get("error") or row.get("deserialize", "")
        print(f"{row['name']:46} {'yes' if row['built'] else 'NO':5} {size or '':>10} {ratio:>8} "
              f"{row.get('weight_bytes', ''):>10} {row.get('seconds', ''):>5} {row.get('peak_rss_mb', ''):>6}  {note[:110]}")


def main() -> int:
    global WIDTH, MATMULS  # noqa: PLW0603 - the graph writers read them; children get them via the environment
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    parser.add_argument("--keep", type=Path, help="keep the ONNX graphs and engines in this directory")
    parser.add_argument("--width", type=int, default=WIDTH, help="MatMul width (default 1024)")
    parser.add_argument("--layers", type=int, default=MATMULS, help="MatMul layers (default 4)")
    parser.add_argument("--only", help="semicolon-separated combination names (default: all)")
    args = parser.parse_args()
    if args.one:
        print("ROW " + json.dumps(build_one(args.one, args.workdir)), flush=True)
        return 0
    import tensorrt_rtx

    print(f"tensorrt_rtx {tensorrt_rtx.__version__}, target SM86 (CPU-only AOT); MatMul graphs {args.layers} x "
          f"{args.width}x{args.width} fp16\n")
    WIDTH, MATMULS = args.width, args.layers
    os.environ["PROBE_WIDTH"], os.environ["PROBE_LAYERS"] = str(args.width), str(args.layers)
    names = [name.strip() for name in args.only.split(";")] if args.only else list(COMBOS)
    rows = run_all(args.keep, names)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
