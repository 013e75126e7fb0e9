"""Table `outputs`: the ledger of every file and folder a stage of this run wrote.

A path is claimed before it is first written (by the runner for a stage's fixed outputs, and by
every atomic write while the stage runs), so the ledger always holds at least what is on disk.
A claim refuses a path that exists but is not in the ledger: the run never overwrites a file it
did not write. `--force` removes exactly the stage's claimed paths, and nothing else in its folder.

Claims can come from worker threads (an atomic write in a thread pool); SQLite connections belong
to the thread that opened them, so those claims use a connection of their own.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from distill4all.errors import ForeignFileError, StageFailure
from distill4all.store import meta
from distill4all.store.db import connect

if TYPE_CHECKING:
    from distill4all.store.db import Store


def _key(root: Path, path: Path) -> str:
    rel = os.path.relpath(os.path.abspath(path), os.path.abspath(root))
    return os.path.abspath(path) if rel.startswith("..") else rel


def _path(root: Path, key: str) -> Path:
    return Path(key) if os.path.isabs(key) else root / key


class Ledger:
    """Claims paths for one stage of the run whose store is `store` and directory is `root`."""

    def __init__(self, store: Store, root: Path, stage: str) -> None:
        self.store, self.root, self.stage = store, root, stage
        self._thread = threading.get_ident()
        self._adopt = meta.get(store, "outputs_adopt") == "1"

    def claim(self, path: Path) -> None:
        key = _key(self.root, path)
        if threading.get_ident() == self._thread:
            self._claim(self.store.db, path, key)
            return
        db = connect(self.store.path)  # its file and disk errors name the store, as the store's own do
        try:
            self._claim(db, path, key)
        finally:
            db.close()

    def _claim(self, db: sqlite3.Connection, path: Path, key: str) -> None:
        # The path itself, or a folder it lies in (a model card inside a model folder it claimed).
        keys = [key, *(str(k) for k in Path(key).parents if str(k) not in (".", "/"))]
        row = db.execute(
            f"SELECT stage FROM outputs WHERE path IN ({', '.join('?' * len(keys))}) LIMIT 1", keys
        ).fetchone()
        if row is not None:
            if row[0] != self.stage:
                # One stage's file is never rewritten by another: a layout error, not the user's.
                raise StageFailure(f"{path} belongs to stage {row[0]}, not {self.stage}")
            return
        if os.path.lexists(path) and not self._adopt:
            raise ForeignFileError(
                f"{path} exists and this run did not write it; stage {self.stage} would replace it: "
                "move it away, or point the run at another folder"
            )
        # Autocommit: inside the runner's own transaction it joins it, and commits with it.
        db.execute("INSERT INTO outputs (path, stage, claimed_at) VALUES (?, ?, ?)", (key, self.stage, time.time()))


def owned(store: Store, root: Path, stage: str) -> list[Path]:
    rows = store.db.execute("SELECT path FROM outputs WHERE stage = ? ORDER BY path", (stage,))
    return [_path(root, str(r[0])) for r in rows]


def remove(store: Store, root: Path, stage: str) -> list[Path]:
    """Delete every path the stage claimed (what exists of it) and forget the claims."""
    removed = []
    for path in owned(store, root, stage):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif os.path.lexists(path):
            path.unlink()
        else:
            continue
        removed.append(path)
    with store.transaction() as db:
        db.execute("DELETE FROM outputs WHERE stage = ?", (stage,))
    return removed
