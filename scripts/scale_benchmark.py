"""Scale benchmark: every task of a build in its own process, with wall time, peak RSS and bytes written, each
also as a ratio to the component's checkpoint weight bytes.

Use with a real-width synthetic checkpoint (scripts/synthetic_checkpoint.py --layers N), e.g.
    .venv/bin/python scripts/synthetic_checkpoint.py --out /tmp/ckpt-2 --layers 2 --text-layers 1
    .venv/bin/python scripts/scale_benchmark.py --model /tmp/ckpt-2 --recipe a10-fp16 --stages export,surgery,precision
Bytes written count new disk blocks of the task's store entry: hardlinks to the checkpoint (weights referenced
in place) count zero. The engine row's peak RSS is the builder's (the engine task runs nothing else).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FOLDERS = {"transformer": "transformer", "text_encoder": "text_encoder", "vae_decoder": "vae"}


def peak_rss_kb(lines: list[str]) -> int:
    """The largest of the `PEAK_RSS_KB self children` figures a child process printed (0 if none)."""
    return max((max(int(v) for v in line.split()[1:]) for line in lines if line.startswith("PEAK_RSS_KB")), default=0)


def run_task(task: str, args: list[str], env: dict[str, str], db: Path) -> tuple[float, float, int, str]:
    """(wall s, peak RSS GB, exit code, last line) of one `doit run <task>` in its own process."""
    code = ("import resource, sys; from doit.doit_cmd import DoitMain; rc = DoitMain().run(sys.argv[1:]);"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, "run", "--db-file", str(db), task, *args], cwd=REPO,
                            env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = peak_rss_kb(result.stderr.splitlines())
    last = (result.stderr.strip().splitlines() or [""])[-1] if result.returncode else ""
    return wall, peak / 1e6, result.returncode, last


VALIDATE_DIRECTLY = """
import json, os, resource, sys, tempfile
from pathlib import Path
from stages import log
from stages.inputs import Ref, StageInputs
from stages.recipe.load import load_recipe
from stages.validate import from_recipe
log.configure()
artifacts, recipe, model, component, overrides = sys.argv[1:6]
loaded = load_recipe(recipe, dict(o.split("=", 1) for o in json.loads(overrides)), model=model)
view = Path(artifacts) / loaded.name / component
scratch = Path(tempfile.mkdtemp(dir=artifacts, prefix="validate-"))
(scratch / "engine").mkdir()
inputs = StageInputs(Path(model), {Ref("precision", component): (view / "precision").resolve(),
                                   Ref("engine", component): scratch / "engine"}, Path(artifacts))
(scratch / "out").mkdir()
stage = from_recipe(loaded, component, inputs)
factor = float(sys.argv[6])
if factor != 1:
    import dataclasses
    import onnx
    from onnx import numpy_helper
    from stages.graphs.blockwise import link_external_data
    graph = onnx.load(str(stage.onnx_path), load_external_data=False)
    inits = {i.name: i for i in graph.graph.initializer}
    scales = [inits[n.input[1]] for n in graph.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    for scale in scales:
        scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale, str(stage.onnx_path.parent)) * factor,
                                               scale.name))
    (scratch / "broken").mkdir()
    link_external_data(graph, stage.onnx_path.parent, scratch / "broken")
    onnx.save_model(graph, str(scratch / "broken" / "model.onnx"))
    print(f"[validate] {len(scales)} weight scales x{factor:g}", file=sys.stderr)
    stage = dataclasses.replace(stage, onnx_path=scratch / "broken" / "model.onnx", part_contracts=())
report = stage(scratch / "out")
print("REPORT", json.dumps(report), file=sys.stderr)
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
      file=sys.stderr)
sys.exit(0 if report["passed"] else 1)
"""


def validate_directly(artifacts: Path, recipe: str, model: Path, component: str, overrides: list[str],
                      env: dict[str, str], scale_factor: float = 1.0) -> tuple[float, float, int, str, dict]:
    """The validate stage's own callable, without its engine task: the engine of a release-size component
    needs ~150 GB of builder RAM, so it is measured elsewhere (scripts/engine_build_benchmark.py). A
    `scale_factor` other than 1 validates a deliberately broken copy of a quantized graph instead: every weight
    scale multiplied by it (the gate must fail it)."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", VALIDATE_DIRECTLY, str(artifacts), recipe, str(model), component,
                             json.dumps(overrides), str(scale_factor)], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    lines = result.stderr.splitlines()
    peak = peak_rss_kb(lines)
    report = next((json.loads(line[7:]) for line in lines if line.startswith("REPORT ")), {})
    for line in lines:
        if line.startswith("[validate"):
            print("   ", line)
    last = (lines or [""])[-1] if result.returncode else ""
    return wall, peak / 1e6, result.returncode, last, report


def new_bytes(folder: Path) -> int:
    """Disk bytes the entry added: files hardlinked from elsewhere (the checkpoint's shards) count zero."""
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            stat = path.stat()
            total += 0 if stat.st_nlink > 1 else stat.st_blocks * 512
    return total


