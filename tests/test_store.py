"""The run store and atomic artifacts survive a SIGKILL at any moment; a store the machine fails
(damaged, read-only, a full disk) is one line naming it, and loses nothing."""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CliResult, cli_command, run_cli, store_query, write_config, write_jsonl
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


# --- the machine at fault: a damaged store, a read-only folder, a full disk, a symlink loop ------


def collected_run(tmp_path: Path, url: str, n: int = 6, run_dir: str = "run", **collect: Any) -> Path:
    """A config whose collect stage has the stub teacher answer `n` prompts (the source lies
    outside the run directory)."""
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question number {i}?"} for i in range(n)])
    teacher = {"name": "stub", "model": "stub", "base_url": url, "max_tokens": 8, "concurrency": 1}
    data = {"name": "t", "run_dir": run_dir,
            "collect": {"sources": [{"name": "qs", "path": "prompts.jsonl"}], "teachers": [teacher], **collect}}  # fmt: skip
    return write_config(tmp_path / "run.yaml", data)


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(r: CliResult) -> str:
    assert r.code == 2, r.output
    assert "internal error" not in r.output and "Traceback" not in r.output, r.output
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr
    return lines[0]


def test_a_damaged_store_is_one_line_naming_it_and_is_left_as_it_is(tmp_path: Path, stub_teacher: str) -> None:
    config = collected_run(tmp_path, stub_teacher)
    assert run_cli("collect", "run", config).code == 0
    store = tmp_path / "run" / "store.sqlite"
    whole = store.read_bytes()
    damages = {
        "it is damaged": whole[: len(whole) // 3],  # cut short: pages the schema points to are gone
        "it is not a SQLite database": b"this is not a database at all\n" * 100,  # another file in its place
    }
    for why, damaged in damages.items():
        store.write_bytes(damaged)
        for args in (("status", tmp_path / "run"), ("collect", "run", config)):
            line = one_error_line(run_cli(*args))
            assert re.match(rf"error: \S*{re.escape(str(store.relative_to(tmp_path)))}: cannot use the run store: {why}",
                            line), line  # fmt: skip
            assert store.read_bytes() == damaged  # nothing was "repaired" or written over


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` made read-only for real: a read-only bind mount for root (who ignores file modes),
    the folder's mode for anyone else."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if not _mount("--bind", folder, folder):
        pytest.skip("running as root without the right to mount: no way to make a folder read-only")
    try:
        if not _mount("-o", "remount,ro,bind", folder):
            pytest.skip("running as root without the right to remount read-only")
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def _mount(*args: str | Path) -> bool:
    try:
        return subprocess.run(["mount", *map(str, args)], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


def test_a_read_only_run_directory_shows_its_status_and_refuses_to_run_in_one_line(
    tmp_path: Path, stub_teacher: str
) -> None:
    config = collected_run(tmp_path, stub_teacher)
    assert run_cli("collect", "run", config).code == 0
    run_dir = tmp_path / "run"
    before = files_of(run_dir)
    with read_only(run_dir):
        r = run_cli("status", run_dir)
        assert r.code == 0 and re.search(r"collect\s+│\s+done", r.stdout), r.output  # reading needs no writing
        for args in (("collect", "run", config), ("collect", "run", config, "--force")):
            line = one_error_line(run_cli(*args))
            assert line.startswith(f"error: {run_dir / 'store.sqlite'}: cannot use the run store: "), line
            assert "folder is read-only" in line, line
    assert files_of(run_dir) == before


@contextlib.contextmanager
def small_disk(folder: Path, size: int) -> Iterator[None]:
    """A tmpfs of `size` bytes mounted at `folder` (root only)."""
    folder.mkdir()
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", folder):
        pytest.skip("mounting a small tmpfs needs root and the right to mount")
    try:
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def _file_size_limit(limit: int) -> Callable[[], None]:
    def preexec() -> None:  # Python ignores SIGXFSZ: a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return preexec


@pytest.mark.parametrize("full", ["a full disk", "a file-size limit"])
def test_a_full_disk_is_one_line_naming_the_store_and_keeps_every_answer(
    tmp_path: Path, stub_teacher: str, full: str
) -> None:
    """The disk fills mid-collection: the stage ends with one line naming the store and the cause,
    the answers committed before stay, and once there is room a rerun answers the rest, each once."""
    config = collected_run(tmp_path, stub_teacher, n=200, run_dir="disk/run", batch_size=2)
    store = tmp_path / "disk" / "run" / "store.sqlite"
    with contextlib.ExitStack() as stack:
        if full == "a full disk":
            stack.enter_context(small_disk(tmp_path / "disk", 8 << 20))
            filler = tmp_path / "disk" / "filler"
            filler.write_bytes(b"\0" * ((8 << 20) - (1200 << 10)))  # ~1.2 MB left: some answers fit
            preexec, cause = None, "the disk is full"
        else:
            preexec, cause = _file_size_limit(1 << 20), "reading or writing it failed"
        p = subprocess.run(cli_command("collect", "run", config), capture_output=True, text=True, preexec_fn=preexec)
        line = one_error_line(CliResult(p.returncode, p.stdout, p.stderr))
        assert line.startswith(f"error: {store}: cannot use the run store: {cause}"), line
        kept = store_query(store.parent, "SELECT prompt_id, text FROM responses")
        assert 0 < len(kept) < 200
        if full == "a full disk":
            filler.unlink()
        r = run_cli("collect", "run", config)
        assert r.code == 0 and "collect: resumed" in r.stdout, r.output
        after = store_query(store.parent, "SELECT prompt_id, text FROM responses")
        assert len(after) == len({pid for pid, _ in after}) == 200 and set(kept) <= set(after)


def test_a_symlink_loop_in_a_source_path_or_the_run_dir_is_one_line_naming_it(
    tmp_path: Path, stub_teacher: str
) -> None:
    (tmp_path / "run-loop").symlink_to("run-loop")
    config = collected_run(tmp_path, stub_teacher, run_dir="run-loop")
    for args in (("collect", "run", config), ("status", tmp_path / "run-loop")):
        line = one_error_line(run_cli(*args))
        assert line == (f"error: run directory {tmp_path / 'run-loop'} is a symlink that cannot be followed: "
                        "Too many levels of symbolic links"), line  # fmt: skip
    config = collected_run(tmp_path, stub_teacher)
    (tmp_path / "prompts.jsonl").unlink()
    (tmp_path / "loop").symlink_to("prompts.jsonl")
    (tmp_path / "prompts.jsonl").symlink_to("loop")
    line = one_error_line(run_cli("collect", "run", config))
    assert line == f"error: source 'qs': cannot read {tmp_path / 'prompts.jsonl'}: Too many levels of symbolic links"


def test_a_full_disk_is_named_even_when_recording_the_failure_fails_too(tmp_path: Path, stub_teacher: str) -> None:
    """The prompts alone overflow the disk: the stage fails on the store, and writing the manifest
    that records it fails as well; the line names the first fault, not the one that followed."""
    config = collected_run(tmp_path, stub_teacher, run_dir="disk/run")
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}? " + "x" * 300} for i in range(3000)])
    run_dir = tmp_path / "disk" / "run"
    with small_disk(tmp_path / "disk", 512 << 10):
        line = one_error_line(run_cli("collect", "run", config))
        assert line.startswith(f"error: {run_dir / 'store.sqlite'}: cannot use the run store: the disk is full"), line
        line = one_error_line(run_cli("collect", "run", config))  # the resumed stage's first write
        assert re.match(rf"error: {re.escape(str(run_dir))}/(manifest\.json: No space left on device|store\.sqlite: "
                        "cannot use the run store: the disk is full)", line), line  # fmt: skip


def test_atomic_writes_to_a_full_disk_name_their_file_and_leave_nothing(tmp_path: Path) -> None:
    """A write's own error names no file; the stages' artifacts are written through atomic, which
    names it, so the CLI's line can (a library writing the temp path, or atomic itself)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    disk = tmp_path / "disk"
    with small_disk(disk, 64 << 10):
        with (
            pytest.raises(OSError, match="No space left on device") as e,
            atomic.output_file(disk / "big.parquet") as tmp,
        ):
            pq.write_table(pa.table({"x": list(range(100_000))}), tmp)
        assert e.value.filename == str(disk / "big.parquet")
        with pytest.raises(OSError, match="No space left on device") as e:
            atomic.write_bytes(disk / "big.bin", b"x" * 200_000)
        assert e.value.filename == str(disk / "big.bin")
        assert list(disk.iterdir()) == []  # no temp file left behind
