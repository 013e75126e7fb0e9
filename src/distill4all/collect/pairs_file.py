"""The collected pairs as files: GPT4All JSONL/Parquet (`prompt`, `response`, `source`) or OpenAI
chat `messages` JSONL (the fine-tuning format)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from distill4all import atomic
from distill4all.store import Store, responses

PairFormat = Literal["jsonl", "parquet", "messages"]


def iter_pairs(store: Store) -> Iterator[dict[str, Any]]:
    for p in responses.pairs(store):
        yield {
            "prompt": p.prompt,
            "response": p.response,
            "source": p.source,
            "teacher": p.teacher,
            "model": p.model,
            "sample": p.sample,
            "finish_reason": p.finish_reason,
            "prompt_id": p.prompt_id,
        }


def write_pairs(store: Store, path: Path, fmt: PairFormat = "jsonl") -> int:
    """Write every collected pair to `path` atomically; return how many."""
    n = 0
    with atomic.output_file(path) as tmp:
        if fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            rows = list(iter_pairs(store))
            pq.write_table(pa.Table.from_pylist(rows), tmp)
            return len(rows)
        with open(tmp, "w", encoding="utf-8") as f:
            for pair in iter_pairs(store):
                if fmt == "messages":
                    line: dict[str, Any] = {
                        "messages": [
                            {"role": "user", "content": pair["prompt"]},
                            {"role": "assistant", "content": pair["response"]},
                        ],
                        "source": pair["source"],
                    }
                else:
                    line = pair
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
                n += 1
    return n
