"""doit's own commands with the forge's manners: options where users put them, help that documents the build.

doit treats words after a task name as that task's options, so `doit build recipe=a10-fp16 -n 2` was refused
("option -n not recognized"). These subclasses replace doit's `run`, `help`, `list` and `clean` (registered in
pyproject.toml, `[tool.doit.plugins.command]`, read by doit from the repository root): run options are taken
before or after the task and variables, `doit help build` and `doit list` document the variables and exit codes,
and `doit clean` drops doit's line per clean action. Light: doit and stdlib only.
"""

from __future__ import annotations

import io
import os
import sys
import time
from typing import Any

from doit.cmd_clean import Clean
from doit.cmd_help import Help
from doit.cmd_list import List
from doit.cmd_run import Run
from doit.cmdparse import CmdParseError

from stages import log
from stages.paths import REPO_DIR
from stages.plan import noop
from stages.tasks.ci import EXIT_INTERRUPTED, Tally

USAGE = ("[recipe=NAME|FILE.yaml] [model=tiny|DIR] [remote=URL] [remote_required=1] [verify=1] [lora=FILE[:SCALE]] "
         "[KEY.PATH=VALUE ...] [-n N] [-v 0|1|2]")

DESCRIPTION = """\
Builds, validates and records everything the recipe describes: checkpoint (tiny model), calibration, export,
surgery, precision, engine, validate, pipeline_check, manifest. Work already in the store for the same inputs
is reused; a no-op rebuild only checks.

Variables (key=value, anywhere on the line):
  recipe=NAME|FILE.yaml   a recipe in recipes/ (default a10-fp16) or a path to a YAML recipe file
  model=tiny|DIR          the built-in tiny random-weight model (default) or a diffusers checkpoint directory
  remote=URL              store mirror shared by CI runners (s3://bucket/prefix, a directory, any fsspec URL);
                          default: the FORGE_REMOTE environment variable
  remote_required=1       an unreachable remote fails the build (exit 1) instead of a local build
  verify=1                rehash every output the build uses instead of the size/mtime/inode check
  lora=FILE[:SCALE],...   LoRA .safetensors the pipeline check binds to the transformer's LoRA inputs (required by
                          recipes whose sampling.lora is required, e.g. a10-fp16-lightning); by content in its key
  KEY.PATH=VALUE          override any recipe value, e.g. components.transformer.validate.max_cases=1;
                          an overridden build has a view of its own, artifacts/<recipe>-<digest>

Options (before or after the variables): -n N runs N tasks at once (processes); -v 0|1|2 as in doit run.

Exit codes:
  0  built and validated (manifest.json and junit.xml written)
  1  a stage failed, or a required remote was unreachable
  2  bad input: recipe, override, checkpoint or remote setting refused before anything ran; nothing written
  3  doit usage error (unknown task or option)
  4  everything built, but a validation or pipeline check failed (every failure listed; see junit.xml)
  130  interrupted (Ctrl-C or SIGTERM): finished tasks kept, the running ones lost

Environment: FORGE_LOG=debug (every stage's detail and the tools' own output), FORGE_DEBUG=1 (tracebacks),
FORGE_ARTIFACTS=DIR (where the store and views live), FORGE_REMOTE, FORGE_REMOTE_REQUIRED=1.
Other commands: doit list, doit clean recipe=..., doit gc, doit publish recipe=..., doit audit recipes=a,b,
doit generate recipe=... prompt=... (README: "Generate images with what you built")."""


FOOTER = ("\nVariables: recipe=NAME|FILE.yaml model=tiny|DIR remote=URL remote_required=1 verify=1 KEY.PATH=VALUE; "
          "options anywhere, e.g. -n 2; exit codes 0 built and validated, 1 stage failed, 2 bad input, 3 usage, "
          "4 a check failed, 130 interrupted. `doit help build` says more.\n")


