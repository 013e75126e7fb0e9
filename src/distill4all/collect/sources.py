"""Prompt sources: read rows from a file (or a hub dataset), turn each into a prompt, and report
every row that could not be used with its file:line.

Reading is split in three small steps so each format only says what is special about it:
  rows      — the file format: (where, dict) pairs from JSONL / JSON / CSV / Parquet / hub
  extract   — the dataset format: the prompt text and metadata of one row (OIG, StackOverflow, P3…)
  select    — the same for all: normalize, length limits, exact dedup, seeded sampling
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import os
import re
import stat
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from distill4all.config import SourceConfig
from distill4all.errors import DataError
from distill4all.records import MAX_DEPTH, SURROGATE, json_line, parquet_rows, unfit
from distill4all.store.prompts import Prompt, prompt_id


@dataclass
class SourceStats:
    rows: int = 0
    bad_rows: int = 0
    too_short: int = 0
    too_long: int = 0
    duplicates: int = 0
    sampled_out: int = 0
    kept: int = 0
    bad_examples: list[str] = field(default_factory=list)  # "file:line: why", the first few

    def as_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "bad_examples"} | {"bad_examples": self.bad_examples}


class RowError(ValueError):
    """This row cannot give a prompt (missing field, wrong type, no human turn…)."""


def normalize(text: str) -> str:
    """Unicode NFC, unified newlines, trimmed: what is hashed and what the teacher sees."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


# --- rows: file formats ------------------------------------------------------------------------

Row = tuple[str, dict[str, Any]]


def _jsonl_rows(path: Path) -> Iterator[Row | tuple[str, RowError]]:
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that row's error, not the file's
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            row, why = json_line(raw)
            if why is not None:
                yield where, RowError(why)
            elif not isinstance(row, dict):
                yield where, RowError("not a JSON object")
            else:
                yield where, row


def _json_rows(path: Path) -> Iterator[Row | tuple[str, RowError]]:
    """The elements of a JSON list (or of the list under an object's "data" key), each named by
    the line it starts on. Read element by element, so that one that is not UTF-8, holds a lone
    surrogate or nests too deep is that row's error; a file whose structure is broken is the file's."""
    # bytes that are not UTF-8 become lone surrogates (surrogateescape), found in the element's text
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    doc = _JsonText(path, text)
    pos = doc.skip(0)
    if text.startswith("[", pos):
        yield from doc.elements(pos)
        pos = doc.skip(doc.end)
    elif text.startswith("{", pos):
        found = False
        pos = doc.skip(pos + 1)
        while not text.startswith("}", pos):
            key, after = doc.value(pos)
            if not isinstance(key, str):
                doc.syntax(pos, "a key must be a string")
            pos = doc.expect(after, ":")
            if key == "data" and text.startswith("[", pos) and not found:
                found = True
                yield from doc.elements(pos)
                pos = doc.end
            else:
                pos = doc.element(pos)[1]
            pos = doc.skip(pos)
            if not text.startswith("}", pos):
                pos = doc.expect(pos, ",")
        if not found:
            raise DataError(f"{path}: a JSON source must be a list of objects (or {{'data': [...]}})")
        pos = doc.skip(pos + 1)
    else:
        raise DataError(f"{path}: a JSON source must be a list of objects (or {{'data': [...]}})")
    if pos < len(text):
        doc.syntax(pos, "more after the end of the JSON value")


