"""The pairs curation reads: from the run store, where a pairs file is imported first.

A pairs file is JSONL or Parquet in the GPT4All format — `prompt`, `response` and optionally
`source` (default: the file's name) and `finish_reason` — e.g. the released GPT4All data. Its
rows become prompts + responses of the teacher `import`, so collected and imported pairs take
the same path. Importing is idempotent: the n-th answer to a prompt in the file is its sample n.

A row whose prompt or response is not text is an error naming its file and line, or, with
`malformed: drop` (the original clean.py's rule), a pair that curation drops as
`failure.malformed`: a `{"value": …}` or `{"description": …}` object is first read as its text,
as clean.py did, and what is still not text (a number, another object, a blank prompt) is kept
with its JSON as the prompt, so that the funnel counts every row of the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill4all.errors import DataError
from distill4all.records import REASONING_FIELDS, given_reasoning, read_records, split_reasoning
from distill4all.store import Store, responses
from distill4all.store.prompts import prompt_id

_SOURCE_OK = re.compile(r"[^A-Za-z0-9_.-]+")


@dataclass
class Rows:
    """Every response in the store with its prompt, in response-id order."""

    ids: list[int]
    prompt_ids: list[str]
    sources: list[str]
    prompts: list[str]
    responses: list[str | None]
    finish_reasons: list[str | None]
    teachers: list[str]
    reasonings: list[str | None]  # a reasoning model's thinking, apart from its answer

    def __len__(self) -> int:
        return len(self.ids)


FIELDS = ("prompt", "response", "source", "finish_reason", *REASONING_FIELDS)
"""A pairs row's own fields; any other goes into the prompt's metadata."""


def load_rows(store: Store) -> Rows:
    rows = Rows([], [], [], [], [], [], [], [])
    for p in responses.pairs(store):
        rows.ids.append(p.id)
        rows.prompt_ids.append(p.prompt_id)
        rows.sources.append(p.source)
        rows.prompts.append(p.prompt)
        rows.responses.append(p.response)
        rows.finish_reasons.append(p.finish_reason)
        rows.teachers.append(p.teacher)
        rows.reasonings.append(p.reasoning)
    return rows


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, row) for each record of a JSONL or Parquet pairs file."""
    if not path.is_file():
        raise DataError(f"pairs file not found: {path}")
    return read_records(path)


MALFORMED = "malformed"  # the finish reason of a row that was not text (malformed: drop)


def _unwrap(value: Any) -> Any:
    """clean.py's reading of an object field: its "value", else its "description"."""
    if isinstance(value, dict):
        return value.get("value", value.get("description", value))
    return value


def import_pairs(store: Store, path: Path, teacher: str, batch: int = 5000, malformed: str = "error") -> int:
    """Add the file's pairs to the store (those already there are left as they are); return the
    count read. `malformed`: "error" or "drop" (see the module doc)."""
    default_source = _SOURCE_OK.sub("-", path.name.split(".")[0]) or "import"
    samples: dict[str, int] = {}
    prompts: list[tuple[str, str, str, str]] = []
    answers: list[tuple[str, int, str | None, str | None, str, str | None]] = []
    total = 0

    def flush() -> None:
        responses.add_imported(store, teacher, prompts, answers)
        prompts.clear()
        answers.clear()

    params = json.dumps({"file": path.name})
    for where, row in _records(path):
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object with prompt and response")
        prompt, response = row.get("prompt"), row.get("response")
        finish = row.get("finish_reason")
        if malformed == "drop":
            prompt, response = _unwrap(prompt), _unwrap(response)
            text = isinstance(prompt, str) and bool(prompt.strip())
            if not (text and isinstance(response, str | None)):
                prompt = prompt if text else json.dumps(prompt, default=str)
                response, finish = None, MALFORMED
        if not isinstance(prompt, str) or not prompt.strip():
            raise DataError(f"{where}: 'prompt' is missing, not a string, or blank")
        if response is not None and not isinstance(response, str):
            raise DataError(f"{where}: 'response' must be a string or null")
        source = row.get("source") or default_source
        if not isinstance(source, str):
            raise DataError(f"{where}: 'source' must be a string")
        prompt = prompt.strip()
        pid = prompt_id(source, prompt)
        n = samples.get(pid, 0)
        samples[pid] = n + 1
        thinking = given_reasoning(row)
        if thinking is not None and not isinstance(thinking, str):
            raise DataError(f"{where}: 'reasoning_content' must be a string or null")
        response, reasoning, finish = split_reasoning(response, thinking, finish if isinstance(finish, str) else None)
        meta = {k: v for k, v in row.items() if k not in FIELDS}
        prompts.append((pid, source, prompt, json.dumps(meta | {"where": where}, default=str)))
        answers.append((pid, n, response, finish if isinstance(finish, str) else None, params, reasoning))
        total += 1
        if len(answers) >= batch:
            flush()
    if answers:
        flush()
    if total == 0:
        raise DataError(f"{path}: no pairs in the file")
    return total


def remove_import(store: Store, teacher: str) -> None:
    """Undo imports: the teacher's responses, their decisions, and prompts nothing else uses."""
    responses.remove_teacher(store, teacher)
