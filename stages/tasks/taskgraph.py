"""Recipe -> doit task dicts. Light on purpose: building the graph imports no torch and touches no artifact.

doit orders the work and prints it; whether a task is up to date is decided by the store (its uptodate
callable asks for a verified entry of the task's current key), so doit's database is only a cache.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.paths import artifacts_root
from stages.plan import registry
from stages.plan.resolve import Build
from stages.recipe.load import build_overrides, load_recipe
from stages.recipe.schema import TINY_WARNING, LoadedRecipe
from stages.runtime.request import VARIABLES as GENERATE_VARS
from stages.runtime.request import GenerateRequest, parse_request
from stages.store import remote
from stages.tasks import actions

DEFAULT_RECIPE = "a10-fp16"
RESERVED_VARS = ("recipe", "model", "verify", "recipes", remote.VAR_URL, remote.VAR_REQUIRED, *GENERATE_VARS)


def command_line_vars() -> dict[str, str]:
    """All `key=value` arguments doit parsed; doit only exposes them one by one through get_var."""
    from doit import doit_cmd

    return dict(doit_cmd._CMDLINE_VARS or {})


def load_from_command_line(cli_vars: dict[str, str], generating: bool = False) -> Build:
    """Everything checkable is checked here, before doit runs any task; raises ForgeError (one line)."""
    overrides = {key: value for key, value in cli_vars.items() if key not in RESERVED_VARS}
    recipe = cli_vars.get("recipe") or _first_audited(cli_vars) or DEFAULT_RECIPE
    loaded = load_recipe(recipe, overrides=overrides, model=cli_vars.get("model"), lora=cli_vars.get("lora"),
                         generating=generating)
    build = Build(loaded, artifacts_root(), deep=_flag(cli_vars.get("verify", "0")))
    build.remote = remote.from_settings(remote.settings_from(cli_vars, os.environ))  # no fsspec import yet
    return build


def banners(build: Build) -> list[str]:
    """Said at the start of every build (no-op and partial ones too): the tiny model, and command-line overrides
    with the view they build into (a shipped recipe's own view holds only what its file says)."""
    loaded = build.loaded
    lines = []
    if loaded.recipe.model.is_tiny:
        lines.append(f"*** {TINY_WARNING} (seed {loaded.recipe.model.seed}) ***")
    settings = build_overrides(loaded.overrides)
    if settings:
        shown = ", ".join(f"{key}={json.dumps(value, ensure_ascii=False)}" for key, value in settings.items())
        lines.append(f"{len(settings)} override{'s' if len(settings) > 1 else ''}: {shown} -> view {loaded.name} "
                     f"(not {Path(loaded.source).stem})")
    return lines


def _flag(value: str) -> bool:
    from stages.errors import fail

    if value not in ("0", "1"):
        raise fail("command line", "verify", f"must be 0 or 1, got {value!r}")
    return value == "1"


def stage_tasks(build: Build, stage: str) -> Iterator[dict[str, Any]]:
    """One doit sub-task per component (or one per recipe for recipe-wide stages, one per part of a split engine)."""
    loaded: LoadedRecipe = build.loaded
    for ref in registry.stage_refs(loaded, registry.STAGES[stage]):
        yield {
            "name": actions.task_name(build, ref),
            "actions": [(actions.run_stage, [build, ref])],
            "task_dep": [actions.label(build, dep) for dep in registry.upstream_refs(loaded, ref)],
            "uptodate": [(actions.stage_uptodate, [build, ref])],
            "verbosity": 2,
        }


def manifest_task(build: Build) -> dict[str, Any]:
    return {
        "name": build.name,
        "actions": [(actions.write_manifest_action, [build])],
        "task_dep": [actions.label(build, ref) for ref in build.refs()],
        "uptodate": [(actions.manifest_uptodate, [build])],
        "verbosity": 2,
    }


def build_task(build: Build, cli_vars: dict[str, str]) -> dict[str, Any]:
    """The default task: everything, then the snapshot a no-op rebuild answers from (stages.plan.noop)."""
    return {"actions": [(actions.record_noop_action, [cli_vars, load_from_command_line, banners])],
            "task_dep": [f"manifest:{build.name}"], "uptodate": [False], "verbosity": 2,
            "clean": [(actions.clean_action, [build])]}


def publish_task(build: Build) -> dict[str, Any]:
    return {"actions": [(actions.publish_action, [build])], "task_dep": [f"manifest:{build.name}"],
            "uptodate": [False], "verbosity": 2}


def _first_audited(cli_vars: dict[str, str]) -> str | None:
    """`doit audit recipes=a,b` without `recipe=`: the graph is built for `a` (and `recipes=` is checked first)."""
    if "recipes" not in cli_vars:
        return None
    from stages.audit import recipe_names

    return recipe_names(cli_vars["recipes"])[0]


def audit_request(cli_vars: dict[str, str], build: Build) -> Any:
    """`doit audit`: the recipes of `recipes=` (or the build's own recipe), loaded and checked before anything runs."""
    from stages import audit

    overrides = {key: value for key, value in cli_vars.items() if key not in RESERVED_VARS}
    passed_on = tuple((key, value) for key, value in sorted(cli_vars.items())
                      if key in RESERVED_VARS and key not in ("recipe", "recipes", "model"))  # verify=, remote=
    if "recipes" in cli_vars:
        return audit.parse_request(audit.recipe_names(cli_vars["recipes"]), overrides, cli_vars.get("model"), build.root,
                                   passed_on)
    loaded = build.loaded
    return audit.AuditRequest((cli_vars.get("recipe") or DEFAULT_RECIPE,), (loaded.name,), tuple(sorted(overrides.items())),
                              cli_vars.get("model"), build.root, {loaded.name: audit.audit_thresholds(loaded)}, passed_on)


def generate_request(cli_vars: dict[str, str], build: Build, argv: list[str]) -> GenerateRequest | None:
    """`doit generate`'s request, checked against the recipe now; its variables on any other command are refused."""
    from stages.errors import fail

    if "generate" not in argv[1:]:
        given = sorted(set(cli_vars) & set(GENERATE_VARS) - {"lora"})
        if given:
            raise fail("command line", given[0], "is a doit generate variable; allowed here: recipe=, model=, "
                       "remote=, verify=, lora=, KEY.PATH=VALUE (see doit help build)")
        return None
    return parse_request(cli_vars, build.loaded, build.root)


def generate_task(build: Build, request: GenerateRequest | None) -> dict[str, Any]:
    """Images from the recipe's built artifacts; the recipe is built first where it is not up to date."""
    return {"actions": [(actions.generate_action, [build, request])], "task_dep": [f"manifest:{build.name}"],
            "uptodate": [False], "verbosity": 2}


def audit_task(request: Any) -> dict[str, Any]:
    return {"actions": [(actions.audit_action, [request])], "uptodate": [False], "verbosity": 2}


def gc_task(build: Build) -> dict[str, Any]:
    return {"actions": [(actions.gc_action, [build.root])], "uptodate": [False], "verbosity": 2}
