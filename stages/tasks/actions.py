"""The doit actions: run a stage into the store (or reuse its entry), link views, write the manifest, clean.

Each action configures its stage from the recipe section and the upstream store entries, then builds into a
scratch folder under the entry's lock and commits it. A task is durable the moment its entry is committed:
doit's own state database is only a cache. Failures become one line unless FORGE_DEBUG=1.
"""

from __future__ import annotations

import functools
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from doit.exceptions import TaskFailed

from stages import log
from stages.audit.request import AuditRequest
from stages.audit.run import Audit
from stages.errors import ForgeError, debugging, one_line
from stages.graphs import weights
from stages.inputs import StageInputs
from stages.plan import noop, registry
from stages.plan.registry import Ref
from stages.plan.resolve import Build
from stages.records import junit
from stages.runtime.request import GenerateRequest
from stages.store import views
from stages.store.digests import digest, sha256_file
from stages.store.local import WEIGHTS_STAGE, Store, crashpoint
from stages.tasks import isolation
from stages.tasks.ci import VALUES_KEY, Tally

LOG = log.get()


def task_name(build: Build, ref: Ref) -> str:
    name = f"{build.name}/{ref.component}" if ref.component else build.name
    return name if ref.part is None else f"{name}/part{ref.part}"


def label(build: Build, ref: Ref) -> str:
    return f"{ref.stage}:{task_name(build, ref)}"


def stage_uptodate(build: Build, ref: Ref) -> bool:
    """doit uptodate: an entry for the current key exists, verifies, is not a recorded failure, and the recipe's
    view points at it (otherwise the action runs, and reuses the entry if it exists)."""
    build.store.open_session()
    entry = build.entry(ref)
    return (entry is not None and entry.report.get("passed") is not False
            and views.links_match(build.store, build.name, {ref.label: entry.path}))


def _one_line(where: str, error: BaseException) -> TaskFailed:
    if debugging() and not isinstance(error, ForgeError):
        raise error
    return TaskFailed(f"{where}: {one_line(error)}")


def run_stage(build: Build, ref: Ref) -> TaskFailed | dict[str, Any]:
    """doit action: reuse the entry for this task's inputs, or compute it under the entry's lock and commit it.

    Returns the task's counts as doit values (the reporter's summary, also from parallel workers). A check that ran
    and measured a failure does not fail the task: the other checks still run, and the reporter lists every
    failure and exits 4 at the end."""
    where = label(build, ref)
    store, mirror = build.store, build.remote
    store.open_session()
    counts = _counts(build)
    try:
        material = build.inputs(ref)
        if material is None:
            raise ForgeError("an upstream store entry is missing or damaged; rerun the build")
        key = digest(material)
        fetched = built = False
        with store.lock(key, announce=where):
            entry = store.lookup(ref.stage, key, deep=build.deep)
            if entry is None and store.exists(ref.stage, key):
                reason = store.damage(ref.stage, key, deep=True)
                LOG.warning(f"damaged {where}: {reason}; rebuilding")
                store.discard(ref.stage, key)
                build.invalidate()
            if entry is None and mirror is not None:  # verified, placed atomically, or None
                placed = mirror.fetch(store, ref.stage, key, material, where, build.checkpoint_weights())
                if placed is not None:
                    entry, transfer = placed
                    counts.fetch(transfer)
                    fetched = True
                build.invalidate()
            if entry is None:
                inputs, checkpoint = _inputs(build, ref), build.checkpoint_dir()
                isolate = (ref.part is not None  # a part is built in its own process: that is what bounds its memory
                           or isolation.component_bytes(build.loaded, ref, checkpoint) >= isolation.threshold())
                with store.scratch(key) as scratch:
                    report = isolation.run(registry.stage_module(build.loaded, ref), build.loaded, ref, inputs, scratch,
                                           isolate)
                    crashpoint(f"{ref.stage}:outputs")
                    entry = store.commit(scratch, ref.stage, key, material, report)
                build.invalidate()
                LOG.info(f"built {where} -> {store.relative(entry.path)}")
                built = True
                counts.built += 1
            elif not fetched:
                LOG.info(f"reused {where} <- {store.relative(entry.path)}")
                counts.reused += 1
        if built and mirror is not None:
            sent = mirror.publish(entry, where, build.checkpoint_weights())  # outside the lock: entry is immutable
            if sent is not None:
                counts.publish(sent)
        crashpoint(f"{ref.stage}:committed")
        with store.lock(views.view_lock(build.name)):
            views.link(store, build.name, ref.label, entry.path)
    except Exception as error:  # noqa: BLE001 - every failure becomes one readable line
        return _one_line(where, error)
    values = {**counts.values(), "remote_note": mirror.note if mirror else None}
    if entry.report.get("passed") is False:
        values["failed"] = f"{where}: {entry.report.get('failure', 'failed')}"
        LOG.warning(f"FAILED {values['failed']}")
    return {VALUES_KEY: values}


