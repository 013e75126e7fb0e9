"""Rows of a JSONL or Parquet data file, each with where it came from, for the stages that read
pairs, training data and eval items (collect's sources add skip-or-fail handling of their own)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distill4all.errors import DataError


def parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`path:row N`, row) for each row, streamed a batch at a time (N from 0)."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    n = 0
    for batch in pf.iter_batches(batch_size=4096):
        for row in batch.to_pylist():
            yield f"{path}:row {n}", row
            n += 1


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for each record of a Parquet file, or of a JSONL file (`path:line`; blank
    lines skipped, a line that is not JSON an error naming it)."""
    if path.suffix == ".parquet":
        yield from parquet_rows(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if _MAY_HOLD_SURROGATE.search(line) and (bad := lone_surrogate(row)):
                raise DataError(f"{path}:{lineno}: a lone surrogate \\u{ord(bad):04x} in a string (not text)")
            yield f"{path}:{lineno}", row


# A JSON escape of a surrogate code point; a pair of them decodes to one character and leaves none.
_MAY_HOLD_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
SURROGATE = re.compile("[\ud800-\udfff]")  # a lone surrogate code point: not text


def lone_surrogate(value: Any) -> str | None:
    """The first lone surrogate in any string of a decoded JSON value (keys included), if any;
    iterative, so that no nesting depth can exhaust the stack."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if m := SURROGATE.search(node):
                return m.group()
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None
