"""Cold build of the four TensorRT-RTX recipes in one checkout, the no-op rebuild, and the cost of verify=1.

Every recipe is built in turn into one fresh artifacts dir (as a user building the whole matrix on one
machine would), so work one recipe shares with another is counted once. Prints, per recipe, the wall time,
the tasks doit executed and, where the forge reports it, how many were computed vs reused from the store.
Usage: .venv/bin/python scripts/store_benchmark.py [--repo DIR] [key.path=value ...]
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

RECIPES = ("a10-fp16", "a10-int8", "l40s-fp8", "rtx5090-fp8")


def doit(repo: Path, env: dict[str, str], db: Path, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "doit", "--db-file", str(db), *args], cwd=repo, env=env,
                            capture_output=True, text=True)
    return time.perf_counter() - started, result


def count(output: str, prefix: str) -> int:
    return sum(1 for line in output.splitlines() if line.startswith(prefix))


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("overrides", nargs="*")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="forge-store-bench-"))
    artifacts, db = workdir / "artifacts", workdir / "doit.db"
    env = {**os.environ, "FORGE_ARTIFACTS": str(artifacts)}
    print(f"repo {options.repo}; artifacts in {artifacts}; {os.cpu_count()} CPUs")
    print(f"{'recipe':<14}{'wall s':>9}{'executed':>10}{'computed':>10}{'reused':>8}")
    total_wall, total_executed = 0.0, 0
    for recipe in RECIPES:
        wall, result = doit(options.repo, env, db, "build", f"recipe={recipe}", *options.overrides)
        output = result.stdout + result.stderr
        executed = count(result.stdout, ".  ")
        total_wall, total_executed = total_wall + wall, total_executed + executed
        computed, reused = count(result.stderr, "built "), count(result.stderr, "reused ")
        flag = "" if result.returncode == 0 else f"  FAILED rc={result.returncode}: {output.strip().splitlines()[-1]}"
        print(f"{recipe:<14}{wall:>9.1f}{executed:>10}{computed:>10}{reused:>8}{flag}")
    print(f"{'total':<14}{total_wall:>9.1f}{total_executed:>10}")
    print(f"artifacts on disk: {tree_bytes(artifacts) / 1e6:.1f} MB")
    noop = [doit(options.repo, env, db, "build", "recipe=a10-fp16", *options.overrides)[0]
            for _ in range(options.repeats)]
    print(f"no-op rebuild of a10-fp16 (whole `doit build` process): median {statistics.median(noop):.3f} s, "
          f"min {min(noop):.3f} s over {len(noop)} runs")
    wall, result = doit(options.repo, env, db, "build", "recipe=a10-fp16", "verify=1", *options.overrides)
    store = artifacts / "store"
    if result.returncode == 0 and store.is_dir():
        verified = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
        print(f"verify=1 rebuild of a10-fp16: {wall:.2f} s over a {verified / 1e9:.3f} GB store "
              f"(whole store listed; the recipe's entries are rehashed)")
    else:
        print("verify=1: not supported by this checkout")
    return 0


if __name__ == "__main__":
    sys.exit(main())
