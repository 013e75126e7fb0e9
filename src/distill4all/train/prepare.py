"""Read, split and tokenize the training data once; save it with the tokenizer (train/data/).

The tokenizer saved here carries the training template as its chat_template: the one source of
truth that export, chat, serve and eval read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.errors import DataError

CHUNK = 512  # examples tokenized per batch call


def prepare(cfg: TrainConfig, data: Path, base: Path, folder: Path, seed: int, console: Console) -> dict[str, Any]:
    """Read, split and tokenize the data; save it with the tokenizer. Done once (atomic folder)."""
    if (folder / "meta.json").is_file():  # done before a kill
        return dict(json.loads((folder / "meta.json").read_text()))
    import numpy as np

    from distill4all.train.batching import TokenizedSplit
    from distill4all.train.data import read_examples, split_indices
    from distill4all.train.model import load_tokenizer, set_pad_token
    from distill4all.train.templates import load_template

    tokenizer = load_tokenizer(base)
    pad_added = set_pad_token(tokenizer, cfg.pad_token)
    tmpl = load_template(cfg.template, tokenizer, cfg.max_length, cfg.train_on_inputs, cfg.template_file)
    examples, stats = read_examples(data, cfg.data_format)
    train_idx, val_idx = split_indices(len(examples), cfg.val_fraction, seed)
    counts = {"truncated": 0, "no_target": 0}

    def encode(indices: np.ndarray, bar: Progress, task: Any) -> TokenizedSplit:
        kept, rows = [], []
        for at in range(0, len(indices), CHUNK):
            chunk = [examples[int(i)] for i in indices[at : at + CHUNK]]
            for ex, enc in zip(chunk, tmpl.encode(chunk), strict=True):
                if enc.trainable == 0:  # all of it prompt, or the answer cut away
                    counts["no_target"] += 1
                    continue
                counts["truncated"] += enc.truncated
                kept.append(enc)
                rows.append(ex.row)
            bar.update(task, advance=len(chunk))
        return TokenizedSplit.build(kept, rows)

    columns = (TextColumn("train · tokenize"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=console.quiet) as bar:
        task = bar.add_task("tokenize", total=len(examples))
        train, val = encode(train_idx, bar, task), encode(val_idx, bar, task)
    if len(train) < cfg.global_batch_size:
        raise DataError(
            f"{data}: {len(train)} training examples, fewer than one global batch "
            f"({cfg.global_batch_size}); lower train.global_batch_size or add data"
        )
    tokenizer.chat_template = tmpl.jinja  # one source of truth: saved with the model
    meta = {
        "data": str(data), "template": tmpl.name, "rows": stats.rows, "blank": stats.empty,
        "train_examples": len(train), "val_examples": len(val), "dropped_no_target": counts["no_target"],
        "truncated": counts["truncated"], "train_tokens": int(train.offsets[-1]),
        "train_target_tokens": int(train.target_counts.sum()), "pad_token": tokenizer.pad_token,
        "pad_token_added": pad_added,
    }  # fmt: skip
    with atomic.output_dir(folder, replace=True) as tmp:
        train.save(tmp / "train")
        val.save(tmp / "val")
        tokenizer.save_pretrained(tmp / "tokenizer")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    console.print(
        f"train: {meta['train_examples']} train / {meta['val_examples']} val examples from {data.name} "
        f"(template {tmpl.name}; {meta['truncated']} cut at max_length, {meta['dropped_no_target']} with "
        f"nothing to learn and {meta['blank']} blank rows left out)"
    )
    return meta
