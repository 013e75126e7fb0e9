"""The run store and atomic artifacts survive a SIGKILL at any moment."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from distill4all import atomic
from distill4all.errors import RunDirError
from distill4all.store import SCHEMA_VERSION, Store, schema


def test_new_store_has_schema_wal_and_tables(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as s:
        assert s.version == SCHEMA_VERSION
        assert s.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in s.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {
        "meta",
        "stages",
        "prompts",
        "tasks",
        "responses",
        "response_logprobs",
        "decisions",
        "file_hashes",
    } <= tables


def test_migrations_run_in_order_from_an_old_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "s.sqlite"
    with Store(path) as s, s.transaction() as db:  # a store at today's version, with data in it
        db.execute("INSERT INTO meta VALUES ('run_name', 'old')")
    extra = "ALTER TABLE prompts ADD COLUMN lang TEXT; CREATE TABLE extra (x INTEGER);"
    monkeypatch.setattr(schema, "MIGRATIONS", [*schema.MIGRATIONS, extra])
    monkeypatch.setattr(schema, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with Store(path) as s:
        assert s.version == SCHEMA_VERSION + 1
        cols = [r[1] for r in s.db.execute("PRAGMA table_info(prompts)")]
        assert "lang" in cols
        assert s.db.execute("SELECT value FROM meta WHERE key = 'run_name'").fetchone()[0] == "old"


def test_a_store_from_a_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.close()
    with pytest.raises(RunDirError, match="newer than this distill4all understands"):
        Store(path)


def test_a_failed_transaction_writes_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as s:
        with pytest.raises(RuntimeError), s.transaction() as db:
            db.execute("INSERT INTO meta VALUES ('a', '1')")
            raise RuntimeError("boom")
        assert s.count("SELECT COUNT(*) FROM meta") == 0


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from distill4all.store import Store
    s = Store(Path(sys.argv[1]))
    batch = 0
    while True:
        with s.transaction() as db:
            db.executemany(
                "INSERT INTO prompts (id, source, text, created_at) VALUES (?, 'kill', ?, ?)",
                [(f"{batch}-{i}", "x" * 200, time.time()) for i in range(500)],
            )
        batch += 1
        print(batch, flush=True)
    """
)


def test_store_survives_sigkill_during_writes(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    for round_ in range(3):
        p = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        for _ in range(2 + round_ * 3):  # let some batches commit, then kill mid-flight
            p.stdout.readline()
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with Store(path) as s:
            assert s.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
            n = s.count("SELECT COUNT(*) FROM prompts")
            assert n > 0 and n % 500 == 0  # whole batches only: never half a transaction


ATOMIC_WRITER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from distill4all import atomic
    target = Path(sys.argv[1])
    i = 0
    while True:
        i += 1
        atomic.write_bytes(target, bytes([i % 256]) * 4_000_000)
        print(i, flush=True)
    """
)


def test_atomic_file_is_old_or_new_never_partial(tmp_path: Path) -> None:
    target = tmp_path / "artifact.bin"
    for _ in range(3):
        p = subprocess.Popen([sys.executable, "-c", ATOMIC_WRITER, str(target)], stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        p.stdout.readline()
        time.sleep(0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        data = target.read_bytes()
        assert len(data) == 4_000_000 and len(set(data)) == 1
    atomic.clean_temp(tmp_path)
    assert [q.name for q in tmp_path.iterdir()] == ["artifact.bin"]


def test_output_dir_replaces_only_on_success(tmp_path: Path) -> None:
    out = tmp_path / "model"
    with atomic.output_dir(out) as tmp:
        (tmp / "a.txt").write_text("one")
    with pytest.raises(FileExistsError), atomic.output_dir(out) as tmp:
        pass
    with pytest.raises(RuntimeError), atomic.output_dir(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("two")
        raise RuntimeError("killed half-way")
    assert (out / "a.txt").read_text() == "one"
    with atomic.output_dir(out, replace=True) as tmp:
        (tmp / "a.txt").write_text("two")
    assert (out / "a.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_file_hash_is_cached_by_size_and_mtime(tmp_path: Path) -> None:
    f = tmp_path / "data.jsonl"
    f.write_text("abc")
    with Store(tmp_path / "s.sqlite") as s:
        h1 = s.file_hash(f)
        assert h1 == atomic.sha256_file(f)
        assert s.count("SELECT COUNT(*) FROM file_hashes") == 1
        f.write_text("abcd")
        assert s.file_hash(f) != h1
