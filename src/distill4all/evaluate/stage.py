"""Stage `eval`: the run's models (base, trained, exported) and any others, side by side on the
Self-Instruct items; per-item JSONL, a summary with paired tests, the Figure-3 plots, and
optionally an LLM-judge win rate. Results go into eval/ and the manifest."""

from __future__ import annotations

import functools
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all.config import EvalConfig, RunConfig
from distill4all.evaluate.data import Item, load_items, pick
from distill4all.evaluate.models import models_to_compare
from distill4all.evaluate.runner import compare, engines, score_model, write_summary
from distill4all.models import BUILTINS
from distill4all.run import StageContext, StageResult

UPSTREAM: tuple[str, ...] = ("train", "export")
# The run's models it scores (their specs and labels), the judge's price, and the template the
# trained model was given.
READS: tuple[str, ...] = (
    "train.base_model", "train.template", "train.template_file", "train.prune", "export.model",
    "export.quantizations", "collect.prices",
)  # fmt: skip


def inputs(config: RunConfig) -> list[Path]:
    assert config.eval is not None
    extra = [Path(m.model) for m in config.eval.models if m.model not in BUILTINS]
    return [config.eval.data_path(), *extra]


def _items(ctx: StageContext, cfg: EvalConfig) -> list[Item]:
    return pick(load_items(cfg.data_path()), cfg.limit, ctx.config.seed)


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.eval
    assert cfg is not None
    out = ctx.dir
    out.mkdir(parents=True, exist_ok=True)
    items = _items(ctx, cfg)
    models = models_to_compare(ctx.config)
    metrics = tuple(cfg.metrics)
    results: dict[str, dict[str, list[float]]] = {}
    with Progress(
        TextColumn("eval · {task.fields[model]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=ctx.console,
        disable=ctx.quiet,
    ) as bar:
        for m in models:
            task = bar.add_task("items", total=len(items), model=m.label)
            results[m.label] = score_model(
                m, items, out, metrics=metrics, stride=cfg.stride, on_item=functools.partial(bar.advance, task)
            )
            bar.update(task, completed=len(items))
    baseline = cfg.baseline if cfg.baseline in results else None
    comparison = compare(results, baseline=baseline, metrics=metrics, clip=cfg.clip, out=out)

    extra: dict[str, object] = {
        "items": len(items),
        "data": str(cfg.data_path()),
        "models": {m.label: m.spec for m in models},
        "engines": engines(out, models),
    }
    costs: dict[str, float] = {}
    if cfg.judge is not None and baseline is not None:
        from distill4all.evaluate.judge import win_rates

        judge_price = ctx.config.collect.price_of(cfg.judge.judge) if ctx.config.collect else cfg.judge.judge.price
        extra["judge"], costs["judge_usd"] = win_rates(
            cfg.judge, items, models, baseline, price=judge_price, folder=ctx.layout.eval
        )
    summary_path = ctx.layout.eval.summary
    write_summary(comparison, extra, summary_path)

    counts: dict[str, object] = {"items": len(items)}
    for metric, per_model in comparison.summaries.items():
        for label, s in per_model.items():
            counts[f"{metric}_median_{label}"] = round(s.median, 3)
    for metric, tests in comparison.paired.items():
        for p in tests:
            counts[f"{metric}_share_lower_{p.model}_vs_{p.baseline}"] = round(p.share_lower, 3)
    files = ctx.layout.eval.all_items()
    return StageResult(counts=counts, costs=costs, artifacts=[summary_path, *comparison.figures, *files])


def reset(ctx: StageContext) -> None:
    """Nothing beyond its files, which the runner removes (exactly those the stage wrote)."""
