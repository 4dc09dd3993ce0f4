"""What fp16 and bf16 cost the Qwen-Image VAE decoder in accuracy, against the PyTorch fp32 decode.

The graphs are the ones the stages would build: the component's dynamo export (de-normalisation included),
then ModelOpt AutoCast with `keep_io_types=True`, value_info cleared and shapes re-inferred as
stages/precision.py does. ONNX Runtime's CPU provider has no bf16 Conv, so bf16 (and, as a cross-check of the
method, fp16) is also run *emulated*: the AutoCast graph computed in fp32 with every low-precision tensor
rounded to the low-precision type after each node, which is what a strongly typed engine stores between layers
(accumulation inside a kernel is fp32 in both). The native "fp16 (ORT)" row under-reports: ONNX Runtime's CPU
provider ran chains of fp16 nodes without fp16 kernels in fp32 (it kept fp16-rounded upsample indices exact
where the emulation does not). PyTorch eager fp16/bf16 rows are an independent second opinion.

The built-in configurations have random weights: "wide" has the released VAE's layout but not its activation
statistics, and large activations are what break fp16. `--checkpoint` runs the same measurements on real weights
(the printed activation peaks are the number to compare with fp16's 65504).

    .venv/bin/python scripts/vae_precision_benchmark.py [--configs tiny wide] [--checkpoint /path/to/Qwen-Image]
        [--sizes 512x512,768x1024] [--batch 1] [--out-dir /tmp/vae_precision_benchmark]
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import sys
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.families.qwen_image import vae as qwen_vae  # noqa: E402
from stages.precision import node_output_dtypes  # noqa: E402

# The released VAE's layout (diffusers defaults: 96 base channels, 16 latent channels, 8x, 2 res blocks and the
# released latents_mean/latents_std), with random weights.
WIDE_CONFIG: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "temperal_downsample": [False, True, True],
}
CONFIGS: dict[str, dict[str, Any]] = {"tiny": qwen_vae.TINY_VAE_CONFIG, "wide": WIDE_CONFIG}
DEFAULT_SIZES = {"tiny": "64x96,128x128", "wide": "64x64,128x96"}
ONNX_LOW = {"fp16": 10, "bf16": 16}
TORCH_LOW = {"fp16": torch.float16, "bf16": torch.bfloat16}


def parse_sizes(text: str) -> list[list[int]]:
    sizes = []
    for item in text.split(","):
        parts = item.lower().split("x")
        if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise argparse.ArgumentTypeError(f"--sizes: expected HxW[,HxW...] in pixels, got {item!r}")
        sizes.append([int(parts[0]), int(parts[1])])
    return sizes


def export_fp32(model: Any, path: Path) -> Path:
    from stages.export import export_program

    program, _ = export_program(qwen_vae, model, 0, 20)
    program.save(str(path))
    return path


def autocast(source: Path, dtype: str, target: Path, calibration: Path | None = None) -> Any:
    """AutoCast exactly as the precision stage calls it, optionally with realistic calibration latents."""
    import onnx
    from modelopt.onnx.autocast import convert_to_mixed_precision
    from polygraphy.backend.onnx import infer_shapes

    model = convert_to_mixed_precision(onnx_path=str(source), low_precision_type=dtype, keep_io_types=True,
                                       calibration_data=str(calibration) if calibration else None)
    model.graph.ClearField("value_info")
    model = infer_shapes(model, error_ok=False)
    onnx.save(model, str(target))
    return model


def emulate_low_precision(model: Any, dtype: str) -> Any:
    """fp32 graph that rounds every tensor AutoCast made `dtype` to `dtype` right after the node producing it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    low = ONNX_LOW[dtype]
    model = copy.deepcopy(model)
    graph = model.graph
    typed = onnx.shape_inference.infer_shapes(model).graph
    low_tensors = {v.name for v in (*typed.value_info, *typed.output) if v.type.tensor_type.elem_type == low}

    def widen(tensor: Any) -> Any:
        return numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name)

    for index, tensor in enumerate(graph.initializer):
        if tensor.data_type == low:
            graph.initializer[index].CopyFrom(widen(tensor))
    nodes = []
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == low:
                attribute.t.CopyFrom(widen(attribute.t))
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == low:
                attribute.i = TensorProto.FLOAT
        rounded = []
        for position, name in enumerate(node.output):
            if name in low_tensors:
                node.output[position] = f"{name}__wide"
                rounded.append(name)
        nodes.append(node)
        for name in rounded:
            nodes.append(helper.make_node("Cast", [f"{name}__wide"], [f"{name}__low"], to=low, name=f"{name}__round"))
            nodes.append(helper.make_node("Cast", [f"{name}__low"], [name], to=TensorProto.FLOAT, name=f"{name}__back"))
    graph.ClearField("node")
    graph.node.extend(nodes)
    graph.ClearField("value_info")
    return model


