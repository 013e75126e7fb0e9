"""The connection to a run's store: pragmas, migrations, transactions, backup."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from distill4all.errors import RunDirError
from distill4all.store import file_hashes, schema, stages
from distill4all.store.stages import StageRow


class Store:
    """A connection to a run's store. Use `transaction()` for every write.

    Queries live in the table modules (`stages`, `meta`, `prompts`, `tasks`, `responses`,
    `logprobs`, `decisions`, `embeddings`, `file_hashes`), which take the store as their first argument;
    the stage-row and file-hash methods below are the runner's shorthands for them.
    """

    def __init__(self, path: Path, *, create: bool = True, readonly: bool = False) -> None:
        self.path = path
        if not path.exists() and (readonly or not create):
            raise RunDirError(f"no run store at {path}")
        uri = f"file:{path}?mode=ro" if readonly else f"file:{path}"
        self.db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA busy_timeout = 60000")
        if not readonly:
            self.db.execute("PRAGMA journal_mode = WAL")
            # NORMAL is durable against a killed process (the case we guard); only an OS crash
            # can lose the last commits, and WAL never corrupts.
            self.db.execute("PRAGMA synchronous = NORMAL")
            self.db.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        else:
            self._check_version()

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema -------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return int(self.db.execute("PRAGMA user_version").fetchone()[0])

    def _check_version(self) -> None:
        # schema.* read at call time, so a test can add a migration
        if self.version > schema.SCHEMA_VERSION:
            raise RunDirError(
                f"{self.path} has store schema version {self.version}, newer than this "
                f"distill4all understands ({schema.SCHEMA_VERSION}); upgrade distill4all"
            )

    def _migrate(self) -> None:
        self._check_version()
        for version in range(self.version, schema.SCHEMA_VERSION):
            with self.transaction():
                for statement in schema.split_sql(schema.MIGRATIONS[version]):
                    self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version = {version + 1}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE … COMMIT: all of a block's writes land, or none do."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def count(self, sql: str, params: Iterable[Any] = ()) -> int:
        return int(self.db.execute(sql, tuple(params)).fetchone()[0])

    def backup_to(self, path: Path) -> None:
        """A consistent copy of the whole store at `path`, taken while it stays open."""
        target = sqlite3.connect(path)
        try:
            self.db.backup(target)
        finally:
            target.close()

    # --- shorthands -----------------------------------------------------------------------------

    def stage(self, name: str) -> StageRow | None:
        return stages.get(self, name)

    def stages(self) -> dict[str, StageRow]:
        return stages.get_all(self)

    def begin_stage(self, name: str, *, run_id: str, config_hash: str, upstream: dict[str, str], fresh: bool) -> None:
        stages.begin(self, name, run_id=run_id, config_hash=config_hash, upstream=upstream, fresh=fresh)

    def update_stage(self, name: str, **fields: Any) -> None:
        stages.update(self, name, **fields)

    def add_stage_seconds(self, name: str, seconds: float) -> None:
        stages.add_seconds(self, name, seconds)

    def file_hash(self, path: Path) -> str:
        return file_hashes.sha256(self, path)
