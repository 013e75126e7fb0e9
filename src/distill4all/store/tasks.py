"""Table `tasks`, the request ledger: one task per (prompt, teacher, sample), and its answer.

A task goes pending → inflight → done | failed. The answer row and the task's `done` are written
in one transaction, and (prompt, teacher, sample) is unique, so a killed collector that reruns
answers every prompt exactly once; tasks found in flight at start never got their answer stored
and go back to pending. Collection and eval's judge both ask their teachers through it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from distill4all.redact import redact
from distill4all.store import logprobs as logprobs_table
from distill4all.store import prompts as prompts_table
from distill4all.store.prompts import Prompt

if TYPE_CHECKING:
    from distill4all.store.db import Store


@dataclass(frozen=True)
class Task:
    prompt_id: str
    teacher: str
    sample: int
    text: str


USAGE_REPORTED = "reported"  # an answer's tokens as its teacher reported them; else how they were counted


@dataclass(frozen=True)
class Answer:
    task: Task
    model: str
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float
    params: dict[str, Any]
    logprobs: logprobs_table.Encoded | None = None  # stored with the answer, in its transaction
    usage: str = USAGE_REPORTED  # else how the tokens were counted: the cost is an estimate
    reasoning: str | None = None  # a reasoning model's thinking, apart from its answer


@dataclass(frozen=True)
class Failure:
    task: Task
    error: str
    permanent: bool


def add_prompts(store: Store, prompts: Iterable[Prompt], teachers: list[tuple[str, int]], batch: int = 2000) -> int:
    """Insert prompts and a pending task per (teacher, sample); rows already there are kept."""
    added = 0
    buf: list[Prompt] = []

    def flush() -> None:
        nonlocal added
        now = time.time()
        with store.transaction() as db:
            added += prompts_table.insert(
                db, [(p.id, p.source, p.text, json.dumps(p.meta, default=str), now) for p in buf]
            )
            db.executemany(
                "INSERT OR IGNORE INTO tasks (prompt_id, teacher, sample, state, updated_at)"
                " VALUES (?, ?, ?, 'pending', ?)",
                [(p.id, name, s, now) for p in buf for name, samples in teachers for s in range(samples)],
            )
        buf.clear()

    for p in prompts:
        buf.append(p)
        if len(buf) >= batch:
            flush()
    if buf:
        flush()
    return added


def requeue(store: Store) -> int:
    """Back to pending: tasks left in flight by a killed run, and transient failures of past runs."""
    with store.transaction() as db:
        cur = db.execute(
            "UPDATE tasks SET state = 'pending' WHERE state = 'inflight' OR (state = 'failed' AND permanent = 0)"
        )
        return cur.rowcount


def count_pending(store: Store, teacher: str) -> int:
    return store.count("SELECT COUNT(*) FROM tasks WHERE teacher = ? AND state = 'pending'", (teacher,))


def unanswered(store: Store, teacher: str) -> list[Task]:
    """A teacher's tasks that may still be asked (pending, or failed but not for good); none claimed."""
    rows = store.db.execute(
        "SELECT t.prompt_id, t.sample, p.text FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
        " WHERE t.teacher = ? AND t.state IN ('pending', 'failed') AND t.permanent = 0 ORDER BY p.created_at, p.id",
        (teacher,),
    ).fetchall()
    return [Task(r[0], teacher, r[1], r[2]) for r in rows]


def claim(store: Store, teacher: str, limit: int) -> list[Task]:
    """Take up to `limit` pending tasks and mark them in flight, in one transaction."""
    with store.transaction() as db:
        rows = db.execute(
            "SELECT t.prompt_id, t.sample, p.text FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
            " WHERE t.teacher = ? AND t.state = 'pending' ORDER BY p.created_at, p.id, t.sample LIMIT ?",
            (teacher, limit),
        ).fetchall()
        now = time.time()
        db.executemany(
            "UPDATE tasks SET state = 'inflight', attempts = attempts + 1, updated_at = ?"
            " WHERE prompt_id = ? AND teacher = ? AND sample = ?",
            [(now, r[0], teacher, r[1]) for r in rows],
        )
    return [Task(r[0], teacher, r[1], r[2]) for r in rows]


def release(store: Store, tasks: list[Task]) -> None:
    """Claimed tasks that were never sent (a clean stop) go back to pending."""
    with store.transaction() as db:
        db.executemany(
            "UPDATE tasks SET state = 'pending'"
            " WHERE prompt_id = ? AND teacher = ? AND sample = ? AND state = 'inflight'",
            [(t.prompt_id, t.teacher, t.sample) for t in tasks],
        )


