"""Table `prompts`: what a teacher is asked. One id rule for every stage that adds prompts."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill4all.store.db import Store


@dataclass(frozen=True)
class Prompt:
    id: str
    source: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def prompt_id(source: str, text: str) -> str:
    """Stable across runs and machines: the same prompt from the same source keeps its id."""
    return hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:20]


def text_of(store: Store, pid: str) -> str | None:
    row = store.db.execute("SELECT text FROM prompts WHERE id = ?", (pid,)).fetchone()
    return None if row is None else str(row[0])


def insert(db: sqlite3.Connection, rows: Iterable[tuple[str, str, str, str, float]]) -> int:
    """(id, source, text, meta JSON, created_at) rows, inside the caller's transaction; a prompt
    already stored is kept as it is. Returns how many were new."""
    before = db.total_changes
    db.executemany("INSERT OR IGNORE INTO prompts (id, source, text, meta, created_at) VALUES (?, ?, ?, ?, ?)", rows)
    return db.total_changes - before
