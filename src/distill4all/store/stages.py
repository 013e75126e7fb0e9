"""Table `stages`: one row per stage, the runner's record of status, attempts, timings and outputs."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distill4all.store.db import Store

_JSON_COLUMNS = ("counts", "costs", "artifacts")


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


def get(store: Store, name: str) -> StageRow | None:
    row = store.db.execute("SELECT * FROM stages WHERE name = ?", (name,)).fetchone()
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


def get_all(store: Store) -> dict[str, StageRow]:
    names = [r[0] for r in store.db.execute("SELECT name FROM stages")]
    return {n: row for n in names if (row := get(store, n)) is not None}


def begin(store: Store, name: str, *, run_id: str, config_hash: str, upstream: dict[str, str], fresh: bool) -> None:
    """Mark a stage running: a fresh start resets its row, a resume bumps its attempts."""
    now = time.time()
    with store.transaction() as db:
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


def update(store: Store, name: str, **fields: Any) -> None:
    """Set counts/costs/artifacts (JSON) or other columns of a stage row."""
    cols, values = [], []
    for key, value in fields.items():
        cols.append(f"{key} = ?")
        values.append(json.dumps(value) if key in _JSON_COLUMNS else value)
    with store.transaction() as db:
        db.execute(f"UPDATE stages SET {', '.join(cols)} WHERE name = ?", (*values, name))


def add_seconds(store: Store, name: str, seconds: float) -> None:
    with store.transaction() as db:
        db.execute("UPDATE stages SET seconds = seconds + ? WHERE name = ?", (seconds, name))
