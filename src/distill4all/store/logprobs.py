"""Table `response_logprobs`: a teacher's top-K log-probabilities at every token of an answer, so a
student can be trained on the teacher's distribution and not only on its text (schema v3).

One row per response that has them: `(response_id, k, n_tokens, data)`, written by the ledger
(`tasks.record`) in the transaction that stores the response itself, so it exists exactly once.

`data` (format 1) is one blob; all integers are unsigned LEB128 varints, floats little-endian:

    u8        format (1)
    varint    A: the number of alternatives over all positions
    f16 × (n_tokens + A)
              per position: the sampled token's logprob, then its alternatives', most likely first
    per position:
      varint len, bytes     the sampled token's bytes
      varint m              its alternatives (0 ≤ m ≤ k; an endpoint may return fewer than asked)
      m × (varint len, bytes)

Tokens are their UTF-8 bytes as the endpoint gives them (OpenAI's `bytes`), not ids: bytes mean
the same whatever the teacher's tokenizer, and a position's bytes may be part of a character.
The logprobs are float16 (about 3 significant digits, enough for a training target; anything
below -65504 is -inf); the floats come first so that they decode in one `numpy.frombuffer`.
Measured sizes per answer token are in docs/collect.md.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import sqlite3

    import numpy as np

    from distill4all.store.db import Store

FORMAT = 1
_F16_MIN = -65504.0
_MAX_PARAMS = 900  # under SQLite's smallest limit on bound parameters (999)

Position = tuple[bytes, float, Sequence[tuple[bytes, float]]]
"""One answer token: its bytes, its logprob, and the alternatives (bytes, logprob), best first."""


@dataclass(frozen=True)
class Encoded:
    """One answer's logprobs in the stored form: what a reply carries until it is written."""

    k: int
    n_tokens: int
    data: bytes


@dataclass(frozen=True)
class ResponseLogprobs:
    """One answer's logprobs, decoded."""

    response_id: int
    k: int
    tokens: list[bytes]  # the sampled token at each position
    logprobs: np.ndarray  # float32 (n,)
    top_tokens: list[list[bytes]]  # up to k alternatives per position, most likely first
    top_logprobs: np.ndarray  # float32 (n, k); -inf past a position's alternatives


class Totals(NamedTuple):
    responses: int
    tokens: int
    bytes: int


# --- the format ---------------------------------------------------------------------------------


def _varint(out: bytearray, n: int) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = data[i]
        i += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            return n, i
        shift += 7


def _f16(x: float) -> float:
    # float16 cannot hold less than -65504; such a token is as good as impossible
    return -math.inf if x < _F16_MIN or math.isnan(x) else min(x, 0.0)


def encode(k: int, positions: Iterable[Position]) -> Encoded:
    """The stored form of one answer's logprobs; at most `k` alternatives are kept per position."""
    floats: list[float] = []
    tokens = bytearray()
    n = alts = 0
    for token, logprob, top in positions:
        kept = top[:k]
        n += 1
        alts += len(kept)
        floats.append(_f16(logprob))
        _varint(tokens, len(token))
        tokens += token
        _varint(tokens, len(kept))
        for alt, alt_logprob in kept:
            floats.append(_f16(alt_logprob))
            _varint(tokens, len(alt))
            tokens += alt
    head = bytearray([FORMAT])
    _varint(head, alts)
    return Encoded(k, n, bytes(head) + struct.pack(f"<{len(floats)}e", *floats) + bytes(tokens))


