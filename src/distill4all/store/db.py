"""The connection to a run's store: pragmas, migrations, transactions, backup.

An error of the store's file or of its disk (damaged, read-only, full, a disk error) is a
StoreError naming the file, from whichever query meets it: the store's connection and cursors
translate SQLite's error codes as they are raised, so that no caller needs to.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar, overload

from distill4all.errors import RunDirError, StoreError
from distill4all.store import file_hashes, schema, stages
from distill4all.store.stages import StageRow

_DAMAGED = (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
_FAULTS = {  # SQLite's primary error codes that come from the file or the disk, never from a query
    sqlite3.SQLITE_CORRUPT: "it is damaged; it was left as it is (restore it from a copy)",
    sqlite3.SQLITE_NOTADB: "it is not a SQLite database (damaged, or another file in its place); it was left as it is",
    sqlite3.SQLITE_FULL: "the disk is full; what was stored before is kept (free space and rerun)",
    sqlite3.SQLITE_IOERR: "reading or writing it failed (a disk error, a quota, a file-size limit)",
    sqlite3.SQLITE_CANTOPEN: "it cannot be opened",
    sqlite3.SQLITE_READONLY: "it is read-only",
    sqlite3.SQLITE_PERM: "permission denied",
    sqlite3.SQLITE_BUSY: "another process holds it locked",
}


def fault(path: Path, e: sqlite3.Error) -> StoreError | None:
    """The StoreError naming the file and the cause when an SQLite error is the file's or its
    disk's; None for any other (a bug in a query, an internal error: re-raised as it is)."""
    code = getattr(e, "sqlite_errorcode", None)
    primary = code & 0xFF if isinstance(code, int) else None  # the extended code's low byte
    why = _FAULTS.get(primary) if primary is not None else None
    if why is None:
        return None
    if primary in (sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_READONLY) and not os.access(path.parent, os.W_OK):
        why += " (its folder is read-only: the store needs to write its -wal and -shm files there)"
    return StoreError(f"{path}: cannot use the run store: {why} ({e})")


class _Cursor(sqlite3.Cursor):
    """A cursor whose errors of the file or disk are StoreErrors naming the store."""

    def _raise_fault(self, e: sqlite3.Error) -> None:
        """Raise the StoreError that `e` is, if it is one; the caller re-raises any other."""
        connection = self.connection
        if isinstance(connection, _Connection) and (err := fault(connection.path, e)) is not None:
            raise err from e

    def execute(self, sql: str, parameters: Any = (), /) -> _Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> _Cursor:
        try:
            return super().executemany(sql, seq_of_parameters)
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise

    def fetchone(self) -> Any:
        try:
            return super().fetchone()
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise

    def fetchmany(self, size: int | None = 1) -> list[Any]:
        try:
            return super().fetchmany(size)
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise

    def fetchall(self) -> list[Any]:
        try:
            return super().fetchall()
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise

    def __next__(self) -> Any:  # a damaged page can be met half-way through a result
        try:
            return super().__next__()
        except sqlite3.Error as e:
            self._raise_fault(e)
            raise


_C = TypeVar("_C", bound=sqlite3.Cursor)


class _Connection(sqlite3.Connection):
    """A connection whose cursors are `_Cursor`s (sqlite3's own `execute` would make plain ones)."""

    path: Path

    @overload
    def cursor(self, factory: None = None) -> _Cursor: ...
    @overload
    def cursor(self, factory: Callable[[sqlite3.Connection], _C]) -> _C: ...
    def cursor(self, factory: Callable[[sqlite3.Connection], sqlite3.Cursor] | None = None) -> sqlite3.Cursor:
        return super().cursor(factory or _Cursor)

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, parameters: Iterable[Any], /) -> sqlite3.Cursor:
        return self.cursor().executemany(sql, parameters)


def connect(path: Path, *, readonly: bool = False, immutable: bool = False) -> sqlite3.Connection:
    """A connection to the store at `path` whose file and disk errors name it (see `fault`)."""
    uri = f"file:{path}?mode=ro&immutable=1" if immutable else f"file:{path}?mode=ro" if readonly else f"file:{path}"
    try:
        db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None, factory=_Connection)
    except sqlite3.Error as e:
        if (err := fault(path, e)) is not None:
            raise err from e
        raise
    db.path = path
    return db


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
        self.db = connect(path, readonly=readonly)
        try:
            self._open(readonly)
        except StoreError:
            self.db.close()
            if not (readonly and self._on_readonly_media()):
                raise
            # A WAL store can be read only where its -shm file can be made; in a read-only folder,
            # and with no -wal file left by a writer, the file alone holds every commit.
            self.db = connect(path, immutable=True)
            self._open(readonly)
        except BaseException:
            self.db.close()
            raise

    def _open(self, readonly: bool) -> None:
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

    def _on_readonly_media(self) -> bool:
        folder = self.path.parent
        wal = self.path.with_name(self.path.name + "-wal")
        return not os.access(folder, os.W_OK) and not wal.exists()

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
            if self.db.in_transaction:  # SQLite rolls back by itself on some errors (a full disk)
                with contextlib.suppress(sqlite3.Error, StoreError):  # keep the first error, not this one
                    self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def count(self, sql: str, params: Iterable[Any] = ()) -> int:
        return int(self.db.execute(sql, tuple(params)).fetchone()[0])

    def backup_to(self, path: Path) -> None:
        """A consistent copy of the whole store at `path`, taken while it stays open."""
        try:
            target = sqlite3.connect(path)
            try:
                self.db.backup(target)
            finally:
                target.close()
        except sqlite3.Error as e:  # a damaged page is this store's; anything else the copy's
            code = getattr(e, "sqlite_errorcode", 0)
            if (err := fault(self.path if code & 0xFF in _DAMAGED else path, e)) is not None:
                raise err from e
            raise

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
