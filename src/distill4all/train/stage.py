"""Stage `train`: prepare the data once (prepare.py), then train in this process (loop.py) or
under `accelerate launch` (launch.py, worker.py).

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
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.config import RunConfig, TrainConfig
from distill4all.errors import ConfigError, DataError, StageFailure
from distill4all.layout import RunLayout, TrainLayout
from distill4all.run import StageContext, StageResult
from distill4all.train.card import write_model_card

UPSTREAM: tuple[str, ...] = ("collect", "curate")
READS: tuple[str, ...] = ()  # which file it trains on follows from curate/collect being set; it is hashed


def data_path(config: RunConfig) -> Path:
    """train.data when set, else what the run's curate stage kept, else what its collect stage got."""
    cfg = config.train
    assert cfg is not None
    if cfg.data is not None:
        return cfg.data
    if config.curate is not None:
        return RunLayout.of(config).curate.train_pairs
    if config.collect is not None:
        return RunLayout.of(config).collect.pairs
    raise ConfigError("train has no data: set train.data to a pairs file, or configure a collect/curate stage")


def inputs(config: RunConfig) -> list[Path]:
    """Checked here, before the stage is recorded as started, so that a typo costs nothing."""
    assert config.train is not None
    files = [data_path(config)] + ([config.train.template_file] if config.train.template_file else [])
    for f in files:
        if not f.is_file():
            raise DataError(f"train: file not found: {f}")
    return files


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


def _pruned_student(cfg: TrainConfig, files: TrainLayout, data: Path, ctx: StageContext) -> Path:
    """base_model with its least influential layers removed, measured on the training pairs; made
    once (train/student/, written atomically)."""
    from distill4all.models.prune import calibration_texts, prune_depth

    assert cfg.prune is not None
    if not (files.student / "config.json").is_file():
        with ctx.console.status(f"train: pruning {cfg.base_model}…") if not ctx.quiet else nullcontext():
            texts = calibration_texts(data, cfg.prune.samples, ctx.config.seed)
            result = prune_depth(
                cfg.base_model, files.student, drop_layers=cfg.prune.drop_layers,
                keep_fraction=cfg.prune.keep_fraction, texts=texts,
            )  # fmt: skip
        ctx.console.print(
            f"train: student {cfg.base_model} pruned from {result.layers_before} to {result.layers_after} layers "
            f"({result.params_before / 1e6:.1f}M → {result.params_after / 1e6:.1f}M parameters)"
        )
    return files.student


def _prepare_distill(cfg: TrainConfig, data: Path, ctx: StageContext) -> None:
    """The teacher's top-k at every trained position: from the answers' collected logprobs, or
    from a local teacher (distill.source; auto takes the collected ones when the store has any)."""
    from distill4all.train.collected import has_collected_logprobs, prepare_collected
    from distill4all.train.teacher_topk import prepare_teacher

    assert cfg.distill is not None
    files, store = ctx.layout.train, ctx.layout.store
    source = cfg.distill.source
    if source == "auto":
        source = "collected" if has_collected_logprobs(store) else "local"
    if source == "collected":
        prepare_collected(cfg, data, store, files, ctx.console)
    else:
        prepare_teacher(cfg, files, ctx.console)


def run(ctx: StageContext) -> StageResult:
    from distill4all.models import resolve_model
    from distill4all.train.launch import launch
    from distill4all.train.loop import Job, train
    from distill4all.train.prepare import prepare

    cfg = ctx.config.train
    assert cfg is not None
    out, files = ctx.dir, ctx.layout.train
    summary_file = files.summary
    if not summary_file.is_file():  # else it finished before a kill kept the runner from recording it
        base = _pruned_student(cfg, files, data_path(ctx.config), ctx) if cfg.prune else None
        base = base or resolve_model(cfg.base_model, want="hf").path
        prepare(cfg, data_path(ctx.config), base, files.data, ctx.config.seed, ctx.console)
        if cfg.distill is not None:
            _prepare_distill(cfg, data_path(ctx.config), ctx)
        job = Job(cfg, base, files.data, out, ctx.config.seed, ctx.quiet)
        launched = cfg.launcher == "accelerate" or (cfg.launcher == "auto" and cfg.num_processes > 1)
        if launched:
            job_file = files.job
            atomic.write_text(job_file, job.to_json())
            launch(cfg, job_file, files, ctx.console, _progress(ctx))
        else:
            if cfg.num_processes > 1:
                raise ConfigError("train.launcher local runs one process; use launcher accelerate for more")
            train(job, ctx.console, _progress(ctx))
        if not summary_file.is_file():
            raise StageFailure(f"training ended without writing {summary_file}")
    shutil.rmtree(files.checkpoints, ignore_errors=True)  # the model is saved; they were for resuming
    write_model_card(files.model, cfg, data_path(ctx.config), run_dir=ctx.config.run_dir, n_layers=_layers(files))
    summary = json.loads(summary_file.read_text())
    meta = json.loads(files.data_meta.read_text())
    counts = {k: summary[k] for k in ("steps", "train_examples", "val_examples", "tokens", "tokens_per_s")}
    counts |= {k: round(summary[k], 4) for k in ("first_val_loss", "last_val_loss") if summary[k] is not None}
    counts |= {"truncated": meta["truncated"], "dropped": meta["dropped_no_target"] + meta["blank"]}
    if cfg.distill is not None:
        teacher = json.loads((files.teacher("train") / "meta.json").read_text())
        counts |= {k: round(summary[k], 4) for k in ("last_ce_loss", "last_kd_loss") if k in summary}
        counts |= {"distill_top_k": teacher["k"], "distill_bytes_per_token": teacher["bytes_per_token"]}
        counts["distill_source"] = teacher.get("source", "local")
        if "answer_tokens" in teacher:
            counts["distill_aligned"] = round(teacher["aligned"] / max(teacher["answer_tokens"], 1), 4)
    return StageResult(counts=counts, artifacts=[files.model, files.metrics, files.loss_png])


def _layers(files: TrainLayout) -> int | None:
    """Decoder layers of the trained model (of the pruned student, for an adapter)."""
    config = files.model / "config.json"
    if not config.is_file():
        config = files.student / "config.json"
    try:
        return int(json.loads(config.read_text())["num_hidden_layers"])
    except (OSError, ValueError, KeyError):
        return None


def reset(ctx: StageContext) -> None:
    """Nothing beyond its files, which the runner removes (exactly those the stage wrote)."""
