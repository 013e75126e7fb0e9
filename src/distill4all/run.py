"""The run directory, its manifest, and the stage runner.

A run directory holds everything a run makes:

    store.sqlite     the run store (see store.py): the truth about every stage and row
    manifest.json    a snapshot derived from the store + environment, rewritten atomically
    <stage>/         each stage's artifacts
    .lock            held (flock) by the one process that may run stages here

Stage semantics, decided per stage from its row in the store:
  no row                       → run fresh
  done, same fingerprint       → skip
  done, other fingerprint      → refuse (its config, inputs or upstream changed): --force redoes it
  running/failed, same fp      → resume (the stage picks up its own progress from the store)
  running/failed, other fp     → refuse, as above
  done, an artifact missing    → resume (the stage redoes what is missing)
A fingerprint is the hash of the stage's config section, the seed, every other config value the
stage reads (its `READS`) and its input files' contents; `upstream` records the run ids of the
stages it read, so redoing one makes its followers stale.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib
import json
import os
import platform
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol, cast

from rich.console import Console

from distill4all import __version__, atomic, offline_defaults
from distill4all.config import STAGE_ORDER, LoadedConfig, RunConfig
from distill4all.errors import RunDirError, StageError
from distill4all.layout import RunLayout
from distill4all.redact import redact
from distill4all.store import SCHEMA_VERSION, StageRow, Store, outputs
from distill4all.store import meta as store_meta

STAGE_MODULES: dict[str, str] = {
    "collect": "distill4all.collect.stage",
    "curate": "distill4all.curate.stage",
    "train": "distill4all.train.stage",
    "export": "distill4all.export.stage",
    "eval": "distill4all.evaluate.stage",
}
"""Where each implemented stage lives. Each module follows the `StageModule` protocol."""

TRACKED_PACKAGES = (
    "torch", "transformers", "tokenizers", "peft", "accelerate", "gguf", "llama_cpp_python",
    "numpy", "pydantic", "datasketch", "model2vec", "sentence-transformers", "openTSNE",
)  # fmt: skip


@dataclass
class StageResult:
    counts: dict[str, Any] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)
    artifacts: list[Path] = field(default_factory=list)


class StageModule(Protocol):
    UPSTREAM: tuple[str, ...]  # the stages whose outputs it reads
    READS: tuple[str, ...]  # config values it reads outside its own section, as dotted key paths

    def inputs(self, config: RunConfig) -> list[Path]: ...
    def run(self, ctx: StageContext) -> StageResult: ...
    def reset(self, ctx: StageContext) -> None: ...


@dataclass
class StageContext:
    name: str
    run: RunDir
    loaded: LoadedConfig
    console: Console
    quiet: bool = False
    options: dict[str, Any] = field(default_factory=dict)  # per-invocation knobs, e.g. max_cost_usd

    @property
    def config(self) -> RunConfig:
        return self.loaded.config

    @property
    def store(self) -> Store:
        return self.run.store

    @property
    def layout(self) -> RunLayout:
        return RunLayout.of(self.config)

    @property
    def dir(self) -> Path:
        """This stage's artifact folder."""
        return self.layout.stage_dir(self.name)

    def set_counts(self, **counts: Any) -> None:
        """Record progress so that `status` shows it while the stage runs."""
        self.store.update_stage(self.name, counts=counts)


def load_stage(name: str) -> StageModule:
    if name not in STAGE_ORDER:
        raise StageError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_ORDER)}")
    if name not in STAGE_MODULES:
        raise StageError(f"stage {name!r} is not available in distill4all {__version__} yet")
    module: ModuleType = importlib.import_module(STAGE_MODULES[name])
    return cast(StageModule, module)