def hash_checkpoint(model: Path, artifacts: Path) -> dict[str, object]:
    """The sha256 of every checkpoint file, once (a build remembers them by path, size, mtime and inode): timed
    on its own so that the first task's row is the task alone."""
    from stages.store.digests import FileDigests

    files = [str(p.relative_to(model)) for p in sorted(model.rglob("*")) if p.is_file()]
    total = sum((model / f).stat().st_size for f in files)
    started = time.perf_counter()
    digests = FileDigests(artifacts / "cache" / "file-digests.json")
    digests.of(model, files)
    digests.save()
    wall = time.perf_counter() - started
    print(f"{'sha256 of checkpoint':<28}{wall:>8.1f}{'':>9}{'':>10}{0:>11.3f}{0:>10.3f}  ({total / 1e9:.1f} GB)")
    return {"task": "sha256 of the checkpoint (once)", "wall_s": round(wall, 2), "bytes": total, "ok": True}


def weight_bytes(model: Path, component: str) -> int:
    return sum(p.stat().st_size for p in (model / FOLDERS[component]).glob("*.safetensors"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="checkpoint directory")
    parser.add_argument("--recipe", default="a10-fp16")
    parser.add_argument("--stages", default="export,surgery,precision,engine,validate")
    parser.add_argument("--components", default="transformer,text_encoder,vae_decoder")
    parser.add_argument("--validate-without-engine", action="store_true",
                        help="run the validate stage's callable directly, without building the engine first")
    parser.add_argument("--break-weight-scales", type=float, default=1.0, metavar="FACTOR",
                        help="with --validate-without-engine on a quantized plan: validate a copy of the graph with "
                             "every weight scale multiplied by FACTOR (a gate must fail it)")
    parser.add_argument("--drop-engines", action="store_true",
                        help="delete each engine part's store entry once measured (a full release transformer's "
                             "parts do not fit beside its checkpoint on a small disk); later stages then cannot run")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="reuse this folder's artifacts (tasks already up to date are not rerun; default: a new one)")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides")
    options = parser.parse_args()
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="forge-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "FORGE_ARTIFACTS": str(workdir / "artifacts")}
    args = [f"recipe={options.recipe}", f"model={options.model}", *options.overrides]
    from stages.recipe.load import load_recipe

    loaded = load_recipe(options.recipe, dict(o.split("=", 1) for o in options.overrides), model=str(options.model))
    name = loaded.name
    components = [c.strip() for c in options.components.split(",") if c.strip()]
    print(f"{options.recipe} on {options.model}; artifacts in {workdir}; {os.cpu_count()} CPUs")
    print(f"{'task':<28}{'wall s':>8}{'peak GB':>9}{'x weights':>10}{'written GB':>11}{'x weights':>10}")
    rows = [hash_checkpoint(options.model, workdir / "artifacts")]
    for component in components:
        weights = weight_bytes(options.model, component)
        stages = [s.strip() for s in options.stages.split(",") if s.strip()]
        count = loaded.part_count(component)
        tasks = [(s, f"{s}:{name}/{component}/part{p}", f"{s}-part{p}") for s in stages for p in range(count)
                 if s == "engine" and count > 1] if "engine" in stages and count > 1 else []
        planned = [(s, f"{s}:{name}/{component}", s) for s in stages]
        if tasks:
            at = stages.index("engine")
            planned = [*planned[:at], *tasks, *planned[at + 1:]]
        for stage, task, folder in planned:
            report: dict = {}
            if stage == "validate" and options.validate_without_engine:
                wall, peak, code, last, report = validate_directly(workdir / "artifacts", options.recipe, options.model,
                                                                   component, options.overrides, env,
                                                                   options.break_weight_scales)
                written = 0
                if report:  # it ran: a result outside the tolerances is a finding, not a reason to stop
                    code, last = 0, "" if report["passed"] else f"outside tolerance: {report['failure']}"
            else:
                wall, peak, code, last = run_task(task, args, env, workdir / "doit.db")
                entry = (workdir / "artifacts" / name / component / folder).resolve()
                written = new_bytes(entry) if code == 0 and entry.is_dir() else 0
                if options.drop_engines and stage == "engine" and entry.is_dir():
                    shutil.rmtree(entry)
                    last = last or "(store entry dropped after measuring)"
            row = {"task": task, "wall_s": round(wall, 2), "peak_rss_gb": round(peak, 3),
                   "peak_over_weights": round(peak * 1e9 / weights, 3), "written_gb": round(written / 1e9, 4),
                   "written_over_weights": round(written / weights, 4), "weights_gb": round(weights / 1e9, 3),
                   "ok": code == 0}
            if report:
                row["validation"] = {key: report.get(key) for key in ("passed", "cases", "comparisons", "blocks")}
            rows.append(row)
            print(f"{folder + '/' + component:<28}{wall:>8.1f}{peak:>9.2f}{row['peak_over_weights']:>10.2f}"
                  f"{written / 1e9:>11.3f}{row['written_over_weights']:>10.3f}" + ("" if code == 0 else "  FAILED")
                  + (f"  {last}" if last else ""))
            if code != 0:
                break
    (workdir / "scale_benchmark.json").write_text(json.dumps(rows, indent=2))
    print(f"rows in {workdir / 'scale_benchmark.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
