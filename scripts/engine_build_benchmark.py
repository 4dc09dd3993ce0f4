"""Engine build benchmark: the forge's engine stage on a precision graph, with wall time and the builder's peak RSS.

Why a script of its own: the full fp16 transformer needs about 100 GB of builder RAM, more than the development
machine has, so its build is measured on a lent big-memory machine that has none of the forge's other tools.
`spec` (run where the build was planned) writes the engine stage's settings exactly as `doit` resolves them;
`build` (run anywhere with tensorrt-rtx) calls the same `stages.engine.BuildEngine` on a graph whose external
data (the checkpoint's shards, e.g. regenerated with scripts/synthetic_checkpoint.py and the same seed) lies
beside it.

    .venv/bin/python scripts/engine_build_benchmark.py spec --artifacts A --recipe a10-fp16 --component transformer \\
        --model CKPT --out spec.json
    python scripts/engine_build_benchmark.py build --spec spec.json --onnx CKPT/transformer/model.onnx --out DIR
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def write_spec(options: argparse.Namespace) -> int:
    import os

    os.environ["FORGE_ARTIFACTS"] = str(options.artifacts)
    from stages.engine import from_recipe
    from stages.inputs import Ref, StageInputs
    from stages.recipe.load import load_recipe

    loaded = load_recipe(options.recipe, model=str(options.model))
    precision = (options.artifacts / loaded.name / options.component / "precision").resolve()
    inputs = StageInputs(options.model, {Ref("precision", options.component): precision}, options.artifacts)
    stage = from_recipe(loaded, options.component, inputs)
    spec = {"component": stage.component, "backend": stage.backend, "compute_capability": stage.compute_capability,
            "shapes": stage.shapes, "optimization_level": stage.optimization_level,
            "weight_streaming_budget_gib": stage.weight_streaming_budget_gib, "source": str(stage.onnx_path)}
    options.out.write_text(json.dumps(spec, indent=2))
    print(json.dumps(spec))
    return 0


def build(options: argparse.Namespace) -> int:
    from stages import log
    from stages.engine import ENGINE_FILE, BuildEngine

    log.configure()
    spec = json.loads(options.spec.read_text())
    stage = BuildEngine(component=spec["component"], onnx_path=options.onnx, backend=spec["backend"],
                        compute_capability=tuple(spec["compute_capability"]),
                        shapes={k: [tuple(s) for s in v] for k, v in spec["shapes"].items()},
                        optimization_level=spec["optimization_level"],
                        weight_streaming_budget_gib=spec["weight_streaming_budget_gib"])
    weights = sum(p.stat().st_size for p in options.onnx.parent.glob("*.safetensors"))
    options.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report = stage(options.out)
    wall = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    engine = (options.out / ENGINE_FILE).stat().st_size
    result = {"wall_s": round(wall, 1), "build_seconds": report["build_seconds"], "peak_rss_gb": round(peak / 1e9, 2),
              "weights_gb": round(weights / 1e9, 2), "peak_over_weights": round(peak / max(weights, 1), 2),
              "engine_gb": round(engine / 1e9, 2), "weight_streaming": report["weight_streaming"]}
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    spec = commands.add_parser("spec", help="write the engine stage's settings for one component")
    spec.add_argument("--artifacts", type=Path, required=True)
    spec.add_argument("--recipe", default="a10-fp16")
    spec.add_argument("--component", default="transformer")
    spec.add_argument("--model", type=Path, required=True)
    spec.add_argument("--out", type=Path, required=True)
    run = commands.add_parser("build", help="build the engine from a precision graph with those settings")
    run.add_argument("--spec", type=Path, required=True)
    run.add_argument("--onnx", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True)
    options = parser.parse_args()
    return write_spec(options) if options.command == "spec" else build(options)


if __name__ == "__main__":
    sys.exit(main())
