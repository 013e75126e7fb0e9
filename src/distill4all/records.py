"""Rows of a JSONL or Parquet data file, each with where it came from, for the stages that read
pairs, training data and eval items (collect's sources add skip-or-fail handling of their own)."""

from __future__ import annotations

import json
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
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            yield f"{path}:{lineno}", row