def decode(response_id: int, k: int, n_tokens: int, data: bytes) -> ResponseLogprobs:
    import numpy as np

    if not data or data[0] != FORMAT:
        raise ValueError(f"response {response_id}: logprobs in an unknown format {data[:1]!r}")
    alts, i = _read_varint(data, 1)
    floats = np.frombuffer(data, dtype="<f2", count=n_tokens + alts, offset=i).astype(np.float32)
    i += 2 * (n_tokens + alts)
    tokens: list[bytes] = []
    top_tokens: list[list[bytes]] = []
    counts: list[int] = []
    for _ in range(n_tokens):
        size, i = _read_varint(data, i)
        tokens.append(data[i : i + size])
        i += size
        m, i = _read_varint(data, i)
        alternatives = []
        for _ in range(m):
            size, i = _read_varint(data, i)
            alternatives.append(data[i : i + size])
            i += size
        top_tokens.append(alternatives)
        counts.append(m)
    per_position = np.asarray(counts, dtype=np.int64).reshape(-1) + 1
    starts = np.cumsum(per_position) - per_position  # each position's first float: its sampled token's
    cols = np.arange(k)
    given = cols[None, :] < (per_position - 1)[:, None]  # row-major: the alternatives' order in `floats`
    top = np.full((n_tokens, k), -np.inf, dtype=np.float32)
    top[given] = floats[(starts[:, None] + 1 + cols[None, :])[given]]
    return ResponseLogprobs(response_id, k, tokens, floats[starts], top_tokens, top)


# --- the table ----------------------------------------------------------------------------------


def insert(db: sqlite3.Connection, response_id: int, encoded: Encoded) -> None:
    """Inside the ledger's transaction, with the response just stored; a row already there stays."""
    db.execute(
        "INSERT OR IGNORE INTO response_logprobs (response_id, k, n_tokens, data) VALUES (?, ?, ?, ?)",
        (response_id, encoded.k, encoded.n_tokens, encoded.data),
    )


def for_responses(store: Store, ids: Iterable[int] | None = None) -> Iterator[ResponseLogprobs]:
    """Decoded logprobs of the responses `ids` (in that order), or of every response that has them
    (in id order) when `ids` is None; responses without logprobs are left out. Streamed."""
    if ids is None:
        cur = store.db.cursor()
        cur.row_factory = None
        cur.execute("SELECT response_id, k, n_tokens, data FROM response_logprobs ORDER BY response_id")
        for row in cur:
            yield decode(*row)
        return
    wanted = list(ids)
    for lo in range(0, len(wanted), _MAX_PARAMS):
        some = wanted[lo : lo + _MAX_PARAMS]
        marks = ",".join("?" * len(some))
        rows = store.db.execute(
            f"SELECT response_id, k, n_tokens, data FROM response_logprobs WHERE response_id IN ({marks})", some
        ).fetchall()
        by_id = {r[0]: r for r in rows}
        for rid in some:
            if rid in by_id:
                yield decode(*by_id[rid])


def by_pair(store: Store) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(prompt text, answer text) → (response id, finish reason) of a response with logprobs, so a
    pairs file written from the store (collect's pairs, curate's kept pairs) finds its answers'."""
    rows = store.db.execute(
        "SELECT p.text, r.text, r.id, r.finish_reason FROM responses r JOIN prompts p ON p.id = r.prompt_id"
        " JOIN response_logprobs l ON l.response_id = r.id WHERE r.text IS NOT NULL ORDER BY r.id"
    )
    out: dict[tuple[str, str], tuple[int, str | None]] = {}
    for prompt, text, rid, finish in rows:
        out.setdefault((prompt, text), (rid, finish))
    return out


def totals(store: Store) -> Totals:
    """Responses with logprobs, their tokens, and the bytes their data takes."""
    row = store.db.execute(
        "SELECT COUNT(*), COALESCE(SUM(n_tokens), 0), COALESCE(SUM(length(data)), 0) FROM response_logprobs"
    ).fetchone()
    return Totals(int(row[0]), int(row[1]), int(row[2]))


def missing(store: Store) -> int:
    """Answers whose request asked for logprobs but that came without them."""
    return store.count(
        "SELECT COUNT(*) FROM responses r LEFT JOIN response_logprobs l ON l.response_id = r.id"
        " WHERE l.response_id IS NULL AND json_extract(r.params, '$.logprobs') = 1"
    )


def reset(db: sqlite3.Connection, teacher: str | None = None) -> None:
    """Before their responses go: every row, or a teacher's (inside the caller's transaction)."""
    if teacher is None:
        db.execute("DELETE FROM response_logprobs")
    else:
        db.execute(
            "DELETE FROM response_logprobs WHERE response_id IN (SELECT id FROM responses WHERE teacher = ?)",
            (teacher,),
        )
