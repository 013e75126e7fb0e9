"""Stage `export`: the run's model (train/model/, or export.model without a train stage) → GGUF
files in export/, their quantization report in export/quant_report.json and the manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

from distill4all.config import RunConfig
from distill4all.errors import StageError
from distill4all.export.exporter import REPORT_FILE, export_model
from distill4all.models import BUILTINS
from distill4all.run import StageContext, StageResult

UPSTREAM: tuple[str, ...] = ("train",)


def source(config: RunConfig) -> str:
    """What to export: train's output when the run trains, else `export.model` (a name, or a path
    read like collect's teacher model paths)."""
    cfg = config.export
    assert cfg is not None
    if config.train is not None and cfg.model is None:
        return str(config.run_dir / "train" / "model")
    if cfg.model is None:
        raise StageError("export.model is required when the run has no train stage (a model name or path)")
    return cfg.model


def inputs(config: RunConfig) -> list[Path]:
    assert config.export is not None
    if config.train is not None and config.export.model is None:
        return [config.run_dir / "train" / "model"]
    model = config.export.model
    return [Path(model).expanduser()] if model and model not in BUILTINS else []


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.export
    assert cfg is not None
    outcome = export_model(source(ctx.config), ctx.dir, cfg, console=ctx.console, quiet=ctx.quiet)
    report = [r.as_dict() for r in outcome.report]
    artifacts = [*outcome.files, *([ctx.dir / REPORT_FILE] if report else [])]
    if outcome.merged is not None:
        artifacts.append(outcome.merged)
    counts = {
        "files": len(outcome.files),
        "pre_tokenizer": outcome.pre_tokenizer,
        "compat_checked_tokens": outcome.compat_checked_tokens,
        "quant_report": report,
    }
    return StageResult(counts=counts, artifacts=artifacts)


def reset(ctx: StageContext) -> None:
    shutil.rmtree(ctx.dir, ignore_errors=True)
