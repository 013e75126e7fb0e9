"""Stage `export`: the run's model (train/model/, or export.model without a train stage) → GGUF
files in export/, their quantization report in export/quant_report.json and the manifest."""

from __future__ import annotations

from pathlib import Path

from distill4all.config import RunConfig
from distill4all.errors import StageError
from distill4all.export.exporter import export_model
from distill4all.layout import RunLayout
from distill4all.models import BUILTINS
from distill4all.run import StageContext, StageResult

UPSTREAM: tuple[str, ...] = ("train",)
# What it exports is train's model when the run trains (train.base_model is set), with the chat
# template train wrote from train.template(_file) into its tokenizer.
READS: tuple[str, ...] = ("train.base_model", "train.template", "train.template_file")


def source(config: RunConfig) -> str:
    """What to export: train's output when the run trains, else `export.model` (a name, or a path
    read like collect's teacher model paths)."""
    cfg = config.export
    assert cfg is not None
    if config.train is not None and cfg.model is None:
        return str(RunLayout.of(config).train.model)
    if cfg.model is None:
        raise StageError("export.model is required when the run has no train stage (a model name or path)")
    return cfg.model


def inputs(config: RunConfig) -> list[Path]:
    assert config.export is not None
    if config.train is not None and config.export.model is None:
        return [RunLayout.of(config).train.model]
    model = config.export.model
    return [Path(model).expanduser()] if model and model not in BUILTINS else []


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.export
    assert cfg is not None
    outcome = export_model(
        source(ctx.config), ctx.dir, cfg, console=ctx.console, quiet=ctx.quiet, eval_summary=ctx.layout.eval.summary
    )
    report = [r.as_dict() for r in outcome.report]
    files = ctx.layout.export
    artifacts = [*outcome.files, *([files.quant_report] if report else []), files.card]
    if outcome.runtimes is None:
        artifacts += [*(files.modelfile(f) for f in outcome.files), files.gpt4all]
    if outcome.merged is not None:
        artifacts.append(outcome.merged)
    counts = {
        "files": len(outcome.files),
        "pre_tokenizer": outcome.pre_tokenizer,
        "compat_checked_tokens": outcome.compat_checked_tokens,
        "chat_tokens_differ": outcome.chat_tokens,
        "license": outcome.license,
        "runtime_files": outcome.runtimes or "written",
        "quant_report": report,
    }
    return StageResult(counts=counts, artifacts=artifacts)


def reset(ctx: StageContext) -> None:
    """Nothing beyond its files, which the runner removes (exactly those the stage wrote)."""
