"""The teacher's top-k from the logprobs collect stored with its answers (store/logprobs.py), laid
out as the local teacher's pass lays out its own (train/teacher/<split>/{ids,logprobs}.npy and
meta.json, see teacher_topk.py), so that the loop reads both the same way.

An API gives each answer token as bytes, with its top-K alternatives as bytes; the student reads
the answer as its own token ids. The two are matched position by position, by bytes:

  - an example finds its answer's logprobs by its (prompt, answer) text in the run's store;
  - a student target token is *aligned* when the teacher's tokens start a token at the same byte
    offset of the answer, with the same bytes, and all bytes before it agree (the student read the
    same text so far);
  - at an aligned position each alternative becomes the student's id of a token with exactly its
    bytes; one the student has no single token for is left out (its mass is the tail's).

A position that does not align (a different split into tokens, an answer with no logprobs, the
template's end-of-turn token when the endpoint did not report it) is given the student's target
token with probability 1, so KD there is the cross-entropy on the answer, as in SFT; except past
the end of an answer the teacher did not finish (finish_reason `length`): there the template's
end-of-turn token is not what the teacher would write, and the row is left empty (no KD term). The
share of answer tokens that align is measured and the stage refuses KD below
`distill.min_aligned`: teachers with another tokenizer align poorly, and cross-tokenizer
distillation is out of scope.

Written here: the alignment of an API's byte tokens to a student's vocabulary is what no library
offers (TRL and DistillKit need the teacher's logits over the student's own ids).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from rich.console import Console

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.errors import ConfigError
from distill4all.layout import TrainLayout
from distill4all.store.logprobs import ResponseLogprobs
from distill4all.train.batching import TokenizedSplit
from distill4all.train.templates import IGNORE

BYTES_PER_ENTRY = 6  # int32 id + float16 logprob


@dataclass
class Aligned:
    """One example's teacher rows, one per target position, and its count of answer tokens."""

    ids: np.ndarray  # int32 (n_targets, k)
    logprobs: np.ndarray  # float32 (n_targets, k); -inf pads a row with fewer than k known tokens
    answer_tokens: int  # student targets inside the answer's bytes
    aligned: int  # of those, the ones matched to a teacher position
    empty: int  # rows with no KD term: past the end of an answer the teacher was cut off in


class Answer(NamedTuple):
    text: bytes  # UTF-8
    logprobs: ResponseLogprobs | None
    finished: bool  # the teacher ended it (any finish reason but `length`)


def has_collected_logprobs(store_path: Path) -> bool:
    """Whether the run's store holds any answer's logprobs (a count, not the whole map)."""
    from distill4all.store import Store
    from distill4all.store import logprobs as stored

    if not store_path.is_file():
        return False
    with Store(store_path, readonly=True) as store:
        return stored.totals(store).responses > 0


def collected_logprobs(store_path: Path) -> dict[tuple[str, str], tuple[int, str | None]]:
    """(prompt, answer) → (response id, finish reason), for the store's answers with logprobs;
    empty with no store."""
    from distill4all.store import Store
    from distill4all.store import logprobs as stored

    if not store_path.is_file():
        return {}
    with Store(store_path, readonly=True) as store:
        return stored.by_pair(store)


def align(
    student: Sequence[bytes],
    targets: Sequence[int],
    answer: bytes,
    teacher: ResponseLogprobs | None,
    to_id: dict[bytes, int],
    k: int,
    *,
    finished: bool = True,
) -> Aligned:
    """The teacher rows for one example whose target tokens have the bytes `student` and ids
    `targets`, starting at the first byte of `answer`; `finished`: the teacher ended the answer
    itself (see the module docstring)."""
    n = len(targets)
    ids = np.zeros((n, k), dtype=np.int32)
    lps = np.full((n, k), -np.inf, dtype=np.float32)
    starts = np.concatenate([[0], np.cumsum([len(b) for b in student])]).astype(np.int64)
    inside = starts[:-1] < len(answer)
    certain = inside | finished  # unaligned: the target itself, with certainty; else no row at all
    ids[:, 0] = targets
    lps[certain, 0] = 0.0
    answer_tokens, empty = int(inside.sum()), int((~certain).sum())
    if teacher is None:
        return Aligned(ids, lps, answer_tokens, 0, empty)
    teacher_text = b"".join(teacher.tokens)
    seen = _common_prefix(b"".join(student), teacher_text)
    at: dict[int, int] = {}
    offset = 0
    for j, token in enumerate(teacher.tokens):
        at.setdefault(offset, j)
        offset += len(token)
    aligned = 0
    for i, (piece, target) in enumerate(zip(student, targets, strict=True)):
        found = at.get(int(starts[i]))
        if found is None or starts[i] + len(piece) > seen or teacher.tokens[found] != piece:
            continue
        row = _row(teacher, found, target, to_id, k)
        ids[i, : len(row)] = [t for t, _ in row]
        lps[i, : len(row)] = [lp for _, lp in row]
        aligned += int(inside[i])
        empty -= int(not certain[i])
    return Aligned(ids, lps, answer_tokens, aligned, empty)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


