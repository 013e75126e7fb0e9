"""Prompt sources: read rows from a file (or a hub dataset), turn each into a prompt, and report
every row that could not be used with its file:line.

Reading is split in three small steps so each format only says what is special about it:
  rows      — the file format: (where, dict) pairs from JSONL / JSON / CSV / Parquet / hub
  extract   — the dataset format: the prompt text and metadata of one row (OIG, StackOverflow, P3…)
  select    — the same for all: normalize, length limits, exact dedup, seeded sampling

A local `hf` folder is read by the datasets library, whose JSON reader is pyarrow's: it descends
once per level of nesting and overflows the C stack somewhere past 10,000 levels, a SIGSEGV that
no `try` catches. So before a folder's JSON files reach it they are scanned for nesting depth
(`nesting_past`: one pass over the bytes, numpy on 8 MiB chunks, memory bounded by a chunk), and
rows past MAX_DEPTH are bad rows named by file:line, as in every other reader; a file that has
some is handed to the library as a copy of its good rows. Scanning rather than building the
dataset in a child process and reporting its death: a dead child tells neither the row nor the
line, so `on_error: skip` could not skip it, and it needs a full Arrow cache of every local
dataset (streaming keeps none) and a reload pinned to that cache. The other formats a folder may
hold cannot crash this way: CSV/TSV and text rows are flat, and pyarrow refuses Parquet and Arrow
types that nest too deep with an exception; other builders are refused for local folders. Hub
datasets are streamed as they are, unscanned.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import heapq
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import unicodedata
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from distill4all.config import SourceConfig
from distill4all.errors import DataError
from distill4all.records import MAX_DEPTH, SURROGATE, is_json_array, json_line, parquet_rows, unfit
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


def _jsonl_rows(path: Path, name: str | None = None) -> Iterator[Row | tuple[str, RowError]]:
    name = name or str(path)  # what a row's place names: an archive's member is not its temp copy
    with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is that row's error, not the file's
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            row, why = json_line(raw)
            if why is not None:
                yield where, RowError(why)
            elif not isinstance(row, dict):
                yield where, RowError("not a JSON object")
            else:
                yield where, row


def _json_rows(path: Path, name: str | None = None) -> Iterator[Row | tuple[str, RowError]]:
    """The elements of a JSON list (or of the list under an object's "data" key), each named by
    the line it starts on. Read element by element, so that one that is not UTF-8, holds a lone
    surrogate or nests too deep is that row's error; a file whose structure is broken is the file's."""
    # bytes that are not UTF-8 become lone surrogates (surrogateescape), found in the element's text
    name = name or str(path)
    text = path.read_bytes().decode("utf-8", errors="surrogateescape")
    doc = _JsonText(name, text)
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
            raise DataError(f"{name}: a JSON source must be a list of objects (or {{'data': [...]}})")
        pos = doc.skip(pos + 1)
    else:
        raise DataError(f"{name}: a JSON source must be a list of objects (or {{'data': [...]}})")
    if pos < len(text):
        doc.syntax(pos, "more after the end of the JSON value")


class _JsonText:
    """The outer levels of a JSON source, parsed by hand (positions and lines known); each element
    is decoded on its own by the json module."""

    _TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[\[\]{}]', re.DOTALL)

    def __init__(self, name: str, text: str) -> None:
        self.name, self.text, self.end = name, text, 0
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
        raise DataError(f"{self.name}:{self.line(pos)}: not valid JSON ({why})")

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
            where = f"{self.name}:{self.line(pos)} (element {index})"
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

    assert cfg.dataset is not None
    if Path(cfg.dataset).is_dir():
        yield from _local_hf_rows(cfg, Path(cfg.dataset))
        return
    try:
        ds = datasets.load_dataset(cfg.dataset, cfg.subset, split=cfg.split, streaming=True)
    except Exception as e:  # an unknown name, no access, no such split…
        raise DataError(
            f"source {cfg.name!r}: dataset {cfg.dataset!r} cannot be loaded ({type(e).__name__}: {e})"
        ) from None
    yield from _dataset_rows(f"{cfg.dataset}:{cfg.split}", ds)


def _dataset_rows(prefix: str, ds: Iterable[Any]) -> Iterator[Row | tuple[str, RowError]]:
    rows, i = iter(ds), 0
    while True:
        where = f"{prefix}:{i}"
        try:
            row = next(rows, None)
        except Exception as e:  # the library's reader failed on its file: nothing after it can be read
            raise DataError(f"{where}: the dataset cannot be read past this row ({type(e).__name__}: {e})") from None
        if row is None:
            return
        i += 1
        why = unfit(row)
        yield (where, RowError(why)) if why is not None else (where, dict(row))


# The builders a local folder may be read with. csv (and tsv) and text rows are flat; Parquet and
# Arrow files that nest too deep are refused by pyarrow itself with an exception (Parquet: a schema
# depth limit of 100; Arrow IPC: types past 64 levels); JSON is scanned first (_guard_json).
_LOCAL_BUILDERS = ("json", "csv", "parquet", "arrow", "text")


def _local_hf_rows(cfg: SourceConfig, folder: Path) -> Iterator[Row | tuple[str, RowError]]:
    """A local dataset folder, read by the datasets library once its JSON files are known to nest
    no deeper than MAX_DEPTH; rows past it are bad rows named by file:line."""
    import datasets
    from datasets.data_files import DataFilesDict, DataFilesList

    try:
        builder = datasets.load_dataset_builder(str(folder), cfg.subset)
    except Exception as e:  # no data files, an unknown config, a broken README…
        raise DataError(f"{folder}: not a dataset the datasets library can read ({type(e).__name__}: {e})") from None
    if builder.name not in _LOCAL_BUILDERS:
        raise DataError(
            f"{folder}: holds {builder.name} files; a local hf folder is read when it holds JSON/JSONL, "
            "CSV/TSV, Parquet, Arrow or text files"
        )
    splits = builder.config.data_files or {}
    if cfg.split not in splits:
        raise DataError(f"{folder}: no split {cfg.split!r} (it has {', '.join(map(str, splits)) or 'none'})")
    files = splits[cfg.split]
    with tempfile.TemporaryDirectory(prefix="distill4all-hf-") as tmp:
        if builder.name == "json":
            read = yield from _guard_json(builder, list(files), Path(tmp))
            if not read:
                return
            # only the split asked for: the builder infers features from its first split's first file
            origin = files.origin_metadata[:1] * len(read)
            builder.config.data_files = DataFilesDict({cfg.split: DataFilesList(read, origin)})
        try:
            ds = builder.as_streaming_dataset(split=cfg.split)
        except Exception as e:
            raise DataError(f"{folder}: the dataset cannot be read ({type(e).__name__}: {e})") from None
        yield from _dataset_rows(f"{cfg.dataset}:{cfg.split}", ds)


def _guard_json(builder: Any, files: list[str], tmp: Path) -> Generator[tuple[str, RowError], None, list[str]]:
    """Scan each JSON file of the split (each member of an archive, through the library's own
    decompression) and return the files for the library to read: the same ones where nothing nests
    past MAX_DEPTH; else a copy, under `tmp`, of the rows the project's own reader can read, its
    bad rows yielded with their file:line (under `on_error: fail` the first one ends the source)."""
    import datasets
    from datasets.utils.file_utils import xopen

    dl = datasets.StreamingDownloadManager(base_path=builder.base_path)
    encoding = codecs.lookup(builder.config.encoding).name
    read: list[str] = []
    for entry in files:
        members = list(dl.iter_files(dl.extract(entry)))
        deep = {m: line for m in members if (line := _scan_member(m, encoding, builder.config.encoding_errors))}
        if not deep:
            read.append(entry)
            continue
        for n, member in enumerate(members):  # an archive is replaced by its members, copied out
            name = _member_name(member)
            copy = tmp / f"{len(read)}-{n}.json"
            if member not in deep:
                with _reading_member(name), xopen(member, "rb") as src, open(copy, "wb") as out:
                    shutil.copyfileobj(src, out)
            elif builder.config.field is not None or encoding != "utf-8":  # the project's readers cannot read these
                raise DataError(f"{name}:{deep[member]}: nests deeper than {MAX_DEPTH} levels")
            elif not (yield from _good_rows_copy(member, name, copy)):
                continue  # no row left: the library fails on an empty file
            read.append(str(copy))
    return read


def _scan_member(member: str, encoding: str, errors: str | None) -> int | None:
    """The line where the member's nesting first passes MAX_DEPTH, or None."""
    from datasets.utils.file_utils import xopen

    with _reading_member(_member_name(member)), xopen(member, "rb") as f:
        chunks: Iterator[bytes] = iter(lambda: f.read(_SCAN_CHUNK), b"")
        if encoding != "utf-8":  # the library re-encodes to UTF-8 before pyarrow sees it: scan that
            decoder = codecs.getincrementaldecoder(encoding)(errors or "strict")
            chunks = (decoder.decode(c).encode("utf-8", "surrogatepass") for c in chunks)
        return nesting_past(chunks, MAX_DEPTH)


def _good_rows_copy(member: str, name: str, copy: Path) -> Generator[tuple[str, RowError], None, int]:
    """Write the member's good rows to `copy` as JSON Lines and return how many; yield its bad ones."""
    from datasets.utils.file_utils import xopen

    if "::" in member:  # compressed or in an archive: the readers want a plain file
        source = copy.with_suffix(".raw")
        with _reading_member(name), xopen(member, "rb") as src, open(source, "wb") as out:
            shutil.copyfileobj(src, out)
    else:
        source = Path(member)
    rows = _json_rows(source, name) if is_json_array(source) else _jsonl_rows(source, name)
    good = 0
    with open(copy, "w", encoding="utf-8") as out:
        for where, row in _reading(Path(name), rows):
            if isinstance(row, RowError):
                yield where, row
            else:
                good += 1
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    return good


@contextlib.contextmanager
def _reading_member(name: str) -> Iterator[None]:
    """A member that cannot be read (a damaged archive, a truncated gzip) is named as its own."""
    try:
        yield
    except DataError:
        raise
    except Exception as e:  # zipfile, gzip and fsspec raise several types
        raise DataError(f"{name}: cannot read ({type(e).__name__}: {e})") from None


def _member_name(member: str) -> str:
    """How a user knows a data file: `gzip://train.jsonl::/d/train.jsonl.gz` is the .gz file,
    `zip://sub/a.jsonl::/d/train.zip` is `/d/train.zip/sub/a.jsonl`."""
    if "::" not in member:
        return member
    inner, outer = member.split("::", 1)
    protocol, _, path = inner.partition("://")
    return f"{outer}/{path}" if protocol == "zip" and path else outer


_SCAN_CHUNK = 1 << 23
# one byte per byte: 1 a quote, 2 a newline, 3 an opening and 4 a closing bracket, 0 the rest
_CODES = bytes(1 if b == 34 else 2 if b == 10 else 3 if b in b"[{" else 4 if b in b"]}" else 0 for b in range(256))


def nesting_past(chunks: Iterable[bytes], limit: int) -> int | None:
    """The line where JSON (Lines) bytes first nest deeper than `limit` levels (one more in a
    file that is one list: its elements are the rows), or None.

    It counts as pyarrow's parser descends, never less: once per `[`/`{` outside a string, where a
    string also ends at a raw newline (inside one that is a parse error, where the parser stops),
    and a closing bracket at depth 0 (an error too) leaves 0. So the count is at least the depth
    of a parse that starts at any line start (pyarrow parses blocks that start at line starts).
    After a syntax error it may be too high: such a file then goes to the exact reader, which
    names its broken rows."""
    import numpy as np

    depth = parity = lines = 0  # parity: inside a string, on the line so far
    escaped = first = False
    for data in chunks:
        if not data:
            continue
        if not first and (start := data.lstrip(b"\xef\xbb\xbf \t\r\n")):  # the first byte of content
            first = True
            if start.startswith(b"["):
                limit += 1
        if escaped and data[:1] in (b"\\", b'"'):  # a backslash ended the last chunk
            data = b"_" + data[1:]
        # escapes paired left to right, as a parser does: the quotes left are the strings' ends
        if b"\\" in data:
            data = data.replace(b"\\\\", b"__").replace(b'\\"', b"__")
        escaped = data.endswith(b"\\")
        code = np.frombuffer(data.translate(_CODES), np.uint8)
        pos = np.flatnonzero(code)
        if pos.size == 0:
            continue
        kind = code[pos]
        newline = kind == 2
        quotes = np.cumsum(kind == 1, dtype=np.int32)  # a chunk is far below 2**31 bytes
        seq = np.arange(kind.size, dtype=np.int32)
        last_newline = np.maximum.accumulate(np.where(newline, seq, -1))
        base = np.where(last_newline >= 0, quotes[np.maximum(last_newline, 0)], -parity)
        in_string = ((quotes - base) & 1).astype(bool)
        step = (kind == 3).astype(np.int32) - (kind == 4)
        step[in_string] = 0
        walk = np.cumsum(step, dtype=np.int64) + depth
        level = walk - np.minimum(np.minimum.accumulate(walk), 0)  # never below 0
        over = np.flatnonzero(level > limit)
        if over.size:
            return lines + int(np.count_nonzero(newline[: over[0]])) + 1
        depth, parity = int(level[-1]), int((quotes[-1] - base[-1]) & 1)
        lines += int(np.count_nonzero(newline))
    return None


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
