"""The store's schema: tables, and the migrations that bring an older store up to date.

The schema version lives in `PRAGMA user_version`; `MIGRATIONS[i]` takes a store from version i
to i + 1, each in its own transaction, so an old run directory opens in a newer distill4all.
"""

from __future__ import annotations

import sqlite3

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
    # 2 -> 3: a teacher's top-K logprobs per answer token (format in store/logprobs.py)
    """
    CREATE TABLE response_logprobs (
        response_id INTEGER PRIMARY KEY REFERENCES responses (id),
        k INTEGER NOT NULL,              -- alternatives asked for per token (top_logprobs)
        n_tokens INTEGER NOT NULL,       -- answer tokens
        data BLOB NOT NULL               -- sampled token + top-K per token: bytes and float16 logprobs
    );
    """,
    # 3 -> 4: how an answer's tokens were counted; its cost is an estimate unless the teacher reported them
    """
    ALTER TABLE responses ADD COLUMN usage TEXT NOT NULL DEFAULT 'reported';  -- else e.g. 'tokenizer of X'
    """,
    # 4 -> 5: a reasoning model's thinking, kept apart from its answer
    """
    ALTER TABLE responses ADD COLUMN reasoning TEXT;
    """,
    # 5 -> 6: the ledger of the files each stage wrote (store/outputs.py); a store that already ran
    # stages adopts the files at its stages' names, which it wrote before there was a ledger
    """
    CREATE TABLE outputs (
        path TEXT PRIMARY KEY,           -- relative to the run directory when inside it, else absolute
        stage TEXT NOT NULL,
        claimed_at REAL NOT NULL
    );
    CREATE INDEX outputs_stage ON outputs (stage);
    INSERT INTO meta (key, value) SELECT 'outputs_adopt', '1' WHERE EXISTS (SELECT 1 FROM stages);
    """,
]
SCHEMA_VERSION = len(MIGRATIONS)


def split_sql(script: str) -> list[str]:
    """Split a migration into statements (sqlite3's executescript would COMMIT our transaction)."""
    out, buf = [], ""
    for piece in script.split(";"):
        buf += piece + ";"
        if sqlite3.complete_statement(buf):  # a ';' inside a string literal does not end it
            if buf.strip().strip(";").strip():
                out.append(buf.strip())
            buf = ""
    return out
