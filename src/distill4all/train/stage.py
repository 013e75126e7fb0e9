"""Stage `train`: prepare the data once, then train in this process or under `accelerate launch`.

    train/data/          tokenized train/val splits, the tokenizer (pad token, chat_template =
                         the training template) and meta.json with the data's counts
    train/checkpoints/   resumable checkpoints (removed once the model is saved)
    train/metrics.jsonl  one row per step and per validation
    train/loss.png       the loss curve
    train/model/         the result: a PEFT adapter (or full weights) + tokenizer + training.json
    train/summary.json   the run's totals; its presence means training finished

Rerunning after a kill resumes from the latest checkpoint; the data is prepared again only if
the kill came before train/data/ was complete.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.config import ACCELERATE_CONFIGS, RunConfig, TrainConfig
from distill4all.errors import ConfigError, DataError, StageError
from distill4all.run import StageContext, StageResult

UPSTREAM: tuple[str, ...] = ("collect", "curate")
CHUNK = 512  # examples tokenized per batch call


def data_path(config: RunConfig) -> Path:
    """train.data when set, else what the run's curate stage kept, else what its collect stage got."""
    cfg = config.train
    assert cfg is not None
    if cfg.data is not None:
        return cfg.data
    if config.curate is not None:
        return config.run_dir / "curate" / "train.jsonl"
    if config.collect is not None:
        return config.run_dir / "collect" / "pairs.jsonl"
    raise ConfigError("train has no data: set train.data to a pairs file, or configure a collect/curate stage")


def inputs(config: RunConfig) -> list[Path]:
    """Checked here, before the stage is recorded as started, so that a typo costs nothing."""
    assert config.train is not None
    files = [data_path(config)] + ([config.train.template_file] if config.train.template_file else [])
    for f in files:
        if not f.is_file():
            raise DataError(f"train: file not found: {f}")
    return files


def prepare(cfg: TrainConfig, data: Path, base: Path, folder: Path, seed: int, console: Console) -> dict[str, Any]:
    """Read, split and tokenize the data; save it with the tokenizer. Done once (atomic folder)."""
    if (folder / "meta.json").is_file():
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


def accelerate_config(cfg: TrainConfig) -> Path:
    """A shipped accelerate config by name, or the user's own file."""
    if cfg.accelerate_config in ACCELERATE_CONFIGS:
        name = cfg.accelerate_config
        return Path(str(resources.files("distill4all.train").joinpath("accelerate", f"{name}.yaml")))
    path = Path(cfg.accelerate_config).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"train.accelerate_config: {cfg.accelerate_config!r} is neither {', '.join(ACCELERATE_CONFIGS)} nor a file"
        )
    return path


def launch_command(cfg: TrainConfig, job_file: Path) -> list[str]:
    with socket.socket() as s:  # a free port, so that two runs on one machine do not collide
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config(cfg)),
        "--num_processes", str(cfg.num_processes), "--main_process_port", str(port),
        "-m", "distill4all.train.worker", str(job_file),
    ]  # fmt: skip


def _progress(ctx: StageContext) -> Callable[[dict[str, Any]], None]:
    """Record the step and latest losses in the store, so that `distill4all status` shows them."""
    shown: dict[str, Any] = {}

    def update(row: dict[str, Any]) -> None:
        shown["step"], shown["of"] = row["step"], row["total_steps"]
        for key in ("loss", "val_loss"):
            if row.get(key) is not None:
                shown[key] = round(row[key], 4)
        ctx.set_counts(**shown)

    return update


def _launch(cfg: TrainConfig, job_file: Path, ctx: StageContext) -> None:
    import torch

    from distill4all.train.loop import total_steps
    from distill4all.train.metrics import read_metrics
    from distill4all.train.worker import die_with_parent

    env = dict(os.environ)
    if not torch.cuda.is_available():
        # torchrun starts the processes either way; this makes accelerate join them over gloo on
        # the CPU (its own CPU launcher would want mpirun).
        env["ACCELERATE_USE_CPU"] = "true"
    # torch would give every process all cores; share them out instead.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // cfg.num_processes)))
    cmd = launch_command(cfg, job_file)
    ctx.console.print(f"[dim]train: {' '.join(cmd[1:])}[/dim]")
    proc = subprocess.Popen(cmd, env=env, preexec_fn=die_with_parent)
    update, metrics = _progress(ctx), ctx.dir / "metrics.jsonl"
    steps = total_steps(cfg, json.loads((ctx.dir / "data" / "meta.json").read_text())["train_examples"])
    try:
        while (code := proc.poll()) is None:  # the workers write metrics; show the latest in `status`
            time.sleep(2)
            if rows := read_metrics(metrics, tail_bytes=4096):
                update({**rows[-1], "total_steps": steps})
    except BaseException:
        proc.terminate()
        proc.wait()
        raise
    if code != 0:
        raise StageError(f"the training processes failed (exit code {code}); their output is above")


def run(ctx: StageContext) -> StageResult:
    from distill4all.models import resolve_model
    from distill4all.train.loop import Job, train

    cfg = ctx.config.train
    assert cfg is not None
    out = ctx.dir
    summary_file = out / "summary.json"
    if not summary_file.is_file():  # else it finished before a kill kept the runner from recording it
        base = resolve_model(cfg.base_model, want="hf").path
        prepare(cfg, data_path(ctx.config), base, out / "data", ctx.config.seed, ctx.console)
        job = Job(cfg, base, out / "data", out, ctx.config.seed, ctx.quiet)
        launched = cfg.launcher == "accelerate" or (cfg.launcher == "auto" and cfg.num_processes > 1)
        if launched:
            job_file = out / "job.json"
            atomic.write_text(job_file, job.to_json())
            _launch(cfg, job_file, ctx)
        else:
            if cfg.num_processes > 1:
                raise ConfigError("train.launcher local runs one process; use launcher accelerate for more")
            train(job, ctx.console, _progress(ctx))
        if not summary_file.is_file():
            raise StageError(f"training ended without writing {summary_file}")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the model is saved; they were for resuming
    summary = json.loads(summary_file.read_text())
    meta = json.loads((out / "data" / "meta.json").read_text())
    counts = {k: summary[k] for k in ("steps", "train_examples", "val_examples", "tokens", "tokens_per_s")}
    counts |= {k: round(summary[k], 4) for k in ("first_val_loss", "last_val_loss") if summary[k] is not None}
    counts |= {"truncated": meta["truncated"], "dropped": meta["dropped_no_target"] + meta["blank"]}
    return StageResult(counts=counts, artifacts=[out / "model", out / "metrics.jsonl", out / "loss.png"])


def reset(ctx: StageContext) -> None:
    shutil.rmtree(ctx.dir, ignore_errors=True)