def _row(teacher: ResponseLogprobs, j: int, target: int, to_id: dict[bytes, int], k: int) -> list[tuple[int, float]]:
    """The teacher's alternatives at position j as (student id, logprob), best first, at most k,
    always holding the sampled token (in the last place when the alternatives left it out)."""
    row: list[tuple[int, float]] = []
    taken: set[int] = set()
    for token, lp in zip(teacher.top_tokens[j], teacher.top_logprobs[j], strict=False):
        i = to_id.get(token)
        if i is not None and i not in taken and np.isfinite(lp) and len(row) < k:
            row.append((i, float(lp)))
            taken.add(i)
    if target not in taken:
        sampled = (target, float(teacher.logprobs[j]) if np.isfinite(teacher.logprobs[j]) else 0.0)
        row = [*row[: k - 1], sampled]
    return row


def prepare_collected(
    cfg: TrainConfig, data: Path, store_path: Path, files: TrainLayout, console: Console
) -> dict[str, Any]:
    """The collected top-k of the prepared train and val splits (done once); its meta."""
    assert cfg.distill is not None
    done = [files.teacher(s) / "meta.json" for s in ("train", "val")]
    if all(p.is_file() for p in done):
        return dict(json.loads(done[0].read_text()))
    from distill4all.models.tokens import byte_table
    from distill4all.store import Store
    from distill4all.store import logprobs as stored
    from distill4all.train.data import read_examples
    from distill4all.train.model import load_tokenizer

    tokenizer = load_tokenizer(files.data / "tokenizer")
    table = byte_table(tokenizer)
    to_id: dict[bytes, int] = {}
    for i, b in enumerate(table):
        to_id.setdefault(b, i)
    examples, _ = read_examples(data, cfg.data_format)
    by_row = {ex.row: ex for ex in examples}
    by_pair = collected_logprobs(store_path)
    splits = {s: TokenizedSplit.load(files.data / s) for s in ("train", "val")}
    wanted: dict[int, tuple[int, str | None]] = {}  # file row → (response id, finish reason)
    for split in splits.values():
        for row in split.rows.tolist():
            ex = by_row[int(row)]
            if ex.single_turn and (hit := by_pair.get((ex.messages[-2]["content"], ex.messages[-1]["content"]))):
                wanted[int(row)] = hit
    found: dict[int, ResponseLogprobs] = {}
    if wanted:
        with Store(store_path, readonly=True) as store:
            ids = sorted({rid for rid, _ in wanted.values()})
            found = {r.response_id: r for r in stored.for_responses(store, ids)}
    k = min(cfg.distill.top_k, max((r.k for r in found.values()), default=1))
    metas = {}
    for name, split in splits.items():
        answers = {}
        for row in split.rows.tolist():
            text = by_row[row].messages[-1]["content"].encode("utf-8", "replace")  # a lone surrogate aligns nowhere
            hit = wanted.get(row)
            answers[row] = Answer(text, found.get(hit[0]), hit[1] != "length") if hit else Answer(text, None, True)
        metas[name] = _write_split(split, answers, table, to_id, k, files.teacher(name))
    train = metas["train"]
    share = train["aligned"] / max(train["answer_tokens"], 1)
    if share < cfg.distill.min_aligned:
        raise ConfigError(
            f"train.distill: the collected logprobs align with {share:.1%} of the student's answer tokens "
            f"({train['aligned']:,} of {train['answer_tokens']:,}; {train['with_logprobs']} of {train['examples']} "
            f"answers carry logprobs), below distill.min_aligned {cfg.distill.min_aligned:.0%}; "
            "the student needs the teacher's tokenizer (distillation across tokenizers is not supported)"
        )
    for name in splits:
        atomic.write_json(files.teacher(name) / "meta.json", metas[name])
    console.print(
        f"train: collected top-{k} logprobs for {train['with_logprobs']} of {train['examples']} train answers; "
        f"{share:.1%} of their tokens aligned with the student's ({k * BYTES_PER_ENTRY} bytes a position)"
    )
    return train


def _write_split(
    split: TokenizedSplit,
    answers: dict[int, Answer],
    table: list[bytes],
    to_id: dict[bytes, int],
    k: int,
    folder: Path,
) -> dict[str, Any]:
    """ids.npy and logprobs.npy for every target position of `split`, in its flat order; the meta
    (written by the caller once alignment is accepted)."""
    folder.mkdir(parents=True, exist_ok=True)
    n_targets = int(split.target_counts.sum())
    counts = {"answer_tokens": 0, "aligned": 0, "empty": 0, "with_logprobs": 0}
    with atomic.output_file(folder / "ids.npy") as ids_tmp, atomic.output_file(folder / "logprobs.npy") as lps_tmp:
        ids = np.lib.format.open_memmap(ids_tmp, mode="w+", dtype=np.int32, shape=(n_targets, k))
        lps = np.lib.format.open_memmap(lps_tmp, mode="w+", dtype=np.float16, shape=(n_targets, k))
        at = 0
        for i in range(len(split)):
            _, targets = split.tokens(i)
            want = targets[targets != IGNORE].tolist()
            answer = answers[int(split.rows[i])]
            got = align(
                [table[t] for t in want], want, answer.text, answer.logprobs, to_id, k, finished=answer.finished
            )
            ids[at : at + len(want)] = got.ids
            lps[at : at + len(want)] = got.logprobs
            at += len(want)
            counts["answer_tokens"] += got.answer_tokens
            counts["aligned"] += got.aligned
            counts["empty"] += got.empty
            counts["with_logprobs"] += answer.logprobs is not None
        ids.flush()
        lps.flush()
        del ids, lps
    return {
        "source": "collected", "k": k, "n_targets": n_targets, "bytes_per_token": k * BYTES_PER_ENTRY,
        "examples": len(split), **counts,
    }  # fmt: skip
