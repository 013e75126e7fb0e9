"""Rows of a JSONL or Parquet data file, each with where it came from, for the stages that read
pairs, training data and eval items (collect's sources add skip-or-fail handling of their own);
and the rows of a JSON array file (`[{...}, {...}]`, as alpaca_data.json), read element by element
by hand because json.load gives no position for an element, and a bad row must name its line."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
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


def is_json_array(path: Path) -> bool:
    """True when the file's first non-blank character is `[`: one JSON array, not JSON Lines."""
    if path.suffix == ".parquet":
        return False
    with open(path, "rb") as f:
        while chunk := f.read(4096):
            if stripped := chunk.lstrip():
                return stripped.startswith(b"[")
    return False


def json_array_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """(`path:line (element N)`, element) for each element of a file holding one JSON array; the
    line is where the element starts (N from 0), and a syntax error names its own line."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 (byte {raw[e.start]:#04x})") from None
    lines = _Lines(text)
    decoder = json.JSONDecoder()
    pos = _skip_blank(text, text.index("[") + 1)
    index = 0
    empty = text.startswith("]", pos)
    while not empty:
        where = f"{path}:{lines.at(pos)} (element {index})"
        try:
            row, pos = decoder.raw_decode(text, pos)  # a trailing comma lands here: "Expecting value"
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if (bad := lone_surrogate(row)) is not None:
            raise DataError(f"{where}: a lone surrogate \\u{ord(bad):04x} in a string (not text)")
        yield where, row
        index += 1
        pos = _skip_blank(text, pos)
        if pos < len(text) and text[pos] == "]":
            break
        if pos >= len(text) or text[pos] != ",":
            raise DataError(f"{path}:{lines.at(pos)}: not valid JSON (expected ',' or ']' after element {index - 1})")
        pos = _skip_blank(text, pos + 1)
    if (after := _skip_blank(text, pos + 1)) < len(text):
        raise DataError(f"{path}:{lines.at(after)}: not valid JSON (more after the array's closing ']')")


class _Lines:
    """Line numbers of increasing positions in a text, counted once through (not from the start
    for each of 50,000 elements)."""

    def __init__(self, text: str) -> None:
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _skip_blank(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


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


_THINK = re.compile(r"^\s*<think>(.*?)(</think>|$)\s*", re.DOTALL)


REASONING_FIELDS = ("reasoning_content", "reasoning")
"""Where endpoints put a reasoning model's thinking: vLLM and DeepSeek's field, then Ollama's."""


def given_reasoning(fields: Mapping[str, Any]) -> Any:
    """The reasoning a message or a pairs row gives apart from its answer, if any (any type)."""
    return next((fields[k] for k in REASONING_FIELDS if fields.get(k)), None)


def split_reasoning(
    text: str | None, reasoning: object, finish: str | None
) -> tuple[str | None, str | None, str | None]:
    """(answer, reasoning, finish reason) of a reasoning model's answer: the reasoning given apart
    (given_reasoning), else a leading `<think>…</think>` block taken out of the text. An unclosed
    block is reasoning cut off: where the answer said it stopped (or said nothing), it ran out."""
    if isinstance(reasoning, str) and reasoning.strip():
        return text, reasoning.strip(), finish
    m = _THINK.match(text) if text is not None and "<think>" in text[:64] else None
    if text is None or m is None:
        return text, None, finish
    cut = not m.group(2) and finish in (None, "stop", "unknown")
    return text[m.end() :], m.group(1).strip(), "length" if cut else finish