def _counts(build: Build) -> Tally:
    """An empty count for one task, naming the build's remote (the summary line says which, and its note)."""
    return Tally(remote=build.remote.url if build.remote else None, remote_note=build.remote.note if build.remote else None)


def publish_action(build: Build) -> TaskFailed | dict[str, Any]:
    """doit action (`doit publish`): put every entry of the recipe on the remote, e.g. ones built before it was set."""
    from stages.store.remote import ENV_URL, VAR_URL

    mirror = build.remote
    if mirror is None:
        return TaskFailed(f"publish:{build.name}: no remote: set {ENV_URL}=<url> or {VAR_URL}=<url>")
    build.store.open_session()
    counts, present = _counts(build), 0
    try:
        for ref in build.refs():
            entry = build.entry(ref)
            if entry is None:
                return TaskFailed(f"publish:{build.name}: {label(build, ref)} has no store entry; run the build")
            sent = mirror.publish(entry, label(build, ref), build.checkpoint_weights())
            if sent is not None:
                counts.publish(sent)
            elif mirror.available:
                present += 1
    except ForgeError as error:
        return TaskFailed(f"publish:{build.name}: {error}")
    if not mirror.available:
        return TaskFailed(f"publish:{build.name}: remote {mirror.url} unreachable")
    LOG.info(f"publish {build.name}: {counts.published} entries published, {present} already on {mirror.url}")
    return {VALUES_KEY: {**counts.values(), "remote_note": mirror.note}}


def _inputs(build: Build, ref: Ref) -> StageInputs:
    """Where the stage reads: its upstream store entries and the checkpoint; where a shard copy goes."""
    return StageInputs(checkpoint=build.checkpoint_dir(), dirs=build.upstream_dirs(ref), root=build.root,
                       shared_copy=functools.partial(shared_weights_copy, build.root), part=ref.part)


def shared_weights_copy(root: Path, source: Path, sha256: str) -> Path:
    """The store's one copy of a checkpoint file, under `store/weights/<sha256[:32]>/`, made on first use: what a
    stage links when the checkpoint is on another filesystem (StageInputs.shared_copy). Its bytes are checked
    against `sha256`, so no key covers this code; gc keeps it while an entry holds a file of that content."""
    store, key = Store(root), sha256[:32]
    with store.lock(f"{WEIGHTS_STAGE}-{key}", announce=f"copy of {source.name}"):
        entry = store.lookup(WEIGHTS_STAGE, key)
        if entry is None:
            if store.exists(WEIGHTS_STAGE, key):
                store.discard(WEIGHTS_STAGE, key)
            with store.scratch(key) as scratch:
                shutil.copyfile(source, scratch / source.name)
                if sha256_file(scratch / source.name) != sha256:
                    raise OSError(f"{source}: changed while it was copied into the store")
                weights.note_known_digest(scratch, source.name, sha256)
                entry = store.commit(scratch, WEIGHTS_STAGE, key, {"sha256": sha256, "file": source.name},
                                     {"copied_from": source.name, "reason": "checkpoint on another filesystem"})
        return entry.path / next(iter(entry.outputs))


def expected_links(build: Build) -> dict[str, Path] | None:
    links = {}
    for ref in build.refs():
        entry = build.entry(ref)
        if entry is None:
            return None
        links[ref.label] = entry.path
    return links


def manifest_uptodate(build: Build) -> bool:
    from stages.records.manifest import manifest_key

    build.store.open_session()
    expected = expected_links(build)
    if expected is None:
        return False
    current = views.read_manifest(build.store, build.name)
    return (current is not None and current.get("build", {}).get("key") == manifest_key(build)
            and views.links_match(build.store, build.name, expected))


