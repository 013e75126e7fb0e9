"""The collection ledger in the run store: prompts, one task per (prompt, teacher), answers.

A task goes pending → inflight → done | failed. The answer row and the task's `done` are written
in one transaction, and (prompt, teacher, sample) is unique, so a killed collector that reruns
answers every prompt exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from distill4all.collect.sources import Prompt
from distill4all.store import Store


@dataclass(frozen=True)
class Task:
    prompt_id: str
    teacher: str
    text: str


@dataclass(frozen=True)
class Answer:
    task: Task
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    params: dict[str, Any]


def add_prompts(store: Store, prompts: Iterable[Prompt], teachers: list[str], batch: int = 1000) -> int:
    """Insert prompts and their pending tasks; already present ones are left untouched."""
    added = 0
    buf: list[Prompt] = []

    def flush() -> None:
        nonlocal added
        now = time.time()
        with store.transaction() as db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO prompts (id, source, text, meta, created_at) VALUES (?, ?, ?, ?, ?)",
                [(p.id, p.source, p.text, json.dumps(p.meta), now) for p in buf],
            )
            added += db.total_changes - before
            db.executemany(
                "INSERT OR IGNORE INTO tasks (prompt_id, teacher, state, updated_at) VALUES (?, ?, 'pending', ?)",
                [(p.id, t, now) for p in buf for t in teachers],
            )
        buf.clear()

    for p in prompts:
        buf.append(p)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return added


def requeue_inflight(store: Store) -> int:
    """Tasks left in flight by a killed run go back to pending (their answer never landed)."""
    with store.transaction() as db:
        cur = db.execute("UPDATE tasks SET state = 'pending' WHERE state = 'inflight'")
        return cur.rowcount


def pending(store: Store, teacher: str, limit: int) -> list[Task]:
    rows = store.db.execute(
        "SELECT t.prompt_id, t.teacher, p.text FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
        " WHERE t.teacher = ? AND t.state = 'pending' ORDER BY p.created_at, p.id LIMIT ?",
        (teacher, limit),
    ).fetchall()
    return [Task(r[0], r[1], r[2]) for r in rows]


def mark_inflight(store: Store, tasks: list[Task]) -> None:
    with store.transaction() as db:
        db.executemany(
            "UPDATE tasks SET state = 'inflight', attempts = attempts + 1, updated_at = ?"
            " WHERE prompt_id = ? AND teacher = ?",
            [(time.time(), t.prompt_id, t.teacher) for t in tasks],
        )


def record(store: Store, answers: list[Answer], failures: list[tuple[Task, str]]) -> None:
    """Write answers and failures together with their tasks' new state: all or nothing."""
    now = time.time()
    with store.transaction() as db:
        db.executemany(
            "INSERT INTO responses (prompt_id, teacher, sample, model, text, finish_reason,"
            " prompt_tokens, completion_tokens, latency_s, params, created_at)"
            " VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (a.task.prompt_id, a.task.teacher, a.model, a.text, a.finish_reason,
                 a.prompt_tokens, a.completion_tokens, a.latency_s, json.dumps(a.params), now)
                for a in answers
            ],
        )  # fmt: skip
        db.executemany(
            "UPDATE tasks SET state = 'done', last_error = NULL, updated_at = ? WHERE prompt_id = ? AND teacher = ?",
            [(now, a.task.prompt_id, a.task.teacher) for a in answers],
        )
        db.executemany(
            "UPDATE tasks SET state = 'failed', last_error = ?, updated_at = ? WHERE prompt_id = ? AND teacher = ?",
            [(err, now, t.prompt_id, t.teacher) for t, err in failures],
        )


def counts(store: Store) -> dict[str, Any]:
    by_state = dict(store.db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
    by_source = dict(store.db.execute("SELECT source, COUNT(*) FROM prompts GROUP BY source").fetchall())
    tokens = store.db.execute(
        "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0) FROM responses"
    ).fetchone()
    return {
        "prompts": sum(by_source.values()),
        "prompts_by_source": by_source,
        "answered": by_state.get("done", 0),
        "failed": by_state.get("failed", 0),
        "pending": by_state.get("pending", 0) + by_state.get("inflight", 0),
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
    }


def reset(store: Store) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM decisions")
        db.execute("DELETE FROM responses")
        db.execute("DELETE FROM tasks")
        db.execute("DELETE FROM prompts")
