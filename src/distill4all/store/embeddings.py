"""Table `embeddings`: curation's embedding cache, float32 vectors keyed by model and text hash."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distill4all.store.db import Store

_MAX_PARAMS = 900  # under SQLite's smallest limit on bound parameters (999)


def cached(store: Store, model: str, hashes: Sequence[str]) -> dict[str, bytes]:
    """The vectors already stored for `hashes` (distinct), text hash → little-endian float32 bytes."""
    out: dict[str, bytes] = {}
    for lo in range(0, len(hashes), _MAX_PARAMS):
        some = hashes[lo : lo + _MAX_PARAMS]
        marks = ",".join("?" * len(some))
        rows = store.db.execute(
            f"SELECT text_hash, vector FROM embeddings WHERE model = ? AND text_hash IN ({marks})",
            (model, *some),
        )
        out.update((h, v) for h, v in rows)
    return out


def put(store: Store, model: str, vectors: Sequence[tuple[str, bytes]]) -> None:
    """(text hash, vector bytes) pairs, in one transaction."""
    with store.transaction() as db:
        db.executemany(
            "INSERT OR REPLACE INTO embeddings (model, text_hash, vector) VALUES (?, ?, ?)",
            [(model, h, b) for h, b in vectors],
        )
