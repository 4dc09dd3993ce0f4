"""Write a synthetic Qwen-Image LoRA of the published shapes: random, seeded, in a published key layout.

Why: Qwen-Image-Lightning and style LoRAs cannot be downloaded here; tests, CI and benchmarks bind LoRAs of their
exact shapes instead (Lightning: rank 64, alpha 8, the twelve attention/MLP linears of all 60 blocks, bf16). The
shapes come from the checkpoint's `transformer/config.json` (the model is built on the meta device: no weights
read, no memory), so a release-width file is written for a synthetic release checkpoint.

Usage::

    .venv/bin/python scripts/synthetic_lora.py --out /tmp/lightning.safetensors --checkpoint /tmp/qwen-synth \\
        --rank 64 --alpha 8 --format lightning
    .venv/bin/python scripts/synthetic_lora.py --out /tmp/style.safetensors --rank 16 --format peft   # tiny model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.families.qwen_image import lora, transformer  # noqa: E402
from stages.families.qwen_image.lora_targets import BLOCK_LINEARS, DEFAULT_TARGETS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the .safetensors file to write")
    parser.add_argument("--checkpoint", default="tiny", help="a diffusers checkpoint directory, or tiny (default)")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--alpha", type=float, default=None, help="stored alpha (default: none, i.e. alpha = rank)")
    parser.add_argument("--format", choices=lora.FORMATS, default="lightning")
    parser.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                        help=f"comma-separated block linears; allowed: {', '.join(BLOCK_LINEARS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--magnitude", type=float, default=0.1, help="the update's size relative to 1/sqrt(in)")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    wrong = [t for t in targets if t not in BLOCK_LINEARS]
    if wrong or args.rank < 1 or args.out.suffix != ".safetensors":
        print(f"synthetic_lora: --targets {wrong} / --rank {args.rank} / --out {args.out}: allowed targets "
              f"{', '.join(BLOCK_LINEARS)}, rank >= 1, a .safetensors file", file=sys.stderr)
        return 2
    model = (transformer.make_tiny_transformer(0) if args.checkpoint == "tiny"
             else transformer.load_meta(args.checkpoint))
    shapes = lora.linear_shapes(model, targets)
    path = lora.write_synthetic(args.out, shapes, args.rank, args.seed, args.format, args.alpha, args.magnitude)
    print(f"{path}: {len(shapes)} linears, rank {args.rank}, {args.format} keys, {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