class _JsonText:
    """The outer levels of a JSON source, parsed by hand (positions and lines known); each element
    is decoded on its own by the json module."""

    _TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)

    def __init__(self, path: Path, text: str) -> None:
        self.path, self.text, self.end = path, text, 0
        self.decoder = json.JSONDecoder()
        self._line, self._line_pos = 1, 0

    def line(self, pos: int) -> int:
        """The line of `pos`, counted once through the text (positions only grow)."""
        self._line += self.text.count("\n", self._line_pos, pos)
        self._line_pos = pos
        return self._line

    def skip(self, pos: int) -> int:
        while pos < len(self.text) and self.text[pos] in " \t\r\n":
            pos += 1
        return pos

    def syntax(self, pos: int, why: str) -> NoReturn:
        raise DataError(f"{self.path}:{self.line(pos)}: not valid JSON ({why})")

    def expect(self, pos: int, char: str) -> int:
        pos = self.skip(pos)
        if not self.text.startswith(char, pos):
            self.syntax(pos, f"expected {char!r}")
        return self.skip(pos + 1)

    def value(self, pos: int) -> tuple[Any, int]:
        """The value at `pos` and where it ends; a syntax error is the file's."""
        try:
            return self.decoder.raw_decode(self.text, pos)
        except json.JSONDecodeError as e:
            self.syntax(e.pos, e.msg)

    def element(self, pos: int) -> tuple[Any, int, str | None]:
        """(value, end, None), or (None, end, why) for a value the json module cannot decode (nested
        past the stack, an integer past Python's 4300-digit limit): its end is found by hand."""
        try:
            value, end = self.value(pos)
        except RecursionError:
            return None, self._end(pos), f"nests deeper than {MAX_DEPTH} levels"
        except ValueError as e:  # not a JSONDecodeError: value() made those the file's
            return None, self._end(pos), f"not valid JSON ({e})"
        return value, end, None

    _NUMBER = re.compile(r"-?[0-9]+(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?")

    def _end(self, pos: int) -> int:
        """The end of the list, object or number at `pos`, by its brackets or its digits."""
        if not self.text.startswith(("[", "{"), pos):
            if m := self._NUMBER.match(self.text, pos):
                return m.end()
            self.syntax(pos, "a value the json module cannot read")
        depth = 0
        for m in self._TOKEN.finditer(self.text, pos):
            depth += {"[": 1, "{": 1, "]": -1, "}": -1}.get(m.group(), 0)
            if depth == 0:
                return m.end()
        self.syntax(len(self.text), "a list or object is not closed")

    def elements(self, pos: int) -> Iterator[Row | tuple[str, RowError]]:
        """The elements of the list at `pos`; `end` is then the position after its `]`."""
        pos, index = self.skip(pos + 1), 0
        while not self.text.startswith("]", pos):
            where = f"{self.path}:{self.line(pos)} (element {index})"
            start = pos
            row, pos, why = self.element(pos)
            if why is None:
                why = unfit(row, self.text[start:pos])
            if m := SURROGATE.search(self.text, start, pos):  # raw bytes, not a JSON escape
                why = f"not UTF-8 (byte {ord(m.group()) - 0xDC00:#04x})"
            if why is None and not isinstance(row, dict):
                why = "not a JSON object"
            yield (where, RowError(why)) if why is not None else (where, row)
            index += 1
            pos = self.skip(pos)
            if not self.text.startswith("]", pos):
                pos = self.expect(pos, ",")
        self.end = pos + 1


def _csv_rows(path: Path) -> Iterator[Row | tuple[str, RowError]]:
    csv.field_size_limit(sys.maxsize)  # StackOverflow bodies exceed the 128 KiB default
    # bytes that are not UTF-8 become lone surrogates (surrogateescape): that row's error, not the file's
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise DataError(f"{path}:1: not valid CSV ({e})") from None
        if why := _not_utf8(header):
            raise DataError(f"{path}:1: the header is {why}")
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                yield f"{path}:{reader.line_num}", RowError(f"not valid CSV ({e})")
                continue
            # line_num is the line where the record ended; records can span lines (quoted HTML)
            where = f"{path}:{reader.line_num}"
            if None in row or any(v is None for v in row.values()):
                yield (
                    where,
                    RowError(f"has a different number of fields than the header's {len(header)}"),
                )
            elif why := _not_utf8(row.values()):
                yield where, RowError(why)
            else:
                yield where, dict(row)


def _not_utf8(values: Iterable[str]) -> str | None:
    """Where bytes that are not UTF-8 were decoded with surrogateescape: the first such byte."""
    for value in values:
        if m := SURROGATE.search(value):
            return f"not UTF-8 (byte {ord(m.group()) - 0xDC00:#04x})"
    return None


def _hf_rows(cfg: SourceConfig) -> Iterator[Row | tuple[str, RowError]]:
    if os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False"):
        raise DataError(
            f"source {cfg.name!r}: Hugging Face dataset {cfg.dataset!r} needs the hub, and distill4all is "
            "offline (HF_HUB_OFFLINE=1); set HF_HUB_OFFLINE=0 to download, or point `path` at a local file"
        )
    _check_hub_reachable(cfg)
    import datasets

    ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=True)
    rows, i = iter(ds), 0
    while True:
        where = f"{cfg.dataset}:{cfg.split}:{i}"
        try:
            row = next(rows, None)
        except Exception as e:  # the library's reader failed on its file: nothing after it can be read
            raise DataError(f"{where}: the dataset cannot be read past this row ({type(e).__name__}: {e})") from None
        if row is None:
            return
        i += 1
        why = unfit(row)
        yield (where, RowError(why)) if why is not None else (where, dict(row))