class ForgeRun(Run):
    """`doit run` (and the default `doit build ...`): doit's run options are taken before or after the task names
    and variables; an unknown option is one line with the usage."""

    name = "run"

    def parse_execute(self, in_args: list[str]) -> Any:
        try:
            return super().parse_execute(self._options_first(in_args))
        except KeyboardInterrupt:  # a signal the reporter did not see (e.g. sent to one worker of `-n 2`)
            print("interrupted: finished tasks are kept in the store; rerun to continue", file=sys.stderr)
            raise SystemExit(EXIT_INTERRUPTED) from None

    def execute(self, params: Any, args: list[str]) -> Any:
        if args in ([], ["build"]) and self._plain(params) and self._answer_noop():
            return 0
        return super().execute(params, args)

    @staticmethod
    def _plain(params: Any) -> bool:
        """Options that leave a no-op's outcome and output as they are (not -a, another reporter or dodo file)."""
        dodo = os.path.join(params.get("cwdPath") or os.getcwd(), params.get("dodoFile") or "dodo.py")
        return (not params.get("always") and params.get("reporter") == "console" and params.get("outfile") is sys.stdout
                and not params.get("pdb") and os.path.realpath(dodo) == str(REPO_DIR / "dodo.py"))

    def _answer_noop(self) -> bool:
        """The no-op fast path (stages.plan.noop): print what the full no-op prints, without loading the task graph."""
        from doit import doit_cmd

        started = time.perf_counter()
        answer = noop.check(dict(doit_cmd._CMDLINE_VARS or {}))
        if answer is None:
            return False
        log.configure()
        logger = log.get()
        for line in answer.banners:
            logger.warning(line)
        self.outstream.write("".join(f"-- {label}\n" for label in answer.labels))
        self.outstream.flush()
        tally = Tally(up_to_date=len(answer.labels) - 1)  # the manifest task is not a stage task
        logger.info(f"{tally.line()}; {time.perf_counter() - started:.1f} s")
        logger.debug(f"no-op answered from its snapshot: {len(answer.labels)} tasks, every input unchanged")
        return True

    def _options_first(self, in_args: list[str]) -> list[str]:
        options: list[str] = []
        positional: list[str] = []
        pending = list(in_args)
        while pending:
            token = pending.pop(0)
            if token == "--":
                positional += pending
                break
            if not token.startswith("-") or token == "-":
                positional.append(token)
                continue
            option = self._option(token)
            if option is None:
                raise CmdParseError(f"option {token.split('=')[0]} not recognized; usage: doit build {USAGE} "
                                    "(doit help build)")
            options.append(token)
            takes_value = option.type is not bool and "=" not in token and not (
                token.startswith("-") and not token.startswith("--") and len(token) > 2)
            if takes_value and pending:
                options.append(pending.pop(0))
        return options + positional

    def _option(self, token: str) -> Any:
        for option in self.cmdparser.options:
            if token.startswith("--"):
                name = token[2:].split("=", 1)[0]
                if name in (option.long, option.inverse):
                    return option
            elif option.short and token[1:2] == option.short:
                return option
        return None


class ForgeHelp(Help):
    """`doit help build` documents the build's variables, options and exit codes."""

    name = "help"

    def execute(self, params: Any, args: list[str]) -> int:
        if args == ["build"]:
            print(f"build  build, validate and record a recipe's engines (the default task)\n\nUSAGE\n    doit build "
                  f"{USAGE}\n\n{DESCRIPTION}")
            return 0
        return super().execute(params, args)


class ForgeList(List):
    """`doit list`, then one paragraph on the variables, options and exit codes."""

    name = "list"

    def execute(self, params: Any, args: list[str]) -> Any:
        result = super().execute(params, args)
        self.outstream.write(FOOTER)
        return result


class _WithoutActionNames(io.TextIOBase):
    """doit's clean writes `<task> - executing '<action>'` for every clean action; the action says what it did."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def write(self, text: str) -> int:
        if " - executing '" not in text:
            self.stream.write(text)
        return len(text)


class QuietClean(Clean):
    """`doit clean`, without doit's line per clean action."""

    name = "clean"

    def clean_tasks(self, tasks: Any, dryrun: bool, cleanforget: bool) -> None:
        self.outstream = _WithoutActionNames(self.outstream)
        super().clean_tasks(tasks, dryrun, cleanforget)
