"""Crash-safe file output: every artifact is written beside its final name and renamed into place.

A reader therefore sees either the previous complete artifact or the new complete one, never a
half-written file, whatever moment the writer is killed at. A temp path is named
`.NAME.d4a-tmp-TAG` (hidden, with a marker no user writes), and `clean_temp` sweeps only names of
exactly that shape: a user's `notes.tmp-2024.txt` beside a run's files is never touched.

While a stage runs, the runner installs a claim hook (`claiming`): every path an atomic write is
about to replace is claimed first, which records it in the run's ledger of its own files and refuses
a file that exists but that the run did not write — so no stage overwrites a user's file, and
`--force` can remove exactly what a stage wrote.

Temp files and folders are created by hand rather than with tempfile.mkstemp/mkdtemp, which make
them 0600/0700: renamed into place, artifacts would stay unreadable to anyone else. Created with
0666/0777, the process umask gives them the usual modes (0644 and 0755 under umask 022).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".d4a-tmp-"
_TEMP_NAME = re.compile(r"\..+" + re.escape(TEMP_MARK) + r"[0-9a-z]+(?:-[0-9a-z]+)*")

_claim_hook: Callable[[Path], None] | None = None


def is_temp(name: str) -> bool:
    """Whether a file name is one of our temp names (and so may be swept)."""
    return _TEMP_NAME.fullmatch(name) is not None


def temp_path(path: Path, tag: str | None = None) -> Path:
    """The temp name beside `path`: unique per process and call unless a `tag` is given (a name
    several processes must agree on, e.g. the ranks of one training job)."""
    return path.with_name(f".{path.name}{TEMP_MARK}{tag or f'{os.getpid()}-{secrets.token_hex(4)}'}")


@contextlib.contextmanager
def claiming(hook: Callable[[Path], None]) -> Iterator[None]:
    """Call `hook(path)` before any atomic write replaces `path` (it may refuse by raising)."""
    global _claim_hook
    previous, _claim_hook = _claim_hook, hook
    try:
        yield
    finally:
        _claim_hook = previous


def claim(path: Path) -> None:
    """Claim a path the caller is about to write by other means than this module (a log, a
    database): recorded and checked as an atomic write's target is. A no-op outside a stage."""
    if _claim_hook is not None and not any(is_temp(part) for part in path.parts):
        _claim_hook(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """An open, new temp file beside `path`, with the mode the umask gives (not mkstemp's 0600)."""
    while True:
        tmp = temp_path(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _new_temp_dir(path: Path) -> Path:
    """A new empty temp folder beside `path`, with the mode the umask gives (not mkdtemp's 0700)."""
    while True:
        tmp = temp_path(path)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def write_bytes(path: Path, data: bytes) -> None:
    claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and (named := _naming(e, path)) is not e:
            raise named from e
        raise
    _fsync_dir(path.parent)


def _naming(e: OSError, path: Path) -> OSError:
    """A write's error naming the file it was for: the error of a write (a full disk's) names none."""
    if e.filename is None and e.errno is not None:
        return OSError(e.errno, e.strerror or os.strerror(e.errno), str(path))
    return e


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """Yield a temp path to write (by any library); it is renamed to `path` only on success."""
    claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:  # e.g. a library's write to a full disk
        if (named := _naming(e, path)) is not e:
            raise named from e
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def output_dir(path: Path, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temp directory; on success it becomes `path` in one rename.

    An existing `path` is kept unless `replace` is set; then it is moved aside first and removed
    only after the new directory is in place.
    """
    if path.exists() and not replace:
        raise FileExistsError(f"{path} exists")
    claim(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_dir(path)
    try:
        yield tmp
        old = None
        if path.exists():
            old = temp_path(path)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A temp folder in `parent` for work that is thrown away, removed on exit (and swept by
    `clean_temp` if the process is killed first)."""
    path = _new_temp_dir(parent / name)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def clean_temp(folder: Path) -> list[Path]:
    """Remove temp leftovers of killed writers under `folder`, and nothing else: only names of
    our temp shape, never through a symlink; return what was removed."""
    removed: list[Path] = []
    if not folder.is_dir() or folder.is_symlink():
        return removed
    for root, dirs, files in os.walk(folder):  # os.walk does not follow symlinked folders
        for name in [*files, *dirs]:
            if not is_temp(name):
                continue
            p = Path(root) / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
        dirs[:] = [d for d in dirs if not is_temp(d)]
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
