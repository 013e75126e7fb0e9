"""Table `decisions`: curation's verdict on each response, kept or dropped, and why."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from distill4all.store.db import Store


class Decision(NamedTuple):
    response_id: int
    rules: list[str]  # the rules that dropped it; none: kept
    cluster: str | None
    details: dict[str, str]  # rule → why
    topic: str | None
    subtopic: str | None
    x: float | None  # map coordinates, for the rows on the map
    y: float | None


def replace_all(store: Store, decisions: Iterable[Decision]) -> None:
    """Replace every decision at once: a killed curation leaves the previous complete set."""
    now = time.time()
    rows = [
        (d.response_id, 0 if d.rules else 1, json.dumps(d.rules), d.cluster, now,
         json.dumps(d.details, ensure_ascii=False), d.topic, d.subtopic, d.x, d.y)
        for d in decisions
    ]  # fmt: skip
    with store.transaction() as db:  # rows built first: the write lock is held only to write
        db.execute("DELETE FROM decisions")
        db.executemany(
            "INSERT INTO decisions (response_id, kept, rules, cluster, decided_at, details, topic, subtopic, x, y)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )


def clear(store: Store) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM decisions")


def kept_by_model(store: Store) -> dict[str, int]:
    """Kept pairs per teacher model id (`import` for imported pairs) of every model that answered, most first."""
    rows = store.db.execute(
        "SELECT r.model, COALESCE(SUM(d.kept), 0) AS n FROM responses r LEFT JOIN decisions d"
        " ON d.response_id = r.id GROUP BY r.model ORDER BY n DESC, r.model"
    )
    return {str(model): int(n) for model, n in rows}
