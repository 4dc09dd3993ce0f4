"""Views over one store: concurrent builds compute each entry once; clean and gc delete only what nobody uses."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from stages.store.local import Store
from tests.conftest import REPO, SMALL_RECIPE, built_tasks, doit_command, executed_tasks, run_doit, view_name


def freed(output: str) -> float:
    return float(re.search(r"([0-9.]+) MB freed", output).group(1))


def test_concurrent_builds_share_entries_and_clean_keeps_what_others_use(tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    sentinel = tmp_path / "keep-me.txt"
    sentinel.write_text("outside artifacts/")
    twin = tmp_path / "transformer-twin.yaml"
    twin.write_text(f"extends: {SMALL_RECIPE}\n")
    runs = []
    for recipe in (str(SMALL_RECIPE), str(SMALL_RECIPE), str(twin)):
        args = ["build", f"recipe={recipe}"]
        command, env = doit_command(args, artifacts, db)
        runs.append(subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True))
    outputs = [run.communicate(timeout=900) for run in runs]
    assert [run.returncode for run in runs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    per_stage = Counter(task.split(":")[0] for _, err in outputs for task in built_tasks(err))
    assert per_stage == {s: 1 for s in ("checkpoint", "export", "surgery", "precision", "engine", "validate")}
    small, other = view_name(str(SMALL_RECIPE)), view_name(str(twin))
    manifests = {name: json.loads((artifacts / name / "manifest.json").read_text()) for name in (small, other)}
    assert manifests[small]["store"] == manifests[other]["store"]
    assert not list((artifacts / "store" / ".tmp").iterdir())

    tuned = ["components.transformer.validate.tolerances.sample.cosine=0.99"]
    retuned = run_doit(["build", f"recipe={SMALL_RECIPE}", *tuned], artifacts, db)
    overridden = view_name(str(SMALL_RECIPE), overrides=tuned)
    assert overridden not in (small, other) and f"1 override: {tuned[0]} -> view {overridden}" in retuned.stderr
    assert built_tasks(retuned.stderr) == [f"validate:{overridden}/transformer"]
    own = json.loads((artifacts / small / "manifest.json").read_text())
    assert own == manifests[small], "an override never changes the recipe's own view"
    assert json.loads((artifacts / overridden / "manifest.json").read_text())["recipe"]["overrides"] == {
        "components.transformer.validate.tolerances.sample.cosine": 0.99}
    assert freed(run_doit(["gc"], artifacts, db).stderr) == 0, "every entry is in some view"

    cleaned = run_doit(["clean", f"recipe={twin}"], artifacts, db)
    assert cleaned.stdout.splitlines() == [f"clean {other}: removed its view and 0 store entries no other recipe uses "
                                           "(0.0 MB freed)"], "one line: the twin's entries are all the recipe's too"
    assert not (artifacts / other).exists() and (artifacts / small / "manifest.json").is_file()
    store = Store(artifacts)
    for entry in json.loads((artifacts / small / "manifest.json").read_text())["store"].values():
        stage, key = Path(entry).parts[1:]
        assert store.lookup(stage, key, deep=True) is not None, f"clean deleted {entry}, still used by {small}"
    assert executed_tasks(run_doit(["build", f"recipe={SMALL_RECIPE}", *tuned], artifacts, db).stdout) == []

    cleaned = run_doit(["clean", f"recipe={SMALL_RECIPE}", *tuned], artifacts, db)
    assert "removed its view and 1 store entries" in cleaned.stdout and freed(cleaned.stdout) > 0
    assert not (artifacts / overridden).exists() and (artifacts / small / "manifest.json").is_file()
    cleaned = run_doit(["clean", f"recipe={SMALL_RECIPE}"], artifacts, db)
    assert "removed its view and 6 store entries" in cleaned.stdout
    assert list(store.entries()) == [] and not (artifacts / small).exists()
    assert sentinel.read_text() == "outside artifacts/" and SMALL_RECIPE.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifacts", "doit.db", "keep-me.txt", "transformer-twin.yaml"]


def test_gc_removes_unreferenced_entries_and_says_how_much(small: dict, tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    shutil.copytree(small["artifacts"], artifacts, symlinks=True)
    old_engine = (artifacts / small["name"] / "transformer" / "engine").resolve()
    level = ["components.transformer.build.optimization_level=2"]
    run_doit([*small["args"], *level], artifacts, db)
    tuned = artifacts / view_name(str(SMALL_RECIPE), overrides=level)
    new_engine = (tuned / "transformer" / "engine").resolve()
    shutil.rmtree(tuned)  # a view deleted by hand: what only it referenced is garbage now
    entries = {f"store/{stage}/{key}" for stage, key, _ in Store(artifacts).entries()}
    referenced = {path for manifest in artifacts.glob("*/manifest.json")
                  for path in json.loads(manifest.read_text())["store"].values()}
    assert f"store/engine/{new_engine.name}" in entries - referenced
    result = run_doit(["gc"], artifacts, db)
    assert f"removed {len(entries - referenced)} unreferenced store entries" in result.stderr and freed(result.stderr) > 0
    assert {f"store/{stage}/{key}" for stage, key, _ in Store(artifacts).entries()} == referenced
    assert not new_engine.exists() and old_engine.exists()
    rebuilt = run_doit([*small["args"], *level], artifacts, db)
    same_engine = (tuned / "transformer" / "engine" / "engine.plan").read_bytes() == (old_engine / "engine.plan").read_bytes()
    assert [task.split(":")[0] for task in built_tasks(rebuilt.stderr)] == ["engine", *([] if same_engine else ["validate"])]