def record(store: Store, answers: list[Answer], failures: list[Failure]) -> int:
    """Write answers and failures with their tasks' new state, all or nothing.

    Returns how many answers were new; an answer already stored (e.g. a Batch results file read
    twice) is ignored, so nothing is ever stored twice. An answer's logprobs are written only with
    a new answer, keyed to its id: never attached to an answer stored before. A failure's error is
    stored without the secrets a teacher may echo in it (redact.py).
    """
    now = time.time()
    new = 0
    with store.transaction() as db:
        for a in answers:
            cur = db.execute(
                "INSERT OR IGNORE INTO responses (prompt_id, teacher, sample, model, text, finish_reason,"
                " prompt_tokens, completion_tokens, latency_s, cost_usd, params, created_at, usage, reasoning)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (a.task.prompt_id, a.task.teacher, a.task.sample, a.model, a.text, a.finish_reason,
                 a.prompt_tokens, a.completion_tokens, a.latency_s, a.cost_usd, json.dumps(a.params), now, a.usage,
                 a.reasoning),
            )  # fmt: skip
            if cur.rowcount == 1:
                new += 1
                if a.logprobs is not None and cur.lastrowid is not None:
                    logprobs_table.insert(db, cur.lastrowid, a.logprobs)
        db.executemany(
            "UPDATE tasks SET state = 'done', last_error = NULL, updated_at = ?"
            " WHERE prompt_id = ? AND teacher = ? AND sample = ?",
            [(now, a.task.prompt_id, a.task.teacher, a.task.sample) for a in answers],
        )
        db.executemany(
            "UPDATE tasks SET state = 'failed', last_error = ?, permanent = ?, updated_at = ?"
            " WHERE prompt_id = ? AND teacher = ? AND sample = ? AND state != 'done'",
            [
                (redact(f.error), int(f.permanent), now, f.task.prompt_id, f.task.teacher, f.task.sample)
                for f in failures
            ],
        )
    return new


def counts(store: Store, *, final: bool = False) -> dict[str, Any]:
    """The ledger's counts; `final` adds the answers that came without the logprobs asked for (a
    scan of every answer's request, so not for the progress shown while collecting)."""
    by_state = dict(store.db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
    by_source = dict(store.db.execute("SELECT source, COUNT(*) FROM prompts GROUP BY source").fetchall())
    tokens = store.db.execute(
        "SELECT COALESCE(SUM(prompt_tokens), 0), COALESCE(SUM(completion_tokens), 0), COALESCE(SUM(cost_usd), 0),"
        " COALESCE(SUM(usage != ?), 0) FROM responses",
        (USAGE_REPORTED,),
    ).fetchone()
    with_logprobs = logprobs_table.totals(store)
    return {
        "prompts": sum(by_source.values()),
        "prompts_by_source": by_source,
        "answered": by_state.get("done", 0),
        "failed": by_state.get("failed", 0),
        "pending": by_state.get("pending", 0) + by_state.get("inflight", 0),
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "cost_usd": round(tokens[2], 6),
        "cost_estimated_answers": tokens[3],  # answers without usage, their tokens counted here
        "logprob_tokens": with_logprobs.tokens,
        "logprob_bytes_per_token": round(with_logprobs.bytes / with_logprobs.tokens, 1) if with_logprobs.tokens else 0,
    } | ({"answers_without_logprobs": logprobs_table.missing(store)} if final else {})


def failures(store: Store, *, permanent: bool) -> list[tuple[str, str]]:
    """(teacher, error) of each failed task, permanent ones or those a rerun asks again, oldest first."""
    rows = store.db.execute(
        "SELECT teacher, COALESCE(last_error, '') FROM tasks WHERE state = 'failed' AND permanent = ?"
        " ORDER BY updated_at, prompt_id",
        (int(permanent),),
    )
    return [(str(t), str(e)) for t, e in rows]


def spent_usd(store: Store) -> float:
    return float(store.db.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM responses").fetchone()[0])


def reset(store: Store) -> None:
    with store.transaction() as db:
        db.execute("DELETE FROM decisions")
        logprobs_table.reset(db)
        db.execute("DELETE FROM responses")
        db.execute("DELETE FROM tasks")
        db.execute("DELETE FROM prompts")
