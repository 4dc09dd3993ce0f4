"""Shared fixtures: one real tiny build of a10-fp16 per test session, reused by the stage tests."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DOIT = [sys.executable, "-m", "doit"]
DOIT_COMMANDS = ("run", "clean", "list", "forget", "info")


def doit_command(args: list[str], artifacts: Path, db: Path,
                 env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    full_env = {**os.environ, "FORGE_ARTIFACTS": str(artifacts), **(env or {})}
    command, rest = (args[0], args[1:]) if args[0] in DOIT_COMMANDS else ("run", args)
    return [*DOIT, command, "--db-file", str(db), *rest], full_env


def run_doit(args: list[str], artifacts: Path, db: Path, env: dict[str, str] | None = None,
             check: bool = True, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Run doit as a user would, with outputs redirected into a test's own artifacts dir."""
    command, full_env = doit_command(args, artifacts, db, env)
    result = subprocess.run(command, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"doit {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def executed_tasks(output: str) -> list[str]:
    """doit prints `.  task` for tasks it runs and `-- task` for up-to-date ones."""
    return [line[3:].strip() for line in output.splitlines() if line.startswith(".  ")]


def modules_loaded_by_doit(args: list[str], modules: tuple[str, ...],
                           env: dict[str, str] | None = None) -> tuple[list[str], str]:
    """Which of `modules` a `doit <args>` run (in a fresh interpreter) imported, and what it printed."""
    code = ("import json, sys; from doit.doit_cmd import DoitMain; DoitMain().run(sys.argv[2:]);"
            "print('LOADED', json.dumps([m for m in json.loads(sys.argv[1]) if m in sys.modules]))")
    import json

    result = subprocess.run([sys.executable, "-c", code, json.dumps(modules), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=120, env={**os.environ, **(env or {})})
    loaded = next((json.loads(line[7:]) for line in result.stdout.splitlines() if line.startswith("LOADED ")), None)
    assert loaded is not None, result.stdout + result.stderr
    return loaded, result.stdout


def built_tasks(stderr: str) -> list[str]:
    """Tasks whose store entry this run computed (`built stage:task -> store/...`), not reused."""
    return [line.split()[1] for line in stderr.splitlines() if line.startswith("built ")]


def reused_tasks(stderr: str) -> list[str]:
    return [line.split()[1] for line in stderr.splitlines() if line.startswith("reused ")]


def view_name(recipe: str, model: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """The folder under artifacts/ (and task-name prefix) of a build, as the forge names it; `overrides` are
    command-line `key=value` arguments (an overridden build has a view of its own)."""
    from stages.recipe.load import load_recipe

    parsed = dict(argument.split("=", 1) for argument in overrides)
    return load_recipe(recipe, overrides=parsed, model=model).name


def artifact_digests(manifest: dict) -> dict[str, str]:
    """{view-relative path: sha256} of every output the manifest lists."""
    found = {entry["path"]: entry["sha256"] for entry in manifest["model"].get("checkpoint") or []}
    for component in manifest["components"].values():
        for outputs in component["artifacts"].values():
            found.update({entry["path"]: entry["sha256"] for entry in outputs or []})
    found.update({entry["path"]: entry["sha256"] for entry in (manifest.get("pipeline_check") or {}).get("artifacts", [])})
    return found


WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1 under `pytest -n 2` (./forge test); "" alone

# The longest files first, so that neither worker is left with one at the end (`./forge test` passes
# --no-loadscope-reorder: xdist keeps this order and hands each worker the next file as it finishes one). The
# first file needs the session build (`built`, both cores); the second does not, so the other worker works
# meanwhile. Measured wall seconds per file on the 2-core machine; files not listed follow in their own order.
LONGEST_FIRST = ("test_recipes.py", "test_weights.py", "test_crash.py", "test_pipeline_check.py", "test_remote.py",
                 "test_dodo.py", "test_code_change.py", "test_views.py", "test_lora.py", "test_parts.py", "test_command_line.py",
                 "test_isolation.py", "test_quantize.py", "test_audit.py")  # 333 s ... 28 s (2026-12-02)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: position for position, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


@pytest.fixture(scope="session")
def shared_artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One artifacts root for the session's read-only builds: their store entries are shared, as on a user's
    machine (tests that damage or clean use roots of their own). Under pytest-xdist every worker of the session
    uses the same root (the store's per-entry locks make concurrent builds safe), each with its own doit
    database (doit's is only a cache)."""
    root = tmp_path_factory.getbasetemp().parent / "shared" if WORKER else tmp_path_factory.mktemp("shared")
    root.mkdir(exist_ok=True)
    return {"artifacts": root / "artifacts", "db": root / f"doit{'-' + WORKER if WORKER else ''}.db", "root": root}


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def once_per_session(root: Path, name: str, make: Callable[[], subprocess.CompletedProcess[str]]
                     ) -> subprocess.CompletedProcess[str]:
    """Run `make` once for all workers of the session; the others wait and get the same result (its log)."""
    saved = root / f"{name}.result.json"
    with _exclusive(root / f"{name}.lock"):
        if saved.exists():
            data = json.loads(saved.read_text())
            return subprocess.CompletedProcess(data["args"], data["returncode"], data["stdout"], data["stderr"])
        result = make()
        saved.write_text(json.dumps({"args": [str(a) for a in result.args], "returncode": result.returncode,
                                     "stdout": result.stdout, "stderr": result.stderr}))
        return result


@pytest.fixture(scope="session")
def built(shared_artifacts: dict[str, Path]) -> dict[str, Any]:
    """The session's a10-fp16 build, cold, two tasks at a time as a user would (`-n 2` after the variables);
    tests/test_command_line.py reads its log."""
    artifacts, db = shared_artifacts["artifacts"], shared_artifacts["db"]
    result = once_per_session(shared_artifacts["root"], "a10-fp16",
                              lambda: run_doit(["build", "recipe=a10-fp16", "-n", "2"], artifacts, db))
    return {"artifacts": artifacts, "db": db, "recipe": artifacts / "a10-fp16", "log": result}


@pytest.fixture(scope="session")
def built_int8(built: dict[str, Any], shared_artifacts: dict[str, Path]) -> tuple[dict, list[str], str]:
    """a10-int8 as shipped, after a10-fp16 and into the same store, once per session (test_recipes reads its
    log: what it shares with a10-fp16 is reused; test_audit audits it beside a10-fp16). Returns (manifest,
    executed tasks, stderr)."""
    artifacts, db = built["artifacts"], built["db"]
    result = once_per_session(shared_artifacts["root"], "a10-int8",
                              lambda: run_doit(["build", "recipe=a10-int8", "-n", "2"], artifacts, db))
    manifest = json.loads((artifacts / "a10-int8" / "manifest.json").read_text())
    return manifest, executed_tasks(result.stdout), result.stderr


@pytest.fixture(scope="session")
def light_builds(built: dict[str, Path]) -> Callable[[str], tuple[dict, list[str], str]]:
    """`light_builds(recipe)`: a quantized recipe built with test_recipes' LIGHT settings into the session's shared
    store, once per session on first request (test_recipes asserts on that first build's log). Returns (manifest,
    executed tasks, stderr) of that build."""
    from tests.test_recipes import build

    shared = {"artifacts": built["artifacts"], "db": built["db"]}
    done: dict[str, tuple[dict, list[str], str]] = {}

    def get(recipe: str) -> tuple[dict, list[str], str]:
        if recipe not in done:
            done[recipe] = build(shared, recipe)
        return done[recipe]

    return get


SMALL_RECIPE = REPO / "tests" / "recipes" / "transformer-only.yaml"
SMALL_ARGS = ["build", f"recipe={SMALL_RECIPE}"]


SHARED_WITH_SMALL = ("checkpoint", "transformer/export")  # its transformer has no LoRA inputs: its own surgery on


def copy_entries(view: Path, labels: tuple[str, ...], artifacts: Path) -> None:
    """Copy (never link: tests damage them) the store entries a view links to into another artifacts root, keeping
    the hard links between them (weights referenced in place) as hard links."""
    copied: dict[int, Path] = {}
    for label in labels:
        entry = (view / label).resolve()
        target = artifacts / "store" / entry.parent.name / entry.name
        for source in sorted(entry.rglob("*")):
            destination = target / source.relative_to(entry)
            destination.parent.mkdir(parents=True, exist_ok=True)
            if source.is_dir():
                destination.mkdir(exist_ok=True)
            elif source.stat().st_ino in copied:
                os.link(copied[source.stat().st_ino], destination)
            else:
                shutil.copy2(source, destination)
                copied[source.stat().st_ino] = destination


@pytest.fixture(scope="session")
def small(built: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A transformer-only build in a root of its own, for tests that damage, edit or clean (they leave it built).
    Its root starts with copies of the session build's entries it shares (same keys: checkpoint, the transformer's
    export); its transformer has no LoRA inputs, so its surgery, precision, engine and validation are its own."""
    root = tmp_path_factory.mktemp("small")
    artifacts, db = root / "artifacts", root / "doit.db"
    copy_entries(built["recipe"], SHARED_WITH_SMALL, artifacts)
    result = run_doit(SMALL_ARGS, artifacts, db)
    assert {task.split(":")[0] for task in built_tasks(result.stderr)} == {"surgery", "precision", "engine", "validate"}, \
        result.stderr[-2000:]
    name = view_name(str(SMALL_RECIPE))
    return {"artifacts": artifacts, "db": db, "args": SMALL_ARGS, "name": name, "view": artifacts / name}


def forget_symbolic_dims(model: Any, names: list[str]) -> None:
    """Declared symbolic dims of these tensors renamed `unk__N`, as a pass that re-infers shapes leaves them."""
    for value in model.graph.value_info:
        if value.name in names:
            for number, dim in enumerate(value.type.tensor_type.shape.dim):
                if dim.dim_param:
                    dim.dim_param = f"unk__{number}"


def verify_manifest(view: Path) -> dict:
    """Every digest the manifest lists matches the file in the view, recomputed here."""
    import hashlib
    import json

    manifest = json.loads((view / "manifest.json").read_text())
    for path, sha in artifact_digests(manifest).items():
        assert hashlib.sha256((view / path).read_bytes()).hexdigest() == sha, path
    return manifest


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny pipeline (seed 0) saved by the checkpoint stage itself: same weights as every tiny build."""
    from stages.checkpoint import SaveTinyCheckpoint

    out = tmp_path_factory.mktemp("checkpoint")
    SaveTinyCheckpoint(seed=0)(out)
    return out


@pytest.fixture(scope="session")
def exported_onnx(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from stages.export import ExportOnnx

    out = tmp_path_factory.mktemp("export")
    ExportOnnx("transformer", tiny_checkpoint, 256, 20)(out)
    return out / "model.onnx"


@pytest.fixture(scope="session")
def surgery_output(exported_onnx: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The recipe's surgery passes applied by the stage class itself, into a private dir."""
    from stages.surgery import GraphSurgery

    out = tmp_path_factory.mktemp("surgery")
    passes = ("fold_constants", "infer_shapes", "fix_text_padding", "freeze_text_branch", "cleanup")
    report = GraphSurgery("transformer", exported_onnx, passes, 256)(out)
    return out / "model.onnx", report


@pytest.fixture(scope="session")
def fp16_output(surgery_output: tuple[Path, dict], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    from stages.precision import ConvertPrecision

    out = tmp_path_factory.mktemp("precision")
    source, surgery = surgery_output
    report = ConvertPrecision("transformer", source, "fp16", "fp32", tuple(surgery["frozen_nodes"]), ())(out)
    return out / "model.onnx", report
