"""Cold build vs remote-hit build: what a second CI runner saves by sharing a remote store.

For each group of recipes (a10-fp16 alone, then the four TensorRT-RTX recipes into one store), runner A builds
cold into a fresh artifacts root and publishes to a fresh prefix of a real S3 server (SeaweedFS `weed mini`,
started here unless --remote names one); runner B, another fresh root, builds the same recipes from that remote.
Prints wall times, their ratio, tasks built/fetched and bytes moved. `--determinism` adds a second cold build
without a remote (runner C) and compares its store with A's entry by entry: which outputs are not bit-identical.

    .venv/bin/python scripts/remote_benchmark.py [--groups a10 rtx] [--determinism] [--keep DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.s3server import BUCKET, S3Server  # noqa: E402

GROUPS = {"a10": ["a10-fp16"], "rtx": ["a10-fp16", "a10-int8", "l40s-fp8", "rtx5090-fp8"]}
SUMMARY = re.compile(r"^summary: (\d+) built, (\d+) fetched, (\d+) reused, (\d+) up to date(?:; (\d+) published; "
                     r"([\d.]+ [KMG]?B) down.*?, ([\d.]+ [KMG]?B) up)?")
UNITS = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9}


def parse_bytes(text: str | None) -> float:
    if not text:
        return 0.0
    value, unit = text.split()
    return float(value) * UNITS[unit]


def run_recipes(recipes: list[str], root: Path, env: dict[str, str]) -> dict[str, float]:
    """Build each recipe in turn into `root`; wall time and the summary lines' counts, summed."""
    totals = {"seconds": 0.0, "built": 0, "fetched": 0, "published": 0, "down": 0.0, "up": 0.0}
    root.mkdir(parents=True, exist_ok=True)
    for recipe in recipes:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "doit", "run", "--db-file", str(root / "doit.db"), "build",
                                 f"recipe={recipe}"], cwd=REPO, capture_output=True, text=True,
                                env={**os.environ, "FORGE_ARTIFACTS": str(root / "artifacts"), **env})
        totals["seconds"] += time.perf_counter() - started
        if result.returncode != 0:
            raise SystemExit(f"{recipe} failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
        match = next(m for line in result.stderr.splitlines() if (m := SUMMARY.match(line)))
        totals["built"] += int(match.group(1))
        totals["fetched"] += int(match.group(2))
        totals["published"] += int(match.group(5) or 0)
        totals["down"] += parse_bytes(match.group(6))
        totals["up"] += parse_bytes(match.group(7))
    return totals


def store_files(root: Path) -> dict[str, str]:
    """{store/<stage>/<key>/<file>: sha256} of every entry file (records included, local caches not)."""
    found = {}
    for path in sorted((root / "artifacts" / "store").glob("*/*/**/*")):
        if path.is_file() and not path.name.startswith("."):
            found[str(path.relative_to(root / "artifacts"))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def determinism(cold: Path, again: Path) -> dict[str, object]:
    """Entries present in both cold stores (same key = same inputs) whose files differ."""
    mine, theirs = store_files(cold), store_files(again)
    shared = sorted(set(mine) & set(theirs))
    differ = [path for path in shared if mine[path] != theirs[path]]
    keys_only_one = sorted({"/".join(p.split("/")[:3]) for p in set(mine) ^ set(theirs)})
    return {"files_compared": len(shared), "files_differing": differ, "entries_in_one_store_only": keys_only_one}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--groups", nargs="+", default=list(GROUPS), choices=list(GROUPS))
    parser.add_argument("--remote", help="an existing remote URL (default: start SeaweedFS here)")
    parser.add_argument("--determinism", action="store_true", help="also compare two cold builds without a remote")
    parser.add_argument("--keep", type=Path, help="work directory to keep (default: a temporary one, removed)")
    args = parser.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="forge-remote-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    server = None
    if args.remote:
        base, env = args.remote.rstrip("/"), {}
    else:
        server = S3Server(work / "s3").start()
        base, env = f"s3://{BUCKET}", server.env
    report = {}
    try:
        for group in args.groups:
            recipes = GROUPS[group]
            remote = {**env, "FORGE_REMOTE": f"{base}/bench-{group}-{int(time.time())}"}
            cold = run_recipes(recipes, work / group / "cold", remote)
            hit = run_recipes(recipes, work / group / "hit", remote)
            row = {"recipes": recipes, "cold": cold, "remote_hit": hit,
                   "speedup": round(cold["seconds"] / max(hit["seconds"], 1e-9), 1)}
            if args.determinism:
                run_recipes(recipes, work / group / "cold-again", {"FORGE_REMOTE": ""})
                row["determinism"] = determinism(work / group / "cold", work / group / "cold-again")
            report[group] = row
            print(f"{group} ({', '.join(recipes)}): cold {cold['seconds']:.1f} s ({cold['built']} tasks built, "
                  f"{cold['published']} published, {cold['up'] / 1e6:.1f} MB up); remote hit {hit['seconds']:.1f} s "
                  f"({hit['built']} built, {hit['fetched']} fetched, {hit['down'] / 1e6:.1f} MB down); "
                  f"cold/hit {row['speedup']}x", flush=True)
            if args.determinism:
                d = row["determinism"]
                print(f"  two cold builds: {d['files_compared']} files compared, {len(d['files_differing'])} differ: "
                      f"{d['files_differing']}; entries in one store only: {d['entries_in_one_store_only']}", flush=True)
    finally:
        if server is not None:
            server.stop()
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
