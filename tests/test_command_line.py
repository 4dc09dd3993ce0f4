"""The command line as a user meets it: parallel builds with honest counts and whole lines, Ctrl-C and SIGTERM in
one line, quiet logs, help that documents the build, banners on every build, every check run and listed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (DOIT, REPO, SMALL_ARGS, built_tasks, doit_command, executed_tasks, reused_tasks,
                            run_doit, view_name)

STAGE_LINE = re.compile(r"^\[(checkpoint|export|surgery|precision|engine|validate|pipeline_check|calibration)"
                        r"(?: (text_encoder|transformer|vae_decoder))?\] \S")
OTHER_STAGE = re.compile(r"\[(checkpoint|export|surgery|precision|engine|validate|pipeline_check|calibration)[ \]]")
TASK_LINE = re.compile(r"^(built|reused) [a-z_]+:a10-fp16(/[a-z_]+)? (->|<-) store/[a-z_]+/[0-9a-f]{32}$")
NOISE = ("precision-lose casting", "'colored' module", "[E]", "[W]", "WARNING:", "Traceback", "UserWarning",
         "FutureWarning", "DeprecationWarning")


def test_parallel_build_counts_every_task_and_keeps_lines_whole(built: dict[str, Any]) -> None:
    """The session's cold a10-fp16 build ran with `-n 2` after the variables (conftest)."""
    log = built["log"]
    tasks = executed_tasks(log.stdout)
    assert len(tasks) == 18 and len(built_tasks(log.stderr)) == 17
    assert "summary: 17 built, 0 fetched, 0 reused, 0 up to date; no remote;" in log.stderr
    started = [t for t in tasks if t.startswith("export:")]
    assert len(started) == 3 and tasks.index(started[1]) < tasks.index("surgery:a10-fp16/transformer"), \
        "a second export starts before the first component's chain goes on: two at a time"
    for line in log.stderr.splitlines():
        if line.startswith("["):
            assert STAGE_LINE.match(line) and not OTHER_STAGE.search(line, 1), line
        elif line.startswith(("built ", "reused ")):
            assert TASK_LINE.match(line), line
    exports = [line for line in log.stderr.splitlines() if line.startswith("[export ")]
    assert {line.split("]")[0] for line in exports} == {"[export text_encoder", "[export transformer",
                                                         "[export vae_decoder"}


def test_logs_are_quiet(built: dict[str, Any]) -> None:
    log = built["log"]
    for noise in NOISE:
        assert noise not in log.stderr and noise not in log.stdout, noise
    assert all(line.startswith((".  ", "-- ")) for line in log.stdout.splitlines()), "stdout: doit's task lines only"


def test_every_build_says_it_is_the_tiny_model(built: dict[str, Any]) -> None:
    banner = "*** TINY RANDOM-WEIGHT MODEL: not Qwen-Image; accuracy numbers do not transfer (seed 0) ***"
    assert built["log"].stderr.splitlines()[0] == banner
    noop = run_doit(["build", "recipe=a10-fp16"], built["artifacts"], built["db"])
    assert executed_tasks(noop.stdout) == [] and noop.stderr.splitlines()[0] == banner
    assert "summary: 0 built, 0 fetched, 0 reused, 17 up to date; no remote;" in noop.stderr