def _check_hub_reachable(cfg: SourceConfig) -> None:
    """Fail in seconds, not after the datasets library's long retries, when the hub is unreachable."""
    import httpx

    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        httpx.head(endpoint, timeout=5.0)
    except httpx.HTTPError as e:
        raise DataError(f"source {cfg.name!r}: the hub at {endpoint} is unreachable ({type(e).__name__})") from None


def _file_rows(cfg: SourceConfig) -> Iterator[Row | tuple[str, RowError]]:
    if cfg.format == "hf":
        return _hf_rows(cfg)
    assert cfg.path is not None
    try:
        if not stat.S_ISREG(os.stat(cfg.path).st_mode):
            raise DataError(f"source {cfg.name!r}: not a file: {cfg.path}")
    except FileNotFoundError:
        raise DataError(f"source {cfg.name!r}: file not found: {cfg.path}") from None
    except OSError as e:  # a symlink loop, a folder that may not be read…
        raise DataError(f"source {cfg.name!r}: cannot read {cfg.path}: {e.strerror}") from None
    suffix = cfg.path.suffix.lower()
    kind = {"jsonl": "jsonl", "json": "json", "csv": "csv", "parquet": "parquet"}.get(cfg.format)
    if kind is None:  # a dataset format: the file format comes from the extension
        kind = {".csv": "csv", ".parquet": "parquet", ".json": "json"}.get(suffix, "jsonl")
    readers: dict[str, Callable[[Path], Iterator[Row | tuple[str, RowError]]]] = {
        "jsonl": _jsonl_rows,
        "json": _json_rows,
        "csv": _csv_rows,
        "parquet": lambda path: parquet_rows(path, bad=RowError),
    }
    return _reading(cfg.path, readers[kind](cfg.path))


def _reading(path: Path, rows: Iterator[Row | tuple[str, RowError]]) -> Iterator[Row | tuple[str, RowError]]:
    """The rows, with a failure to read the file (a disk error, a file removed) named as its own."""
    try:
        yield from rows
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


# --- extract: dataset formats ------------------------------------------------------------------


def _text_field(row: dict[str, Any], *names: str) -> str:
    for name in names:
        value = row.get(name)
        if isinstance(value, str):
            return value
    raise RowError(f"no text field {' or '.join(repr(n) for n in names)}")