class RunDir:
    """A run directory opened for reading (status) or for running stages (holds the lock)."""

    def __init__(self, path: Path, *, create: bool = False, readonly: bool = False) -> None:
        self.path = path
        if not path.exists():
            if path.is_symlink():  # one that loops or leads nowhere: mkdir would say "a file is there"
                try:
                    os.stat(path)
                except OSError as e:
                    why = e.strerror
                    raise RunDirError(f"run directory {path} is a symlink that cannot be followed: {why}") from None
            if not create:
                raise RunDirError(f"run directory not found: {path}")
            path.mkdir(parents=True)
        elif not path.is_dir():
            raise RunDirError(f"not a directory: {path}")
        self.layout = RunLayout(path)
        store_path = self.layout.store
        if not store_path.exists():
            if not create:
                raise RunDirError(f"not a run directory (no store.sqlite): {path}")
            _refuse_foreign_run_files(self.layout)
        self.store = Store(store_path, readonly=readonly)
        self._lock_fd: int | None = None

    def close(self) -> None:
        self.unlock()
        self.store.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the run's lock: one runner per run directory at a time."""
        lock_path = self.layout.lock
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{self.path} is in use by pid {holder}; wait for it or stop it") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd
        try:
            yield
        finally:
            self.unlock()

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- identity -----------------------------------------------------------------------------

    def claim(self, run_name: str) -> None:
        """Tie the directory to one run name, so two configs never share a run directory."""
        owner = store_meta.get(self.store, "run_name")
        if owner is None:
            store_meta.insert(self.store, {"run_name": run_name, "created_at": str(time.time())})
        elif owner != run_name:
            raise RunDirError(f"{self.path} belongs to run {owner!r}, not {run_name!r}; give this run its own run_dir")

    # --- manifest -----------------------------------------------------------------------------

    def manifest(self, loaded: LoadedConfig, inputs: dict[str, str]) -> dict[str, Any]:
        stages = self.store.stages()
        meta = store_meta.items(self.store)
        costs: dict[str, float] = {}
        for row in stages.values():
            for k, v in row.costs.items():
                costs[k] = costs.get(k, 0.0) + float(v)
        return {
            "distill4all": __version__,
            "schema_version": SCHEMA_VERSION,
            "run": loaded.config.name,
            "created_at": float(meta.get("created_at", time.time())),
            "updated_at": time.time(),
            "config_file": str(loaded.path),
            "config_hash": loaded.hash(),
            "config": loaded.public_dict(),
            "environment": environment(),
            "inputs": inputs,
            "stages": {name: _stage_summary(stages[name]) for name in STAGE_ORDER if name in stages},
            "costs": costs,
        }

    def write_manifest(self, loaded: LoadedConfig, inputs: dict[str, str]) -> None:
        atomic.write_json(self.layout.manifest, self.manifest(loaded, inputs))


def _refuse_foreign_run_files(layout: RunLayout) -> None:
    """A new run in an existing folder must not take over files of the runner's names that some
    other program (or a run whose store is gone) left there."""
    for path in layout.run_files():
        if os.path.lexists(path):
            raise RunDirError(
                f"{path} exists but {layout.root} is not a run directory (no store.sqlite): "
                "point run_dir at a new or empty folder"
            )


def _stage_summary(row: StageRow) -> dict[str, Any]:
    return {
        "status": row.status,
        "run_id": row.run_id,
        "fingerprint": row.config_hash,
        "upstream": row.upstream,
        "attempts": row.attempts,
        "started_at": row.started_at,
        "finished_at": row.finished_at,
        "seconds": round(row.seconds, 3),
        "counts": row.counts,
        "costs": row.costs,
        "artifacts": row.artifacts,
        "error": row.error,
    }


def environment() -> dict[str, Any]:
    packages = {}
    for name in TRACKED_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            packages[name] = metadata.version(name)
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "packages": packages,
    }