def test_every_failed_check_is_run_and_listed_once_at_the_end(built: dict[str, Any]) -> None:
    """Two validations out of tolerance: the third component is still validated, the pipeline check still
    runs, the manifest and junit.xml list both failures, the exit code is 4."""
    tight = ["components.text_encoder.validate.tolerances.hidden_states.max_error=1e-9",
             "components.text_encoder.validate.tolerances.hidden_states.rms_error=1e-9",
             "components.vae_decoder.validate.tolerances.image.max_error=1e-9",
             "components.vae_decoder.validate.tolerances.image.rms_error=1e-9"]
    name = view_name("a10-fp16", overrides=tight)
    result = run_doit(["build", "recipe=a10-fp16", *tight], built["artifacts"], built["db"], check=False)
    assert result.returncode == 4, result.stderr[-2000:]
    assert sorted(built_tasks(result.stderr)) == [f"validate:{name}/text_encoder", f"validate:{name}/vae_decoder"]
    assert f"validate:{name}/transformer" in reused_tasks(result.stderr)
    assert f"pipeline_check:{name}" in executed_tasks(result.stdout)
    tail = result.stderr.strip().splitlines()[-3:]
    assert [line.split(":")[0] for line in tail[:2]] == ["FAILED validate", "FAILED validate"]
    assert "validation of text_encoder failed" in tail[0] and "validation of vae_decoder failed" in tail[1]
    assert tail[2].startswith("summary: 2 built, 0 fetched, 15 reused, 0 up to date")
    manifest = json.loads((built["artifacts"] / name / "manifest.json").read_text())
    passed = {component: entry["validation"]["passed"] for component, entry in manifest["components"].items()}
    assert passed == {"text_encoder": False, "transformer": True, "vae_decoder": False}
    assert manifest["pipeline_check"]["passed"] is True
    junit = ET.parse(built["artifacts"] / name / "junit.xml").getroot()
    failed = sorted(c.get("name") for c in junit.iter("testcase") if c.find("failure") is not None)
    assert failed == ["validate text_encoder", "validate vae_decoder"]


def test_help_and_list_document_variables_and_exit_codes() -> None:
    help_text = subprocess.run([*DOIT, "help", "build"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    for variable in ("recipe=", "model=", "remote=", "remote_required=1", "verify=1", "KEY.PATH=VALUE", "-n N"):
        assert variable in help_text, variable
    codes = {int(code) for code in re.findall(r"^\s+(\d+)\s{2}", help_text, re.MULTILINE)}
    assert codes == {0, 1, 2, 3, 4, 130}
    listed = subprocess.run([*DOIT, "list"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert re.search(r"^build\s+Build, validate and record", listed, re.MULTILINE)
    assert "recipe=NAME" in listed and "exit codes 0" in listed and "doit help build" in listed


def _start(args: list[str], artifacts: Path, db: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    command, full_env = doit_command(args, artifacts, db, env)
    return subprocess.Popen(command, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _stderr_until(process: subprocess.Popen[str], marker: str, timeout: float = 600) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith(marker):
            return lines
    raise AssertionError(f"{marker!r} never came:\n" + "\n".join(lines))


@pytest.mark.parametrize("stop, isolate, to_group", [(signal.SIGINT, "0", True), (signal.SIGTERM, "", False)],
                         ids=["ctrl-c-to-the-process-group-with-child-processes", "sigterm-to-doit"])
def test_a_stopped_build_says_what_it_kept_in_one_line(stop: signal.Signals, isolate: str, to_group: bool,
                                                       tmp_path: Path) -> None:
    artifacts, db = tmp_path / "artifacts", tmp_path / "db"
    env = {"FORGE_ISOLATE_ABOVE_BYTES": isolate} if isolate else {}
    process = _start(SMALL_ARGS, artifacts, db, env)
    early = _stderr_until(process, "[export transformer] tracing")  # the export takes seconds from here
    if to_group:
        os.killpg(process.pid, stop)  # what the terminal does on Ctrl-C: the child processes get it too
    else:
        process.send_signal(stop)
    out, err = process.communicate(timeout=120)
    lines = [*early, *err.splitlines()]
    assert process.returncode == 130, "\n".join(lines)
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    name = view_name(SMALL_ARGS[1].removeprefix("recipe="))
    assert lines[-1] == (f"interrupted ({stop.name}): kept 1 task(s) finished in this run (committed to the store); "
                         f"lost the work of the task(s) still running: export:{name}/transformer (scratch removed); "
                         "rerun to continue")
    assert sum(line.startswith("interrupted") for line in lines) == 1
    assert list((artifacts / "store" / ".tmp").iterdir()) == []
    assert built_tasks("\n".join(lines)) == [f"checkpoint:{name}"]
    again = run_doit(["checkpoint", SMALL_ARGS[1]], artifacts, db)
    assert built_tasks(again.stderr) == [] and f"-- checkpoint:{name}" in again.stdout, "finished work was kept"
