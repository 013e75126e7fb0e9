"""A local teacher's top-k next tokens at every trained position of the tokenized data, computed
once before training and kept beside it (train/teacher/<split>/):

    ids.npy       int32   (n_targets, k)  the teacher's k most likely next tokens, most likely first
    logprobs.npy  float16 (n_targets, k)  their log-probabilities under its full softmax
    meta.json     teacher, k, counts; written last, so its presence means the split is done
    chunks/       the pass in pieces of CHUNK examples, each written atomically: a killed pass
                  resumes at the first missing piece (removed once the split is assembled)

Row r belongs to the r-th position of the split, in its flat token order, that has a target
(`TeacherTopK` in batching.py finds an example's rows by a cumulative count). The teacher reads
exactly the student's token ids, so it must share the student's vocabulary: `vocab_alignment`
measures that, and the stage refuses KD below `distill.min_aligned`.

Written here rather than in the loop: TRL's GKDTrainer runs the teacher inside every step (a
second forward per step, every epoch); a cached top-k costs one teacher pass and k·6 bytes a token.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.errors import ConfigError
from distill4all.layout import TrainLayout
from distill4all.train.batching import TokenizedSplit, collate
from distill4all.train.templates import IGNORE

CHUNK = 64  # examples per resumable piece


def prepare_teacher(cfg: TrainConfig, files: TrainLayout, console: Console) -> dict[str, Any]:
    """The teacher's top-k over the prepared train and val splits (each done once); the teacher,
    its vocabulary alignment and bytes per token, for the stage's counts."""
    from transformers import AutoModelForCausalLM

    from distill4all.models import resolve_model
    from distill4all.models.registry import quiet_hf
    from distill4all.train.model import load_tokenizer

    assert cfg.distill is not None
    spec = cfg.distill.teacher or cfg.base_model
    path = resolve_model(spec, want="hf").path
    student_tokenizer = load_tokenizer(files.data / "tokenizer")
    aligned = vocab_alignment(student_tokenizer, load_tokenizer(path))
    if aligned < cfg.distill.min_aligned:
        raise ConfigError(
            f"train.distill: the teacher {spec} gives {aligned:.1%} of the student's vocabulary the same ids, "
            f"below distill.min_aligned {cfg.distill.min_aligned:.0%}; distillation across tokenizers is not supported"
        )
    done = [files.teacher(s) / "meta.json" for s in ("train", "val")]
    if all(p.is_file() for p in done):
        return {"teacher": spec, "aligned": aligned, **json.loads(done[0].read_text())}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with quiet_hf():
        teacher = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).to(device).eval()
    metas = [
        compute_split(
            teacher, TokenizedSplit.load(files.data / split), files.teacher(split), k=cfg.distill.top_k,
            vocab_size=len(student_tokenizer), batch_tokens=cfg.distill.batch_tokens, console=console, label=split,
        )
        for split in ("train", "val")
    ]  # fmt: skip
    console.print(
        f"train: teacher {spec} top-{metas[0]['k']} at {metas[0]['n_targets']:,} train and {metas[1]['n_targets']:,} "
        f"val positions ({metas[0]['bytes_per_token']} bytes a position; vocabulary {aligned:.1%} aligned)"
    )
    return {"teacher": spec, "aligned": aligned, **metas[0]}


def vocab_alignment(student_tokenizer: Any, teacher_tokenizer: Any) -> float:
    """Share of the student's vocabulary (token string → id) that the teacher maps to the same id."""
    student, teacher = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    same = sum(1 for token, i in student.items() if teacher.get(token) == i)
    return same / max(len(student), 1)


