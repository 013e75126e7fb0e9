"""Table `responses`: every answer received, read back as pairs with their prompts.

Answers from a teacher are written by the ledger (`tasks.record`), with their task's state;
imported pairs are written here, as answers of an `import` teacher that has no tasks.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

from distill4all.store import logprobs, prompts

if TYPE_CHECKING:
    from distill4all.store.db import Store


class Pair(NamedTuple):
    """A response with its prompt."""

    id: int
    prompt_id: str
    source: str
    prompt: str
    response: str | None
    finish_reason: str | None
    teacher: str
    sample: int
    model: str
    reasoning: str | None


def pairs(store: Store) -> Iterator[Pair]:
    """Every response with its prompt, in response-id order, streamed."""
    cur = store.db.cursor()
    cur.row_factory = None  # plain tuples: one object per row, not two
    cur.execute(
        "SELECT r.id, r.prompt_id, p.source, p.text, r.text, r.finish_reason, r.teacher, r.sample, r.model,"
        " r.reasoning"
        " FROM responses r JOIN prompts p ON p.id = r.prompt_id ORDER BY r.id"
    )
    return map(Pair._make, cur)


def answered(store: Store, teacher: str) -> set[tuple[str, int]]:
    """(prompt id, sample) of each answer a teacher gave."""
    rows = store.db.execute("SELECT prompt_id, sample FROM responses WHERE teacher = ?", (teacher,))
    return {(r[0], r[1]) for r in rows}


def mean_completion_tokens(store: Store, teacher: str) -> float | None:
    """Mean length of a teacher's answers that report one; None before the first."""
    row = store.db.execute(
        "SELECT AVG(completion_tokens) FROM responses WHERE teacher = ? AND completion_tokens > 0", (teacher,)
    ).fetchone()
    return None if row[0] is None else float(row[0])


def texts(store: Store, teacher: str) -> list[tuple[str, str | None]]:
    """(prompt id, answer text) of each answer a teacher gave."""
    rows = store.db.execute("SELECT prompt_id, text FROM responses WHERE teacher = ?", (teacher,))
    return [(r[0], r[1]) for r in rows]


def texts_with_prompt_meta(store: Store, teacher: str) -> list[tuple[dict[str, Any], str | None]]:
    """(prompt metadata, answer text) of each answer a teacher gave."""
    rows = store.db.execute(
        "SELECT p.meta, r.text FROM responses r JOIN prompts p ON p.id = r.prompt_id WHERE r.teacher = ?",
        (teacher,),
    )
    return [(json.loads(r[0]), r[1]) for r in rows]


def add_imported(
    store: Store,
    teacher: str,
    new_prompts: list[tuple[str, str, str, str]],
    answers: list[tuple[str, int, str | None, str | None, str, str | None]],
) -> None:
    """Imported pairs, in one transaction: prompts as (id, source, text, meta JSON), answers as
    (prompt id, sample, text, finish reason, params JSON, reasoning). Rows already stored are kept as they are."""
    now = time.time()
    with store.transaction() as db:
        prompts.insert(db, [(*p, now) for p in new_prompts])
        db.executemany(
            "INSERT OR IGNORE INTO responses (prompt_id, teacher, sample, model, text, finish_reason,"
            " params, created_at, reasoning) VALUES (?, ?, ?, 'import', ?, ?, ?, ?, ?)",
            [(pid, teacher, n, text, finish, params, now, why) for pid, n, text, finish, params, why in answers],
        )


def remove_teacher(store: Store, teacher: str) -> None:
    """A teacher's responses and their decisions, and the prompts nothing else uses, in one transaction."""
    with store.transaction() as db:
        db.execute(
            "DELETE FROM decisions WHERE response_id IN (SELECT id FROM responses WHERE teacher = ?)", (teacher,)
        )
        logprobs.reset(db, teacher)
        db.execute("DELETE FROM responses WHERE teacher = ?", (teacher,))
        db.execute(
            "DELETE FROM prompts WHERE id NOT IN (SELECT prompt_id FROM responses)"
            " AND id NOT IN (SELECT prompt_id FROM tasks)"
        )
