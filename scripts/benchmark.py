"""Measure a cold build stage by stage (wall time, peak RSS), then the no-op rebuild.

Each stage runs as its own `doit` process, in pipeline order, into a fresh artifacts dir, so its peak
memory is its own. Usage: .venv/bin/python scripts/benchmark.py --recipe a10-fp16 [key.path=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE_ORDER = ["checkpoint", "calibration", "export", "surgery", "precision", "engine", "validate",
               "pipeline_check", "manifest"]


def run_doit_measured(args: list[str], env: dict[str, str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MiB, exit code) of one doit process."""
    # DoitMain() loads dodo.py itself after parsing `recipe=` and the overrides, as the doit command does.
    code = ("import resource, sys; from doit.doit_cmd import DoitMain; rc = DoitMain().run(sys.argv[1:]);"
            "print('PEAK_RSS_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)")
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    peak = next((int(line.split()[1]) for line in result.stderr.splitlines() if line.startswith("PEAK_RSS_KB")), 0)
    if result.returncode != 0:
        print(result.stdout[-2000:], result.stderr[-2000:], file=sys.stderr)
    return wall, peak / 1024, result.returncode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--recipe", default="a10-fp16")
    parser.add_argument("--repeats", type=int, default=5, help="no-op rebuild repetitions")
    parser.add_argument("overrides", nargs="*", help="key.path=value recipe overrides, model=...")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="forge-bench-"))
    env = {**os.environ, "FORGE_ARTIFACTS": str(workdir / "artifacts")}
    common = ["--db-file", str(workdir / "doit.db"), f"recipe={options.recipe}", *options.overrides]
    print(f"recipe {options.recipe}; artifacts in {workdir}; {os.cpu_count()} CPUs")
    print(f"{'stage':<12}{'wall s':>9}{'peak RSS MiB':>15}")
    total = 0.0
    for stage in STAGE_ORDER:
        wall, peak, code = run_doit_measured(["run", *common[:2], stage, *common[2:]], env)
        total += wall
        print(f"{stage:<12}{wall:>9.2f}{peak:>15.0f}{'' if code == 0 else '  FAILED'}")
        if code != 0 and stage != "validate":
            return code
    print(f"{'cold total':<12}{total:>9.2f}")
    noop = []
    for _ in range(options.repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "doit", *common[:2], "build", *common[2:]], cwd=REPO, env=env,
                       capture_output=True, check=True)
        noop.append(time.perf_counter() - started)
    # The stages above ran one by one, so the first `doit build` plans in full (and records the no-op snapshot);
    # the others are answered from the snapshot (stages/plan/noop.py).
    first, rest = noop[0], noop[1:] or noop
    print(f"first `doit build` after the stage-by-stage build (full path, records the snapshot): {first:.3f} s")
    print(f"no-op rebuild (`doit build`, whole process): median {statistics.median(rest):.3f} s, "
          f"min {min(rest):.3f} s, max {max(rest):.3f} s over {len(rest)} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
