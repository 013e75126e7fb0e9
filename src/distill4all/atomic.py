"""Crash-safe file output: every artifact is written beside its final name and renamed into place.

A reader therefore sees either the previous complete artifact or the new complete one, never a
half-written file, whatever moment the writer is killed at. Leftover temp paths carry the
`.tmp-` marker so that `clean_temp` can sweep them on the next run.

Temp files and folders are created by hand rather than with tempfile.mkstemp/mkdtemp, which make
them 0600/0700: renamed into place, artifacts would stay unreadable to anyone else. Created with
0666/0777, the process umask gives them the usual modes (0644 and 0755 under umask 022).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEMP_MARK = ".tmp-"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_name(path: Path) -> Path:
    return path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """An open, new temp file beside `path`, with the mode the umask gives (not mkstemp's 0600)."""
    while True:
        tmp = _temp_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def _new_temp_dir(path: Path) -> Path:
    """A new empty temp folder beside `path`, with the mode the umask gives (not mkdtemp's 0700)."""
    while True:
        tmp = _temp_name(path)
        try:
            tmp.mkdir(0o777)
            return tmp
        except FileExistsError:
            continue


def write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def output_file(path: Path) -> Iterator[Path]:
    """Yield a temp path to write (by any library); it is renamed to `path` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_temp_dir(path)
    try:
        yield tmp
        old = None
        if path.exists():
            old = path.with_name(f"{path.name}{TEMP_MARK}old-{os.getpid()}")
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_temp(folder: Path) -> list[Path]:
    """Remove temp leftovers of killed writers anywhere under `folder`; return what was removed."""
    removed: list[Path] = []
    if not folder.exists():
        return removed
    for p in sorted(folder.rglob(f"*{TEMP_MARK}*"), key=lambda q: len(q.parts), reverse=True):
        if not p.exists():
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