def run_onnxruntime(model_or_path: Any, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray] | str:
    import onnxruntime

    source = str(model_or_path) if isinstance(model_or_path, Path) else model_or_path.SerializeToString()
    try:
        session = onnxruntime.InferenceSession(source, providers=["CPUExecutionProvider"])
        return [session.run(None, feed)[0] for feed in feeds]
    except Exception as error:  # ORT reports missing kernels as generic runtime errors
        return f"not runnable in ONNX Runtime CPU: {str(error).splitlines()[0][:160]}"


def run_torch(model: Any, cases: list[dict[str, Any]], dtype: torch.dtype) -> list[np.ndarray] | str:
    """The stock pipeline lines with the whole VAE and the latents cast to `dtype` (diffusers' own RMS-norm
    keeps its normalisation in fp32 there)."""
    low = copy.deepcopy(model).to(dtype)
    try:
        outputs = []
        for case in cases:
            low_case = {"call": {"latents": case["call"]["latents"].to(dtype)}}
            outputs.append(qwen_vae.reference_outputs(low, low_case)["image"].astype(np.float32))
        return outputs
    except RuntimeError as error:
        return f"not runnable in PyTorch CPU: {str(error).splitlines()[0][:160]}"


def activation_ranges(model: Any, cases: list[dict[str, Any]]) -> dict[str, float]:
    """Largest |activation| in the fp32 decode and the largest per-pixel L2 norm entering an RMS-norm:
    fp16 tops out at 65504, and the norm squares its input before the root."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageRMS_norm

    peaks = {"max_abs_activation": 0.0, "max_rms_norm_input_l2": 0.0}

    def on_output(_: Any, __: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            peaks["max_abs_activation"] = max(peaks["max_abs_activation"], float(output.abs().max()))

    def on_norm_input(module: Any, args: tuple[Any, ...]) -> None:
        norm = args[0].float().norm(dim=1 if module.channel_first else -1)
        peaks["max_rms_norm_input_l2"] = max(peaks["max_rms_norm_input_l2"], float(norm.max()))

    handles = [m.register_forward_hook(on_output) for m in model.modules()]
    handles += [m.register_forward_pre_hook(on_norm_input) for m in model.modules() if isinstance(m, QwenImageRMS_norm)]
    try:
        for case in cases:
            qwen_vae.reference_outputs(model, case)
    finally:
        for handle in handles:
            handle.remove()
    return peaks


def metrics(outputs: list[np.ndarray], references: list[np.ndarray]) -> dict[str, float]:
    """Worst case over the validation cases; PSNR and 8-bit error on the [-1, 1] images mapped to [0, 255]."""
    rows = []
    for out, ref in zip(outputs, references):
        out64, ref64 = out.astype(np.float64), ref.astype(np.float64)
        finite = np.isfinite(out64)
        diff = np.abs(np.where(finite, out64, 0.0) - ref64)
        mse = float(np.mean((diff * 127.5) ** 2))
        cosine = float(np.dot(out64.ravel(), ref64.ravel()) / (np.linalg.norm(out64) * np.linalg.norm(ref64)))
        to_u8 = lambda x: np.round(np.clip(x / 2 + 0.5, 0, 1) * 255)  # noqa: E731  (the pipeline's postprocess)
        rows.append({
            "max_abs": float(diff.max()),
            "mean_abs": float(diff.mean()),
            "psnr": math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse),
            "cosine": cosine,
            "u8_max": float(np.abs(to_u8(np.where(finite, out64, 0.0)) - to_u8(ref64)).max()),
            "u8_changed": float(np.mean(to_u8(np.where(finite, out64, 0.0)) != to_u8(ref64))),
            "non_finite": float((~finite).sum()),
        })
    return {
        "max_abs": max(r["max_abs"] for r in rows),
        "mean_abs": max(r["mean_abs"] for r in rows),
        "psnr": min(r["psnr"] for r in rows),
        "cosine": min(r["cosine"] for r in rows),
        "u8_max": max(r["u8_max"] for r in rows),
        "u8_changed": max(r["u8_changed"] for r in rows),
        "non_finite": sum(r["non_finite"] for r in rows),
    }


def precision_counts(model: Any) -> str:
    counts = Counter(node_output_dtypes(model).values())
    return "/".join(f"{counts.get(k, 0)} {k}" for k in ("fp32", "fp16", "bf16") if counts.get(k))


def benchmark(name: str, model: Any, sizes: list[list[int]], batch: int, seed: int, out_dir: Path) -> list[dict[str, Any]]:
    import onnx

    work = out_dir / name
    work.mkdir(parents=True, exist_ok=True)
    parameters = sum(p.numel() for p in model.decoder.parameters()) + sum(p.numel() for p in model.post_quant_conv.parameters())
    cases = qwen_vae.validation_cases(model, SimpleNamespace(sizes=sizes, batch=batch, seed=seed), text_length=0)
    feeds = [case["feed"] for case in cases]
    references = [qwen_vae.reference_outputs(model, case)["image"] for case in cases]
    peaks = activation_ranges(model, cases)
    print(f"\n== {name}: decoder {parameters / 1e6:.2f} M params, sizes {sizes}, batch {batch}, seed {seed}; "
          f"fp32 max|activation| {peaks['max_abs_activation']:.3g}, max RMS-norm input L2 "
          f"{peaks['max_rms_norm_input_l2']:.3g}", flush=True)

    started = time.perf_counter()
    fp32_path = export_fp32(model, work / "fp32.onnx")
    print(f"   exported in {time.perf_counter() - started:.1f}s", flush=True)
    calibration = work / "calibration.npz"
    np.savez(calibration, **feeds[-1])

    rows: list[tuple[str, str, Any]] = [("onnx fp32 (ORT)", precision_counts(onnx.load(str(fp32_path), load_external_data=False)), fp32_path)]
    for dtype in ("fp16", "bf16"):
        converted = autocast(fp32_path, dtype, work / f"{dtype}.onnx")
        counts = precision_counts(converted)
        rows.append((f"autocast {dtype} (ORT)", counts, work / f"{dtype}.onnx"))
        rows.append((f"autocast {dtype} (emulated)", counts, emulate_low_precision(converted, dtype)))
        calibrated = autocast(fp32_path, dtype, work / f"{dtype}-calibrated.onnx", calibration)
        rows.append((f"autocast {dtype} calibrated (emulated)", precision_counts(calibrated),
                     emulate_low_precision(calibrated, dtype)))
    results = []
    for label, counts, graph in rows:
        started = time.perf_counter()
        outputs = run_onnxruntime(graph, feeds)
        results.append({"config": name, "runner": label, "nodes": counts, "seconds": time.perf_counter() - started,
                        **(metrics(outputs, references) if isinstance(outputs, list) else {"error": outputs})})
    for dtype, torch_dtype in TORCH_LOW.items():
        started = time.perf_counter()
        outputs = run_torch(model, cases, torch_dtype)
        results.append({"config": name, "runner": f"torch {dtype} eager", "nodes": "-",
                        "seconds": time.perf_counter() - started,
                        **(metrics(outputs, references) if isinstance(outputs, list) else {"error": outputs})})
    return results


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'config':6} {'runner':38} {'max|d|':>9} {'mean|d|':>9} {'PSNR dB':>8} {'cosine':>10} "
              f"{'u8 max':>6} {'u8 chg%':>7} {'nonfin':>6}  nodes (fp32/low)")
    print("\n" + header + "\n" + "-" * len(header))
    for row in results:
        if "error" in row:
            print(f"{row['config']:6} {row['runner']:38} {row['error']}")
            continue
        print(f"{row['config']:6} {row['runner']:38} {row['max_abs']:9.2e} {row['mean_abs']:9.2e} {row['psnr']:8.2f} "
              f"{row['cosine']:10.7f} {row['u8_max']:6.0f} {100 * row['u8_changed']:7.3f} {row['non_finite']:6.0f}  "
              f"{row['nodes']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="*", choices=sorted(CONFIGS), default=["tiny", "wide"])
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="also run a diffusers-layout Qwen-Image checkpoint's vae/ (real weights; slow on CPU)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="HxW[,HxW...] in pixels, multiples of 8 (default per config: "
                             + ", ".join(f"{k} {v}" for k, v in DEFAULT_SIZES.items()) + ")")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("/tmp/vae_precision_benchmark"))
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch: must be >= 1, got {args.batch}")
    logging.disable(logging.WARNING)
    if not args.configs and args.checkpoint is None:
        parser.error("--configs: choose at least one of tiny, wide, or pass --checkpoint")
    models = [(name, lambda name=name: qwen_vae.make_tiny_vae(args.seed, CONFIGS[name]), DEFAULT_SIZES[name])
              for name in args.configs]
    if args.checkpoint is not None:
        models.append(("ckpt", lambda: qwen_vae.load(args.checkpoint), DEFAULT_SIZES["wide"]))
    results = []
    for name, make, default_sizes in models:
        sizes = args.sizes or parse_sizes(default_sizes)
        results += benchmark(name, make(), sizes, args.batch, args.seed, args.out_dir)
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
