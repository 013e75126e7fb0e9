"""Table `meta`: key/value facts about the store itself (run name, creation time)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill4all.store.db import Store


def get(store: Store, key: str) -> str | None:
    row = store.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def items(store: Store) -> dict[str, str]:
    return {str(k): str(v) for k, v in store.db.execute("SELECT key, value FROM meta")}


def insert(store: Store, values: dict[str, str]) -> None:
    """Add facts in one transaction; a key already set is an error (facts are written once)."""
    with store.transaction() as db:
        db.executemany("INSERT INTO meta VALUES (?, ?)", list(values.items()))
