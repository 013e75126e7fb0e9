"""Table `file_hashes`: sha256 of input files, cached by (path, size, mtime) so big files hash once."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from distill4all.atomic import sha256_file

if TYPE_CHECKING:
    from distill4all.store.db import Store


def sha256(store: Store, path: Path) -> str:
    """sha256 of a file, computed once per (path, size, mtime)."""
    st = path.stat()
    key = str(path.resolve())
    row = store.db.execute(
        "SELECT sha256 FROM file_hashes WHERE path = ? AND size = ? AND mtime_ns = ?",
        (key, st.st_size, st.st_mtime_ns),
    ).fetchone()
    if row is not None:
        return str(row[0])
    digest = sha256_file(path)
    with store.transaction() as db:
        db.execute(
            "INSERT OR REPLACE INTO file_hashes VALUES (?, ?, ?, ?)",
            (key, st.st_size, st.st_mtime_ns, digest),
        )
    return digest
