"""Tasks in processes of their own (the large-model path) write exactly what in-process tasks write."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import SMALL_ARGS, built_tasks, run_doit


def test_isolated_tasks_match_in_process_ones(small: dict, tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "doit.db"
    result = run_doit(["surgery", SMALL_ARGS[1]], artifacts, db,
                      env={"FORGE_ISOLATE_ABOVE_BYTES": "0", "FORGE_LOG": "debug"})
    assert {t.split(":")[0] for t in built_tasks(result.stderr)} == {"checkpoint", "export", "surgery"}
    assert result.stderr.count("own process, peak RSS") == 3
    mine = json.loads((artifacts / small["name"] / "transformer" / "surgery" / "record.json").read_text())
    reference = json.loads((small["view"] / "transformer" / "surgery" / "record.json").read_text())
    assert mine["key"] == reference["key"] and mine["outputs"] == reference["outputs"]
