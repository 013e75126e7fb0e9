"""Prompt sources: each yields (prompt text, metadata) from a file, with file:line on bad rows."""

from __future__ import annotations

import hashlib
import json
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from distill4all.config import SourceConfig
from distill4all.errors import DataError


@dataclass(frozen=True)
class Prompt:
    id: str
    source: str
    text: str
    meta: dict[str, Any] = field(default_factory=dict)


def normalize(text: str) -> str:
    """Unicode NFC, unified newlines, trimmed: what is hashed and what the teacher sees."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def prompt_id(source: str, text: str) -> str:
    """Stable across runs and machines: the same prompt from the same source keeps its id."""
    return hashlib.sha256(f"{source}\0{text}".encode()).hexdigest()[:20]


def read_jsonl(cfg: SourceConfig) -> Iterator[Prompt]:
    if not cfg.path.is_file():
        raise DataError(f"source {cfg.name!r}: file not found: {cfg.path}")
    seen: set[str] = set()
    taken = 0
    with open(cfg.path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{cfg.path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get(cfg.field), str):
                raise DataError(f"{where}: no string field {cfg.field!r}")
            text = normalize(row[cfg.field])
            if not text or text in seen:
                continue
            seen.add(text)
            meta = {k: v for k, v in row.items() if k != cfg.field}
            yield Prompt(prompt_id(cfg.name, text), cfg.name, text, meta | {"line": lineno})
            taken += 1
            if cfg.limit is not None and taken >= cfg.limit:
                return


def read_source(cfg: SourceConfig) -> Iterator[Prompt]:
    return read_jsonl(cfg)
