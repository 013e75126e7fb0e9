"""From tokenized examples to micro-batches: the data order, packing and padding.

The data order is a pure function of (seed, epoch): step `s` of an epoch takes the next
`global_batch_size` examples of that epoch's permutation, so a resumed run needs only the step
number to see exactly the examples an uninterrupted run would. A final partial global batch of an
epoch is dropped (reshuffled each epoch, so no example is always left out), as torchtune does.

Within a step, the examples are dealt to processes and micro-batches (every process runs the same
number of micro-batches, as gradient accumulation and DeepSpeed require), then laid into rows:

  packing      several examples end to end per row of at most max_length tokens (first-fit
               decreasing); position ids restart at 0 for each example, and transformers turns
               restarting position ids into a block-diagonal causal mask (sdpa/eager) or
               variable-length attention (flash-attention), so no token sees another example
  padding      one example per row, padded to the longest row or, as the paper did, to max_length

Targets are next-token labels computed per example before rows are built (target[i] is the label
of token i + 1), so no loss term ever crosses from one packed example into the next.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill4all import atomic
from distill4all.train.templates import IGNORE, Encoded


@dataclass
class TokenizedSplit:
    """Examples as flat arrays: tokens and next-token targets, with per-example offsets."""

    input_ids: np.ndarray  # int32, all examples end to end
    targets: np.ndarray  # int32, IGNORE where no loss
    offsets: np.ndarray  # int64, len n + 1
    rows: np.ndarray  # int64, each example's row in the input file

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def tokens(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.targets[a:b]

    @property
    def target_counts(self) -> np.ndarray:
        """Tokens with a target, per example."""
        has = np.concatenate([[0], np.cumsum(self.targets != IGNORE)])
        return np.asarray(has[self.offsets[1:]] - has[self.offsets[:-1]])

    @classmethod
    def build(cls, encoded: list[Encoded], rows: list[int]) -> TokenizedSplit:
        lengths = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        empty = np.zeros(0, dtype=np.int32)
        input_ids = np.concatenate([empty, *(np.asarray(e.input_ids, dtype=np.int32) for e in encoded)])
        # next-token targets, per example: the last token of each example predicts nothing
        targets = np.concatenate([empty, *(np.asarray([*e.labels[1:], IGNORE], dtype=np.int32) for e in encoded)])
        return cls(input_ids, targets, offsets, np.asarray(rows, dtype=np.int64))

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("input_ids", "targets", "offsets", "rows"):
            with atomic.output_file(folder / f"{name}.npy") as tmp, open(tmp, "wb") as f:
                np.save(f, getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> TokenizedSplit:
        arrays = {n: np.load(folder / f"{n}.npy", mmap_mode="r") for n in ("input_ids", "targets", "offsets", "rows")}
        return cls(**arrays)


@dataclass
class TeacherTopK:
    """A teacher's top-k next tokens at every target position of one split, in the split's flat
    order of target positions (see train/teacher_topk.py): example i's rows are starts[i]:starts[i + 1]."""

    ids: np.ndarray  # int32 (n_targets, k)
    logprobs: np.ndarray  # float16 (n_targets, k)
    starts: np.ndarray  # int64 (n_examples + 1)

    @classmethod
    def load(cls, folder: Path, split: TokenizedSplit) -> TeacherTopK:
        ids = np.load(folder / "ids.npy", mmap_mode="r")
        logprobs = np.load(folder / "logprobs.npy", mmap_mode="r")
        starts = np.concatenate([[0], np.cumsum(split.target_counts)]).astype(np.int64)
        if len(ids) != starts[-1] or ids.shape != logprobs.shape:
            raise ValueError(f"{folder}: {len(ids)} teacher rows for {starts[-1]} target positions")
        return cls(ids, logprobs, starts)

    def rows(self, examples: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The rows of these examples, one after another (the order their targets are laid out in)."""
        index = np.concatenate([np.arange(self.starts[i], self.starts[i + 1]) for i in examples])
        return np.asarray(self.ids[index]), np.asarray(self.logprobs[index])


def steps_per_epoch(n_examples: int, global_batch_size: int) -> int:
    return n_examples // global_batch_size


def step_examples(step: int, n_examples: int, global_batch_size: int, seed: int) -> np.ndarray:
    """The example indices of optimizer step `step` (0-based), from that epoch's permutation."""
    per_epoch = steps_per_epoch(n_examples, global_batch_size)
    epoch, k = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[k * global_batch_size : (k + 1) * global_batch_size]


def deal(
    ids: np.ndarray, lengths: np.ndarray, processes: int, accumulation: int, group_by_length: bool
) -> list[list[np.ndarray]]:
    """Split one step's examples into [process][micro-batch] groups of equal size.

    With `group_by_length`, examples are sorted by length first and each micro-batch takes a run
    of neighbours (little padding), the processes taking adjacent runs at each micro-step (even
    work). Without it they are dealt round-robin in data order.
    """
    slots = processes * accumulation
    if group_by_length:
        ids = ids[np.argsort(-lengths[ids], kind="stable")]
        runs = np.array_split(ids, slots)  # run k goes to micro-step k // processes, process k % processes
        return [[runs[m * processes + p] for m in range(accumulation)] for p in range(processes)]
    return [[ids[m * processes + p :: slots] for m in range(accumulation)] for p in range(processes)]


def pack(ids: np.ndarray, lengths: np.ndarray, max_length: int) -> list[list[int]]:
    """First-fit decreasing: few rows, each holding whole examples of at most max_length tokens in all."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(ids.tolist(), key=lambda j: -int(lengths[j])):
        n = int(lengths[i])
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


@dataclass
class MicroBatch:
    input_ids: Any  # torch.LongTensor (rows, width)
    targets: Any  # torch.LongTensor (rows, width)
    position_ids: Any | None  # packing: restarting per example
    attention_mask: Any | None  # padding: 1 for tokens, 0 for padding
    tokens: int  # real (non-pad) tokens
    target_tokens: int
    teacher_ids: Any | None = None  # torch.LongTensor (target_tokens, k), in row-major target order
    teacher_logprobs: Any | None = None  # torch.FloatTensor (target_tokens, k)

    def model_inputs(self) -> dict[str, Any]:
        out = {"input_ids": self.input_ids, "targets": self.targets}
        if self.position_ids is not None:
            out["position_ids"] = self.position_ids
        if self.attention_mask is not None:
            out["attention_mask"] = self.attention_mask
        if self.teacher_ids is not None:
            out["teacher_ids"] = self.teacher_ids
            out["teacher_logprobs"] = self.teacher_logprobs
        return out


def collate(
    data: TokenizedSplit,
    ids: np.ndarray,
    *,
    packing: bool,
    max_length: int,
    pad_id: int,
    pad_to_max_length: bool = False,
    teacher: TeacherTopK | None = None,
) -> MicroBatch:
    """Rows of tokens, targets and positions for one micro-batch (pad id only fills; it never masks),
    and, with `teacher`, its top-k at each target in the order the loss reads them (row-major)."""
    import torch

    lengths = data.lengths
    rows = pack(ids, lengths, max_length) if packing else [[int(i)] for i in ids]
    width = max_length if pad_to_max_length else max(sum(int(lengths[i]) for i in row) for row in rows)
    n = len(rows)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    targets = np.full((n, width), IGNORE, dtype=np.int64)
    positions = np.zeros((n, width), dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            tok, tgt = data.tokens(i)
            k = len(tok)
            input_ids[r, at : at + k] = tok
            targets[r, at : at + k] = tgt
            positions[r, at : at + k] = np.arange(k)
            at += k
        mask[r, :at] = 1
        # The padding tail is a segment of its own (positions from 0), so that with packing no
        # real token attends to it; it has no targets, so it adds nothing to the loss.
        positions[r, at:] = np.arange(width - at)
    tokens = int(mask.sum())
    batch = MicroBatch(
        input_ids=torch.from_numpy(input_ids),
        targets=torch.from_numpy(targets),
        position_ids=torch.from_numpy(positions) if packing else None,
        attention_mask=None if packing else torch.from_numpy(mask),
        tokens=tokens,
        target_tokens=int((targets != IGNORE).sum()),
    )
    if teacher is not None:
        ids, logprobs = teacher.rows([i for row in rows for i in row])
        batch.teacher_ids = torch.from_numpy(ids.astype(np.int64))
        batch.teacher_logprobs = torch.from_numpy(logprobs.astype(np.float32))
    return batch
