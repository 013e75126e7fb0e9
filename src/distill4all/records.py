"""Rows of a JSONL or Parquet data file, each with where it came from, for the stages that read
pairs, training data and eval items (collect's sources add skip-or-fail handling of their own);
and the rows of a JSON array file (`[{...}, {...}]`, as alpaca_data.json), read element by element
by hand because json.load gives no position for an element, and a bad row must name its line."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from distill4all.errors import DataError


def parquet_rows(path: Path, bad: Callable[[str], Any] | None = None) -> Iterator[tuple[str, Any]]:
    """(`path:row N`, row) for each row, streamed a batch at a time (N from 0). A row that is not
    text (a string column's bytes that are not UTF-8) is a DataError naming it, or, given `bad`,
    yielded as (where, bad(why)) so that the caller may skip it."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
        depth = max((_type_depth(f.type) for f in pf.schema_arrow), default=0)
    except Exception as e:  # pyarrow raises several types for a file that is not Parquet
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    if depth >= MAX_DEPTH:  # every row nests as deep as its columns' types
        raise DataError(f"{path}: a column nests deeper than {MAX_DEPTH} levels")
    n = 0
    batches = pf.iter_batches(batch_size=4096)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged page: nothing after it can be read
            raise DataError(f"{path}:row {n}: not a readable Parquet file past this row ({e})") from None
        if batch is None:
            return
        try:
            rows: list[Any] = batch.to_pylist()
        except UnicodeDecodeError:  # find the rows that are not text, one at a time
            rows = [_parquet_row(batch, i) for i in range(batch.num_rows)]
        for row in rows:
            where = f"{path}:row {n}"
            n += 1
            if isinstance(row, _NotText):
                if bad is None:
                    raise DataError(f"{where}: {row.why}")
                yield where, bad(row.why)
            else:
                yield where, row


class _NotText:
    def __init__(self, why: str) -> None:
        self.why = why


def _parquet_row(batch: Any, i: int) -> Any:
    try:
        return batch.slice(i, 1).to_pylist()[0]
    except UnicodeDecodeError as e:
        return _NotText(f"not UTF-8 (byte {e.object[e.start]:#04x} in a string column)")


def _type_depth(t: Any) -> int:
    """How many levels of lists, structs and maps an Arrow type nests."""
    deepest, stack = 0, [(t, 0)]
    while stack:
        t, depth = stack.pop()
        deepest = max(deepest, depth)
        stack.extend((t.field(i).type, depth + 1) for i in range(t.num_fields))
    return deepest


def json_line(raw: bytes) -> tuple[Any, str | None]:
    """One line of JSON Lines decoded: (value, None), or (None, why it is not a record: not UTF-8,
    not JSON, a lone surrogate, nesting past MAX_DEPTH). The one place every JSONL reader parses
    a line, so none of them meets a value it cannot store."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {raw[e.start]:#04x} at column {e.start + 1})"
    try:
        value = json.loads(line)
    except RecursionError:
        return None, f"nests deeper than {MAX_DEPTH} levels"
    except ValueError as e:  # JSONDecodeError, or an integer past Python's 4300-digit limit
        return None, f"not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e})"
    why = unfit(value, line)
    return (None, why) if why is not None else (value, None)


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(location, row) for each record of a Parquet file, or of a JSONL file (`path:line`; blank
    lines skipped, a line that is not JSON an error naming it)."""
    if path.suffix == ".parquet":
        yield from parquet_rows(path)
        return
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            row, why = json_line(raw)
            if why is not None:
                raise DataError(f"{path}:{lineno}: {why}")
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
        start = pos
        try:
            row, pos = decoder.raw_decode(text, pos)  # a trailing comma lands here: "Expecting value"
        except RecursionError:
            raise DataError(f"{where}: nests deeper than {MAX_DEPTH} levels") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        except ValueError as e:  # an integer past Python's 4300-digit limit
            raise DataError(f"{where}: not valid JSON ({e})") from None
        if (why := unfit(row, text[start:pos])) is not None:
            raise DataError(f"{where}: {why}")
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

MAX_DEPTH = 100
"""How deep a record's lists and objects may nest. No data nests like this, and Python's JSON
decoder and encoder recurse: a value 100,000 levels deep would exhaust the stack when it is read,
stored as JSON or read back by a later stage."""


def unfit(value: Any, source: str | None = None) -> str | None:
    """Why a decoded record cannot be stored as text and JSON (a lone surrogate in a string, keys
    included; lists and objects nested past MAX_DEPTH), or None. Given the JSON `source` it was
    decoded from, a value that cannot hold either is passed without a walk (the common case)."""
    if source is not None and not (
        _MAY_HOLD_SURROGATE.search(source) or source.count("[") + source.count("{") > MAX_DEPTH
    ):
        return None
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:  # iterative, so that no depth can exhaust the stack
        node, depth = stack.pop()
        if isinstance(node, str):
            if m := SURROGATE.search(node):
                return f"a lone surrogate \\u{ord(m.group()):04x} in a string (not text)"
        elif isinstance(node, dict | list | tuple):
            if depth >= MAX_DEPTH:
                return f"nests deeper than {MAX_DEPTH} levels"
            items = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((item, depth + 1) for item in items)
    return None


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
