"""The run store: one SQLite file (WAL) that is the contract between stages.

Tables (schema version 2):
  meta        key/value facts about the store itself
  stages      one row per stage: status, attempts, timings, counts, costs, fingerprints
  prompts     every prompt gathered, with its source tag and original metadata
  tasks       the collection ledger: one row per (prompt, teacher, sample): pending/inflight/done/failed
  responses   every answer received: text, finish reason, usage, latency, request params
  decisions   curation: one row per response, kept or dropped with the rules that dropped it,
              the rules' details, its near-duplicate cluster, topic and map coordinates (v2)
  embeddings  the curation's embedding cache, keyed by model and text hash (v2)
  file_hashes sha256 of input files, cached by (path, size, mtime) so big files hash once

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes a store from version i
to i + 1, each in its own transaction, so an old run directory opens in a newer distill4all.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill4all.atomic import sha256_file
from distill4all.errors import RunDirError

MIGRATIONS: list[str] = [
    # 0 -> 1
    """
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE stages (
        name TEXT PRIMARY KEY,
        status TEXT NOT NULL CHECK (status IN ('running', 'done', 'failed')),
        run_id TEXT NOT NULL,            -- new for each fresh (not resumed) run of the stage
        config_hash TEXT NOT NULL,
        upstream TEXT NOT NULL,          -- JSON {stage: run_id} of the stages it read from
        attempts INTEGER NOT NULL DEFAULT 0,
        started_at REAL, finished_at REAL,
        seconds REAL NOT NULL DEFAULT 0, -- active time summed over attempts
        counts TEXT NOT NULL DEFAULT '{}',
        costs TEXT NOT NULL DEFAULT '{}',
        artifacts TEXT NOT NULL DEFAULT '{}',
        error TEXT
    );
    CREATE TABLE prompts (
        id TEXT PRIMARY KEY,             -- content hash + source: stable across runs
        source TEXT NOT NULL,
        text TEXT NOT NULL,
        meta TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL
    );
    CREATE INDEX prompts_source ON prompts (source);
    CREATE TABLE tasks (
        prompt_id TEXT NOT NULL REFERENCES prompts (id),
        teacher TEXT NOT NULL,
        sample INTEGER NOT NULL DEFAULT 0,  -- 0..n-1 when a teacher gives n answers per prompt
        state TEXT NOT NULL CHECK (state IN ('pending', 'inflight', 'done', 'failed')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error TEXT,
        permanent INTEGER NOT NULL DEFAULT 0,  -- 1: failed for good (e.g. HTTP 400); not retried
        updated_at REAL NOT NULL,
        PRIMARY KEY (prompt_id, teacher, sample)
    );
    CREATE INDEX tasks_state ON tasks (teacher, state);
    CREATE TABLE responses (
        id INTEGER PRIMARY KEY,
        prompt_id TEXT NOT NULL REFERENCES prompts (id),
        teacher TEXT NOT NULL,
        sample INTEGER NOT NULL DEFAULT 0,
        model TEXT NOT NULL,
        text TEXT,
        finish_reason TEXT,
        prompt_tokens INTEGER,
        completion_tokens INTEGER,
        latency_s REAL,
        cost_usd REAL NOT NULL DEFAULT 0,
        params TEXT NOT NULL DEFAULT '{}',
        created_at REAL NOT NULL,
        UNIQUE (prompt_id, teacher, sample)  -- an answer is stored exactly once
    );
    CREATE TABLE decisions (
        response_id INTEGER PRIMARY KEY REFERENCES responses (id),
        kept INTEGER NOT NULL CHECK (kept IN (0, 1)),
        rules TEXT NOT NULL DEFAULT '[]',   -- JSON list of the rules that dropped it
        cluster TEXT,
        decided_at REAL NOT NULL
    );
    CREATE TABLE file_hashes (
        path TEXT PRIMARY KEY, size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL,
        sha256 TEXT NOT NULL
    );
    """,
    # 1 -> 2: curation details, topics and map coordinates per decision; the embeddings cache
    """
    ALTER TABLE decisions ADD COLUMN details TEXT NOT NULL DEFAULT '{}';  -- JSON: rule → why
    ALTER TABLE decisions ADD COLUMN topic TEXT;
    ALTER TABLE decisions ADD COLUMN subtopic TEXT;
    ALTER TABLE decisions ADD COLUMN x REAL;
    ALTER TABLE decisions ADD COLUMN y REAL;
    CREATE TABLE embeddings (
        model TEXT NOT NULL,             -- the embedding model's key (name + content hash)
        text_hash TEXT NOT NULL,         -- sha256 of the embedded text, first 32 hex digits
        vector BLOB NOT NULL,            -- float32, little-endian
        PRIMARY KEY (model, text_hash)
    ) WITHOUT ROWID;
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass
class StageRow:
    name: str
    status: str
    run_id: str
    config_hash: str
    upstream: dict[str, str]
    attempts: int
    started_at: float | None
    finished_at: float | None
    seconds: float
    counts: dict[str, Any]
    costs: dict[str, Any]
    artifacts: dict[str, str]
    error: str | None


class Store:
    """A connection to a run's store. Use `transaction()` for every write."""

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
        if self.version > SCHEMA_VERSION:
            raise RunDirError(
                f"{self.path} has store schema version {self.version}, newer than this "
                f"distill4all understands ({SCHEMA_VERSION}); upgrade distill4all"
            )

    def _migrate(self) -> None:
        self._check_version()
        for version in range(self.version, SCHEMA_VERSION):
            with self.transaction():
                for statement in _split_sql(MIGRATIONS[version]):
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

    # --- stages -------------------------------------------------------------------------------

    def stage(self, name: str) -> StageRow | None:
        row = self.db.execute("SELECT * FROM stages WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        return StageRow(
            name=row["name"],
            status=row["status"],
            run_id=row["run_id"],
            config_hash=row["config_hash"],
            upstream=json.loads(row["upstream"]),
            attempts=row["attempts"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            seconds=row["seconds"],
            counts=json.loads(row["counts"]),
            costs=json.loads(row["costs"]),
            artifacts=json.loads(row["artifacts"]),
            error=row["error"],
        )

    def stages(self) -> dict[str, StageRow]:
        names = [r[0] for r in self.db.execute("SELECT name FROM stages")]
        return {n: row for n in names if (row := self.stage(n)) is not None}

    def begin_stage(self, name: str, *, run_id: str, config_hash: str, upstream: dict[str, str], fresh: bool) -> None:
        """Mark a stage running: a fresh start resets its row, a resume bumps its attempts."""
        now = time.time()
        with self.transaction() as db:
            if fresh:
                db.execute("DELETE FROM stages WHERE name = ?", (name,))
                db.execute(
                    "INSERT INTO stages (name, status, run_id, config_hash, upstream, attempts,"
                    " started_at) VALUES (?, 'running', ?, ?, ?, 1, ?)",
                    (name, run_id, config_hash, json.dumps(upstream), now),
                )
            else:
                db.execute(
                    "UPDATE stages SET status = 'running', attempts = attempts + 1, error = NULL WHERE name = ?",
                    (name,),
                )

    def update_stage(self, name: str, **fields: Any) -> None:
        """Set counts/costs/artifacts (JSON) or other columns of a stage row."""
        cols, values = [], []
        for key, value in fields.items():
            cols.append(f"{key} = ?")
            values.append(json.dumps(value) if key in ("counts", "costs", "artifacts") else value)
        with self.transaction() as db:
            db.execute(f"UPDATE stages SET {', '.join(cols)} WHERE name = ?", (*values, name))

    def add_stage_seconds(self, name: str, seconds: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE stages SET seconds = seconds + ? WHERE name = ?", (seconds, name))

    # --- input files --------------------------------------------------------------------------

    def file_hash(self, path: Path) -> str:
        """sha256 of a file, computed once per (path, size, mtime)."""
        st = path.stat()
        key = str(path.resolve())
        row = self.db.execute(
            "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
            (key, st.st_size, st.st_mtime_ns),
        ).fetchone()
        if row is not None:
            return str(row[0])
        digest = sha256_file(path)
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
                (key, st.st_size, st.st_mtime_ns, digest),
            )
        return digest

    # --- generic helpers ----------------------------------------------------------------------

    def count(self, sql: str, params: Iterable[Any] = ()) -> int:
        return int(self.db.execute(sql, tuple(params)).fetchone()[0])


def _split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3's executescript would COMMIT our transaction)."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):  # a ';' inside a string literal does not end it
            if buf.strip().strip(";").strip():
                out.append(buf.strip())
            buf = ""
    return out