def compute_split(
    teacher: Any,
    split: TokenizedSplit,
    folder: Path,
    *,
    k: int,
    vocab_size: int,
    batch_tokens: int,
    console: Console,
    label: str,
) -> dict[str, Any]:
    """Fill `folder` with the teacher's top-k at every target of `split` (resuming); its meta."""
    meta_file = folder / "meta.json"
    if meta_file.is_file():
        return dict(json.loads(meta_file.read_text()))
    chunks = folder / "chunks"
    chunks.mkdir(parents=True, exist_ok=True)
    n = len(split)
    starts = list(range(0, n, CHUNK))
    title = TextColumn(f"train · teacher top-{k} ({label})")
    with Progress(title, BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task("teacher", total=n)
        for lo in starts:
            piece = chunks / f"{lo:09d}.npz"
            if not piece.is_file():
                ids, logprobs = _top_k(teacher, split, range(lo, min(lo + CHUNK, n)), k, vocab_size, batch_tokens)
                with atomic.output_file(piece) as tmp, open(tmp, "wb") as f:
                    np.savez(f, ids=ids, logprobs=logprobs)
            bar.update(task, completed=min(lo + CHUNK, n))
    meta = _assemble(folder, [chunks / f"{lo:09d}.npz" for lo in starts], min(k, vocab_size))
    shutil.rmtree(chunks, ignore_errors=True)
    return meta


def _top_k(
    teacher: Any, split: TokenizedSplit, examples: range, k: int, vocab_size: int, batch_tokens: int
) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-k at each target of these examples, in order; examples are run in padded
    batches of about `batch_tokens` tokens."""
    out_ids, out_lps = [], []
    batch: list[int] = []
    longest = 0
    for i in [*examples, None]:
        length = int(split.lengths[i]) if i is not None else 0
        if batch and (i is None or max(longest, length) * (len(batch) + 1) > batch_tokens):
            ids, lps = _forward(teacher, split, batch, k, vocab_size)
            out_ids.append(ids)
            out_lps.append(lps)
            batch, longest = [], 0
        if i is not None:
            batch.append(i)
            longest = max(longest, length)
    width = min(k, vocab_size)
    return (
        np.concatenate([np.zeros((0, width), np.int32), *out_ids]).astype(np.int32),
        np.concatenate([np.zeros((0, width), np.float16), *out_lps]).astype(np.float16),
    )


def _forward(teacher: Any, split: TokenizedSplit, batch: list[int], k: int, vocab_size: int) -> tuple[Any, Any]:
    from distill4all.train.model import plain_head, target_logits

    # one example a row, padded: the rows (and so the targets, row-major) keep the examples' order
    ids = np.asarray(batch)
    rows = collate(split, ids, packing=False, max_length=int(split.lengths[ids].max()), pad_id=0)
    assert rows.attention_mask is not None  # set whenever rows are padded, not packed
    device = next(teacher.parameters()).device
    inputs = {"input_ids": rows.input_ids.to(device), "attention_mask": rows.attention_mask.to(device)}
    keep = (rows.targets != IGNORE).to(device)
    with torch.no_grad():
        logits = target_logits(teacher, keep, inputs, selective=plain_head(teacher)).float()
    # the full softmax (tokens the student lacks still take their share), then the student's ids only
    logprobs = F.log_softmax(logits, dim=-1)[:, :vocab_size]
    top = torch.topk(logprobs, min(k, vocab_size), dim=-1)
    return top.indices.cpu().numpy(), top.values.cpu().numpy()


def _assemble(folder: Path, pieces: list[Path], width: int) -> dict[str, Any]:
    """The pieces, in order, as one pair of arrays (memory-mapped: a million pairs' top-64 is tens
    of GB)."""
    sizes = []
    for p in pieces:
        with np.load(p) as z:
            sizes.append(len(z["ids"]))
    total = sum(sizes)
    for name, dtype in (("ids", np.int32), ("logprobs", np.float16)):
        with atomic.output_file(folder / f"{name}.npy") as tmp:
            out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(total, width))
            at = 0
            for p, size in zip(pieces, sizes, strict=True):
                with np.load(p) as z:
                    out[at : at + size] = z[name]
                at += size
            out.flush()
            del out
    meta = {"source": "local", "k": width, "n_targets": total, "bytes_per_token": width * 6}  # int32 + float16
    atomic.write_json(folder / "meta.json", meta)
    return meta
