"""Training examples: read pairs or conversations from JSONL, a JSON array file or Parquet, split
off validation by seed.

Four row formats are understood, detected from the first row (or named in `train.data_format`):

    gpt4all   {"prompt": ..., "response": ..., "source": ...}   (what collect and curate write)
    alpaca    {"instruction": ..., "input": ..., "output": ...}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}

A turn of either list may be written either way ({role, content} or {from, value}), with the role
names ShareGPT datasets use (human/user, gpt/assistant/model/chatgpt/bing). Every row becomes a
conversation that ends with an assistant turn; the template decides how it is rendered and which
tokens carry loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distill4all.errors import DataError
from distill4all.records import is_json_array, json_array_rows, read_records

Format = Literal["gpt4all", "alpaca", "messages", "sharegpt"]
ROLES = ("system", "user", "assistant")
# Each role name found in conversation datasets, as one of ROLES.
ROLE_NAMES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
}
TURN_LISTS: dict[Format, str] = {"messages": "messages", "sharegpt": "conversations"}


@dataclass(frozen=True)
class Example:
    messages: tuple[dict[str, str], ...]
    source: str
    row: int  # 0-based row in the input file, to trace an example back

    @property
    def single_turn(self) -> bool:
        roles = [m["role"] for m in self.messages]
        return roles in (["user", "assistant"], ["system", "user", "assistant"])


@dataclass
class ReadStats:
    rows: int = 0
    empty: int = 0  # rows whose prompt or answer is blank: skipped, as the paper's cleaning would


def detect_format(row: Any, where: str) -> Format:
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "conversations" in row:
            return "sharegpt"
        if "prompt" in row and "response" in row:
            return "gpt4all"
        if "instruction" in row and "output" in row:
            return "alpaca"
    keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
    raise DataError(
        f"{where}: unknown row format (keys: {keys}); expected prompt/response, instruction/input/output, "
        "messages or conversations"
    )


def _text(row: dict[str, Any], key: str, where: str, *, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string")
    return value


def _to_messages(row: Any, fmt: Format, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each row must be a JSON object")
    if fmt == "gpt4all":
        prompt, response = _text(row, "prompt", where), _text(row, "response", where)
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction", where), _text(row, "input", where, optional=True)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return ({"role": "user", "content": prompt}, {"role": "assistant", "content": _text(row, "output", where)})
    return _turns(row, TURN_LISTS[fmt], where)


def _turns(row: dict[str, Any], key: str, where: str) -> tuple[dict[str, str], ...]:
    raw = row.get(key)
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: {key!r} must be a non-empty list")
    messages = tuple(_turn(m, f"{key}[{i}]", where) for i, m in enumerate(raw))
    if messages[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last message must be the assistant's (there is nothing to learn otherwise)")
    return messages


def _turn(m: Any, name: str, where: str) -> dict[str, str]:
    """One turn, written {role, content} (OpenAI) or {from, value} (ShareGPT)."""
    if isinstance(m, dict):
        # a Parquet struct column may hold both spellings, one of them null
        role = m["role"] if m.get("role") is not None else m.get("from")
        content = m["content"] if m.get("content") is not None else m.get("value")
        if isinstance(role, str) and role in ROLE_NAMES and isinstance(content, str):
            return {"role": ROLE_NAMES[role], "content": content}
    raise DataError(
        f"{where}: {name} needs a role ({'/'.join(ROLE_NAMES)}) as role or from, and a string content or value"
    )


def read_examples(path: Path, fmt: Literal["auto"] | Format = "auto") -> tuple[list[Example], ReadStats]:
    """Every usable row of a data file (JSONL, a JSON array or Parquet), in file order; a malformed
    row is an error with its location."""
    if not path.is_file():
        raise DataError(f"training data not found: {path}")
    examples: list[Example] = []
    stats = ReadStats()
    detected: Format | None = None if fmt == "auto" else fmt
    rows = json_array_rows(path) if is_json_array(path) else read_records(path)
    for where, row in rows:
        detected = detected or detect_format(row, where)
        messages = _to_messages(row, detected, where)
        stats.rows += 1
        if any(not m["content"].strip() for m in messages if m["role"] != "system"):
            stats.empty += 1
            continue
        source = row.get("source") if isinstance(row.get("source"), str) else ""
        examples.append(Example(messages, source, stats.rows - 1))
    if not examples:
        raise DataError(f"{path}: no usable examples ({stats.rows} rows, {stats.empty} with a blank turn)")
    return examples, stats


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffle by seed and hold out ceil(n × fraction) rows for validation (the paper's 5%)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(math.ceil(n * val_fraction), n - 1) if val_fraction > 0 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])
