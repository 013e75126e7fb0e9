"""Evaluation items — the Self-Instruct user-oriented format or any instruction/input/output JSONL —
read by eval (to score models) and by curate (to keep them out of the training data)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from distill4all.errors import DataError


@dataclass(frozen=True)
class Item:
    id: str
    instruction: str
    input: str
    output: str
    app: str = ""


def load_items(path: Path) -> list[Item]:
    """Read `id, motivation_app, instruction, instances[{input, output}]` lines (Self-Instruct; only
    the first instance is used, as the original evaluation did) or flat
    `instruction, input, output` lines."""
    if not path.is_file():
        raise DataError(f"eval data not found: {path}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
                if "instances" in row:
                    first = row["instances"][0]
                    inp, out = first.get("input", ""), first["output"]
                else:
                    inp, out = row.get("input", ""), row["output"]
                instruction = row["instruction"]
            except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
                raise DataError(f"{where}: not an eval item ({type(e).__name__}: {e})") from None
            if not all(isinstance(x, str) for x in (instruction, inp, out)):
                raise DataError(f"{where}: instruction, input and output must be strings")
            items.append(
                Item(str(row.get("id", f"item_{lineno}")), instruction, inp or "", out, row.get("motivation_app", ""))
            )
    if not items:
        raise DataError(f"{path} holds no eval items")
    return items