def write_manifest_action(build: Build) -> TaskFailed | None:
    from stages.records.manifest import build_manifest, summary_lines

    store = build.store
    store.open_session()
    try:
        with store.lock(views.view_lock(build.name)):
            expected = expected_links(build) or {}
            for name, target in expected.items():
                views.link(store, build.name, name, target)
            views.prune(store, build.name, set(expected))
            manifest = build_manifest(build)
            path = views.write_manifest(store, build.name, manifest)
            junit.write(store, build.name, manifest)
    except Exception as error:  # noqa: BLE001
        return _one_line(f"manifest:{build.name}", error)
    for line in summary_lines(manifest, os.path.relpath(path)):
        LOG.info(line)
    return None


def clean_action(build: Build) -> None:
    count, freed = views.clean(build.store, build.name)
    print(f"clean {build.name}: removed its view and {count} store entries no other recipe uses "
          f"({freed / 1e6:.1f} MB freed)")  # doit clean shows an action's stdout only


def gc_action(root: Path) -> None:
    from stages.store.local import Store

    count, freed, swept = views.collect_garbage(Store(root))
    LOG.info(f"gc: removed {count} unreferenced store entries and {swept} scratch leftovers; "
             f"{freed / 1e6:.1f} MB freed")


def record_noop_action(cli_vars: dict[str, str], load: Callable[[dict[str, str]], Build],
                       banners: Callable[[Build], list[str]]) -> None:
    """The `build` task's action, run once everything it depends on completed: plan the same command again while
    recording what planning reads, and keep the snapshot the next no-op answers from (stages.plan.noop). Never fails
    the build: without a snapshot the next no-op takes the full path."""
    if not noop.eligible(cli_vars):
        return
    try:
        with noop.recording() as reads:
            build = load(cli_vars)
            entries = {ref: build.entry(ref) for ref in build.refs()}
            complete = all(e is not None and e.report.get("passed") is not False for e in entries.values())
            if not (complete and manifest_uptodate(build)):
                noop.forget(cli_vars)
                return
        model = build.loaded.recipe.model
        trees = [] if model.is_tiny else [Path(model.path).resolve()]
        noop.save(cli_vars, reads, trees, build.store, build.name,
                  [(label(build, ref), ref.stage, entry.key) for ref, entry in entries.items()],  # type: ignore[union-attr]
                  {ref.label: str(entry.path) for ref, entry in entries.items()},  # type: ignore[union-attr]
                  (f"manifest:{build.name}", views.view_dir(build.store, build.name) / views.MANIFEST), banners(build))
    except Exception as error:  # noqa: BLE001 - a missing snapshot only costs the next no-op its full path
        LOG.debug(f"no-op snapshot not written: {type(error).__name__}: {error}")
        noop.forget(cli_vars)


def generate_action(build: Build, request: GenerateRequest | None) -> Any:
    """doit action: the request's images from the recipe's view; every failure is one line, nothing half-written."""
    if request is None:
        return TaskFailed("generate: give prompt=TEXT or prompts=FILE (doit generate recipe=NAME prompt=...)")
    from stages.runtime.generate import generate

    try:
        generate(request, build.root / build.name / "manifest.json")
    except Exception as error:  # noqa: BLE001 - one readable line, as for the stages
        if debugging() and not isinstance(error, ForgeError):
            raise
        return TaskFailed(f"generate: {one_line(error)}")
    return None


def audit_action(request: AuditRequest) -> Any:
    """doit action: run the audit; every failure is one line (FORGE_DEBUG=1 shows tracebacks)."""
    try:
        report = Audit(request)()
    except Exception as error:  # noqa: BLE001 - one readable line, as for the stages
        if debugging() and not isinstance(error, ForgeError):
            raise
        return TaskFailed(f"audit: {one_line(error)}")
    where = os.path.relpath(request.out_dir / "report.html")
    for name, figures in report["recipes"].items():
        print(f"audit: {name}: {'PASSED' if figures['passed'] else 'FAILED'} {figures['execution']['summary']}",
              file=sys.stderr)
    print(f"audit report: {where} (figures in report.json beside it)", file=sys.stderr)
    if not report["passed"]:
        more = f" (+{len(report['failures']) - 1} more)" if len(report["failures"]) > 1 else ""
        return TaskFailed(f"audit FAILED: {report['failures'][0]}{more}; see {where}")
    return None