def hash_artifact(path: Path) -> str:
    """sha256 of a file, or of a directory's sorted (relative path, file sha256) list."""
    if path.is_file():
        return atomic.sha256_file(path)
    lines = [f"{p.relative_to(path)} {atomic.sha256_file(p)}" for p in sorted(path.rglob("*")) if p.is_file()]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _input_files(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        elif p.is_file():
            files.append(p)
    return files


@dataclass
class StageOutcome:
    stage: str
    action: str  # "ran" | "resumed" | "skipped"
    row: StageRow


def run_stages(
    loaded: LoadedConfig,
    *,
    from_stage: str | None = None,
    until_stage: str | None = None,
    force: bool = False,
    console: Console | None = None,
    quiet: bool = False,
    options: dict[str, Any] | None = None,
    redo_hint: str = "rerun with --force --from {stage} to redo it and what follows",
) -> list[StageOutcome]:
    """Run the configured stages in order, skipping finished ones and resuming interrupted ones.

    `redo_hint` is how the refusal of a changed stage tells the user to redo it (the one-stage
    commands have no --from)."""
    offline_defaults()  # also when called from Python rather than the CLI
    console = console or Console(stderr=True, quiet=quiet)
    config = loaded.config
    for s in (from_stage, until_stage):
        if s is not None and s not in STAGE_ORDER:
            raise StageError(f"unknown stage {s!r}; stages are: {', '.join(STAGE_ORDER)}")
    lo = STAGE_ORDER.index(from_stage) if from_stage else 0
    hi = STAGE_ORDER.index(until_stage) if until_stage else len(STAGE_ORDER) - 1
    configured = config.configured_stages()
    selected = [s for s in configured if lo <= STAGE_ORDER.index(s) <= hi]
    if not selected:
        raise StageError("no configured stage lies in the range asked for")
    modules = {s: load_stage(s) for s in selected}  # fail before doing anything

    run = RunDir(config.run_dir, create=True)
    outcomes: list[StageOutcome] = []
    try:
        with run.locked():
            run.claim(config.name)
            layout = RunLayout.of(config)
            # the run directory's walk covers the stage folders inside it; only an out_dir elsewhere is its own
            root = run.path.resolve()
            outside = {d for s in selected if not (d := layout.stage_dir(s)).resolve().is_relative_to(root)}
            for folder in {run.path, *outside}:
                atomic.clean_temp(folder)
            all_inputs: dict[str, str] = {}
            for name in selected:
                ctx = StageContext(name, run, loaded, console, quiet, dict(options or {}))
                outcome = _run_stage(ctx, modules[name], configured, force, all_inputs, redo_hint)
                outcomes.append(outcome)
            run.write_manifest(loaded, all_inputs)
    finally:
        run.close()
    return outcomes


def _run_stage(
    ctx: StageContext,
    module: StageModule,
    configured: list[str],
    force: bool,
    all_inputs: dict[str, str],
    redo_hint: str,
) -> StageOutcome:
    store, name = ctx.store, ctx.name
    inputs = {str(p): store.file_hash(p) for p in _input_files(module.inputs(ctx.config))}
    all_inputs.update(inputs)
    fingerprint = _fingerprint(ctx.loaded.stage_hash(name, module.READS), inputs)
    upstream = _upstream_run_ids(store, name, module.UPSTREAM, configured)
    row = store.stage(name)
    action = "ran" if row is None or force else _decide(ctx, row, fingerprint, upstream, redo_hint)
    if action == "skipped":
        assert row is not None
        return StageOutcome(name, action, row)
    ledger = outputs.Ledger(store, ctx.run.path, name)
    with atomic.claiming(_claim_hook(ctx, ledger)):
        _claim_known(ctx, ledger, row)
        if action == "ran" and row is not None:
            ctx.console.print(f"{name}: redoing (--force)")
            outputs.remove(store, ctx.run.path, name)  # exactly the files it wrote, nothing else
            module.reset(ctx)
            _claim_known(ctx, ledger, None)
        elif action == "resumed":
            assert row is not None
            ctx.console.print(f"{name}: resuming (attempt {row.attempts + 1})")
        fresh = action == "ran"
        store.begin_stage(name, run_id=uuid.uuid4().hex[:12], config_hash=fingerprint, upstream=upstream, fresh=fresh)
        ctx.run.write_manifest(ctx.loaded, all_inputs)
        _execute(ctx, module, all_inputs)
    final = store.stage(name)
    assert final is not None
    return StageOutcome(name, action, final)


def _claim_hook(ctx: StageContext, ledger: outputs.Ledger) -> Callable[[Path], None]:
    """Claims for the stage what is written into its folder; the runner's own files (the stage's
    folder may be the run directory) and anything outside it (the model cache) are not its."""
    folder = os.path.abspath(ctx.dir)
    own = {os.path.abspath(p) for p in ctx.layout.run_files()}

    def claim(path: Path) -> None:
        full = os.path.abspath(path)
        outside = os.path.commonpath([full, folder]) != folder
        if outside or any(full == o or full.startswith(o + os.sep) for o in own):
            return
        ledger.claim(path)

    return claim


def _claim_known(ctx: StageContext, ledger: outputs.Ledger, row: StageRow | None) -> None:
    """Claim the paths the stage writes from other processes, and (a store from before the
    ledger adopts them) the artifacts it recorded when it last finished."""
    known = ctx.layout.fixed_outputs(ctx.name)
    if row is not None:
        known += [ctx.run.path / a for a in row.artifacts]
    for path in known:
        atomic.claim(path)


def _upstream_run_ids(store: Store, name: str, upstream: tuple[str, ...], configured: list[str]) -> dict[str, str]:
    """The run id of each configured upstream stage, which must have finished."""
    ids: dict[str, str] = {}
    for up in upstream:
        if up not in configured:
            continue
        up_row = store.stage(up)
        if up_row is None or up_row.status != "done":
            raise StageError(f"stage {name!r} needs stage {up!r} finished first; run it with --from {up}")
        ids[up] = up_row.run_id
    return ids


def _decide(ctx: StageContext, row: StageRow, fingerprint: str, upstream: dict[str, str], redo_hint: str) -> str:
    """ "skipped" or "resumed" for a stage that has a row, or refuse when what it read changed."""
    changed = []
    if row.config_hash != fingerprint:
        changed.append("its config or input files changed")
    redone = [u for u, rid in upstream.items() if row.upstream.get(u) != rid]
    if redone:
        changed.append(f"stage {', '.join(redone)} was redone")
    if changed:
        state = "finished" if row.status == "done" else "was interrupted"
        raise StageError(
            f"stage {row.name!r} {state} with other settings ({'; '.join(changed)}); "
            + redo_hint.format(stage=row.name)
        )
    if row.status != "done":
        return "resumed"
    missing = [a for a in row.artifacts if not (ctx.run.path / a).exists()]
    if missing:
        ctx.console.print(f"{row.name}: done, but {missing[0]} is missing", markup=False)
        return "resumed"
    ctx.console.print(f"[dim]{row.name}: done, skipped[/dim]")
    return "skipped"


def _execute(ctx: StageContext, module: StageModule, all_inputs: dict[str, str]) -> None:
    """Run the stage and record how it ended: failed (with why) or done (with its counts, costs
    and artifact hashes); the manifest is rewritten either way."""
    store, name = ctx.store, ctx.name
    t0 = time.monotonic()
    try:
        result = module.run(ctx)
    except BaseException as e:
        store.add_stage_seconds(name, time.monotonic() - t0)
        # the store and the manifest keep it: no secret a teacher echoed or a URL carried (redact.py)
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else redact(f"{type(e).__name__}: {e}")
        store.update_stage(name, status="failed", error=reason)
        ctx.run.write_manifest(ctx.loaded, all_inputs)
        raise
    store.add_stage_seconds(name, time.monotonic() - t0)
    # relative to the run directory; a folder moved by out_dir may lie outside it ("../…")
    artifacts = {os.path.relpath(p, ctx.run.path): hash_artifact(p) for p in result.artifacts}
    store.update_stage(
        name,
        status="done",
        finished_at=time.time(),
        counts=result.counts,
        costs=result.costs,
        artifacts=artifacts,
    )
    ctx.run.write_manifest(ctx.loaded, all_inputs)


def _fingerprint(config_hash: str, inputs: dict[str, str]) -> str:
    blob = json.dumps({"config": config_hash, "inputs": sorted(inputs.values())})
    return hashlib.sha256(blob.encode()).hexdigest()[:16]