def _generic(cfg: SourceConfig) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]:
    name = cfg.field or "prompt"

    def extract(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return _text_field(row, name), {k: v for k, v in row.items() if k != name}

    return extract


_TURN = re.compile(r"<(human|bot)>:", re.IGNORECASE)


def _oig_chip2(cfg: SourceConfig) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]:
    """LAION OIG: `text` holds `<human>: … <bot>: …` turns; the first human turn is the prompt."""
    name = cfg.field or "text"

    def extract(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        text = _text_field(row, name)
        marks = list(_TURN.finditer(text))
        if not marks or marks[0].group(1).lower() != "human":
            raise RowError("no <human>: turn at the start")
        end = marks[1].start() if len(marks) > 1 else len(text)
        prompt = text[marks[0].end() : end]
        answer = ""
        if len(marks) > 1 and marks[1].group(1).lower() == "bot":
            answer = text[marks[1].end() : marks[2].start() if len(marks) > 2 else len(text)].strip()
        meta: dict[str, Any] = {"original_response": answer, "turns": len(marks)}
        if isinstance(row.get("metadata"), dict):
            meta["metadata"] = row["metadata"]
        return prompt, meta

    return extract


def _stackoverflow(cfg: SourceConfig) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]:
    """A question: its title, then its HTML body as markdown (code blocks kept); tags as metadata."""
    from markdownify import markdownify

    def extract(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        low = {str(k).lower(): v for k, v in row.items()}
        title = _text_field(low, "title")
        body_html = _text_field(low, "body", cfg.field or "body")
        body = markdownify(body_html, heading_style="ATX", bullets="-").strip()
        body = re.sub(r"\n{3,}", "\n\n", body)
        tags = low.get("tags") or low.get("label") or ""
        if isinstance(tags, str):  # "<python><list>" or "python list" or "python,list"
            tags = [t for t in re.split(r"[<>,\s|]+", tags) if t]
        meta = {"title": title, "tags": tags}
        for key in ("id", "score", "creationdate"):
            if key in low:
                meta[key] = low[key]
        return f"{title.strip()}\n\n{body}" if body else title, meta

    return extract


def _p3(cfg: SourceConfig) -> Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]:
    """bigscience P3: the prompt is `inputs` (or `inputs_pretokenized`); `targets` kept as metadata."""

    def extract(row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        prompt = _text_field(row, cfg.field or "inputs", "inputs_pretokenized")
        target = row.get("targets", row.get("targets_pretokenized"))
        meta = {"targets": target} if isinstance(target, str | list) else {}
        return prompt, meta

    return extract


EXTRACTORS: dict[str, Callable[[SourceConfig], Callable[[dict[str, Any]], tuple[str, dict[str, Any]]]]] = {
    "oig_chip2": _oig_chip2,
    "stackoverflow": _stackoverflow,
    "p3": _p3,
}


# --- select: shared by all ---------------------------------------------------------------------


def _sample_key(seed: int, pid: str) -> int:
    """A per-prompt pseudo-random key: sampling by it is independent of row order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{pid}".encode()).digest()[:8], "big")


def read_source(
    cfg: SourceConfig, *, run_seed: int = 0, stats: SourceStats | None = None, warn: Callable[[str], None] | None = None
) -> Iterator[Prompt]:
    """Yield the source's prompts after normalization, limits, dedup and sampling.

    A malformed row raises DataError naming its file:line (`on_error: fail`), or is counted, shown
    through `warn` and skipped (`on_error: skip`) — never dropped silently.
    """
    stats = stats if stats is not None else SourceStats()
    extract = EXTRACTORS.get(cfg.format, _generic)(cfg)
    seed = run_seed if cfg.seed is None else cfg.seed
    threshold = int(cfg.fraction * 2**64) if cfg.fraction is not None else None
    seen: set[str] = set()
    picked: list[tuple[int, int, Prompt]] = []  # a max-heap (negated keys) of the `limit` smallest
    order = 0

    def bad(where: str, why: str) -> None:
        stats.bad_rows += 1
        message = f"{where}: {why}"
        if cfg.on_error == "fail":
            raise DataError(f"{message} (set on_error: skip on source {cfg.name!r} to skip such rows)")
        if len(stats.bad_examples) < 5:
            stats.bad_examples.append(message)
        if warn is not None:
            warn(f"skipped {message}")

    for where, row in _file_rows(cfg):
        stats.rows += 1
        if isinstance(row, RowError):
            bad(where, str(row))
            continue
        try:
            raw, meta = extract(row)
        except RowError as e:
            bad(where, str(e))
            continue
        except RecursionError:  # e.g. a StackOverflow body of HTML nested 100,000 deep
            bad(where, "nests too deep to read")
            continue
        text = normalize(raw)
        if len(text) < cfg.min_chars:
            stats.too_short += 1
            continue
        if cfg.max_chars is not None and len(text) > cfg.max_chars:
            stats.too_long += 1
            continue
        if text in seen:
            stats.duplicates += 1
            continue
        seen.add(text)
        pid = prompt_id(cfg.name, text)
        key = _sample_key(seed, pid)
        if threshold is not None and key >= threshold:
            stats.sampled_out += 1
            continue
        prompt = Prompt(pid, cfg.name, text, meta | {"where": where})
        if cfg.limit is None:
            stats.kept += 1
            yield prompt
            continue
        order += 1
        if len(picked) < cfg.limit:
            heapq.heappush(picked, (-key, order, prompt))
        else:
            stats.sampled_out += 1
            if -picked[0][0] > key:
                heapq.heapreplace(picked, (-key, order, prompt))
    if cfg.limit is not None:
        chosen = sorted(picked, key=lambda t: t[1])  # keep file order among the chosen
        stats.kept += len(chosen)
        for _, _, prompt in chosen:
            yield prompt
