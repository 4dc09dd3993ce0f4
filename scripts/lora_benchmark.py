"""What LoRA inputs cost at the released shapes: extra FLOPs per transformer call, device bytes, calls per image.

The arithmetic follows the graph exactly: per targeted linear a branch of 2 R (in + out) FLOPs per token
(stages.graphs.lora.Branch), against the base call's linears (2 in out per token) plus its joint attention
(QK^T and AV: 4 L d per token and block over L = image + text tokens). With `--export DIR` it also adds the
branches to that transformer export (the surgery stage's own pass) and reports the graph's counts.

Usage::

    .venv/bin/python scripts/lora_benchmark.py                       # the released config, R = 64
    .venv/bin/python scripts/lora_benchmark.py --export artifacts/a10-fp16/transformer/export --rank 64
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.families.qwen_image.lora_targets import DEFAULT_TARGETS, block_linear_shapes  # noqa: E402

RELEASED = {"num_layers": 60, "num_attention_heads": 24, "attention_head_dim": 128}
SIZES = ((1024, 1024), (1328, 1328), (1664, 928))
TEXT = 256


def figures(config: dict[str, int], rank: int) -> dict[str, object]:
    dim = config["num_attention_heads"] * config["attention_head_dim"]
    per_stream = {"image": [t for t in DEFAULT_TARGETS if not t.startswith(("txt", "attn.add", "attn.to_add"))]}
    per_stream["text"] = [t for t in DEFAULT_TARGETS if t not in per_stream["image"]]
    linear = {target: shape for target, shape in block_linear_shapes(dim).items() if target in DEFAULT_TARGETS}
    rows = []
    for height, width in SIZES:
        tokens = {"image": (height // 16) * (width // 16), "text": TEXT}
        joint = sum(tokens.values())
        base = lora = 0
        for stream, targets in per_stream.items():
            base += tokens[stream] * sum(2 * i * o for i, o in (linear[t] for t in targets))
            base += tokens[stream] * 4 * joint * dim  # attention scores and weighted values
            lora += tokens[stream] * sum(2 * rank * (i + o) for i, o in (linear[t] for t in targets))
        layers = config["num_layers"]
        rows.append({"size": f"{height}x{width}", "base_tflops_per_call": round(layers * base / 1e12, 3),
                     "lora_tflops_per_call": round(layers * lora / 1e12, 4),
                     "extra_percent": round(100 * lora / base, 2)})
    input_bytes = config["num_layers"] * sum(2 * rank * (i + o) for i, o in linear.values()) + 4 * rank
    return {"rank": rank, "targets": len(DEFAULT_TARGETS), "linears": config["num_layers"] * len(DEFAULT_TARGETS),
            "lora_input_bytes": input_bytes, "lora_input_gib": round(input_bytes / 2**30, 3), "per_call": rows,
            "transformer_calls_per_image": {"base: 50 steps, CFG 4 (batch-2 calls)": 50,
                                            "base: 50 steps, CFG 4 (batch 1: two calls a step)": 100,
                                            "Lightning: 8 steps, CFG 1": 8, "Lightning 4-step: 4 steps, CFG 1": 4}}


def graph_figures(export: Path, rank: int) -> dict[str, object]:
    import tempfile

    from stages.surgery import GraphSurgery

    with tempfile.TemporaryDirectory() as out:
        report = GraphSurgery("transformer", export / "model.onnx", ("infer_shapes", "cleanup"), TEXT,
                              lora_targets=DEFAULT_TARGETS, lora_rank=rank)(Path(out))
    lora = report["lora"]
    return {k: lora[k] for k in ("branches", "flops_per_token", "base_linear_flops_per_token", "input_bytes")} | {
        "pruned": len(lora["pruned"]),
        "extra_linear_percent": round(100 * lora["flops_per_token"] / lora["base_linear_flops_per_token"], 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--config", type=Path, help="a transformer/config.json (default: the released one)")
    parser.add_argument("--export", type=Path, help="a transformer export folder (model.onnx) to add branches to")
    args = parser.parse_args()
    config = {**RELEASED, **(json.loads(args.config.read_text()) if args.config else {})}
    result = {"arithmetic": figures(config, args.rank)}
    if args.export:
        result["graph"] = graph_figures(args.export, args.rank)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
