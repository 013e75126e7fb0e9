"""Stage `eval`: the run's models (base, trained, exported) and any others, side by side on the
Self-Instruct items; per-item JSONL, a summary with paired tests, the Figure-3 plots, and
optionally an LLM-judge win rate. Results go into eval/ and the manifest."""

from __future__ import annotations

import functools
import shutil
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all.collect.cost import Budget
from distill4all.config import EvalConfig, Price, RunConfig, TeacherConfig
from distill4all.errors import StageError
from distill4all.evaluate.data import Item, load_items, pick
from distill4all.evaluate.runner import ModelSpec, compare, score_model, write_summary
from distill4all.models import BUILTINS
from distill4all.run import StageContext, StageResult
from distill4all.store import Store

UPSTREAM: tuple[str, ...] = ("train", "export")
BASE_QUANTS = ("f32", "f16")


def models_to_compare(config: RunConfig) -> list[ModelSpec]:
    """The run's own models, in `include` order, then the configured ones."""
    cfg = config.eval
    assert cfg is not None
    specs: list[ModelSpec] = []
    trained = config.train is not None
    for kind in cfg.include:
        if kind == "base":
            base = config.train.base_model if config.train else (config.export.model if config.export else None)
            if base:
                specs.append(ModelSpec("base", base))
        elif kind == "trained" and trained:
            specs.append(ModelSpec("trained", str(config.run_dir / "train" / "model")))
        elif kind == "exported" and config.export is not None:
            for q in config.export.quantizations:
                if q not in BASE_QUANTS:
                    label = f"trained-{q}" if trained else f"{q}"
                    specs.append(ModelSpec(label, str(config.run_dir / "export" / f"model-{q}.gguf")))
    specs += [ModelSpec(m.name, m.model) for m in cfg.models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise StageError(f"eval: model labels must be unique: {', '.join(labels)}")
    if not specs:
        raise StageError("eval: no model to evaluate (set eval.include or eval.models)")
    return specs


def inputs(config: RunConfig) -> list[Path]:
    assert config.eval is not None
    extra = [Path(m.model) for m in config.eval.models if m.model not in BUILTINS]
    return [config.eval.data_path(), *extra]


def _items(ctx: StageContext, cfg: EvalConfig) -> list[Item]:
    limit = ctx.options.get("eval_limit", cfg.limit)
    return pick(load_items(cfg.data_path()), limit, ctx.config.seed)


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
    }
    costs: dict[str, float] = {}
    if cfg.judge is not None and baseline is not None:
        extra["judge"], costs["judge_usd"] = _judge(ctx, cfg, items, models, baseline)
    summary_path = out / "summary.json"
    write_summary(comparison, extra, summary_path)

    counts: dict[str, object] = {"items": len(items)}
    for metric, per_model in comparison.summaries.items():
        for label, s in per_model.items():
            counts[f"{metric}_median_{label}"] = round(s.median, 3)
    for metric, tests in comparison.paired.items():
        for p in tests:
            counts[f"{metric}_share_lower_{p.model}_vs_{p.baseline}"] = round(p.share_lower, 3)
    files = sorted(out.glob("perplexity-*.jsonl"))
    return StageResult(counts=counts, costs=costs, artifacts=[summary_path, *comparison.figures, *files])


def _judge(
    ctx: StageContext, cfg: EvalConfig, items: list[Item], models: list[ModelSpec], baseline: str
) -> tuple[list[dict[str, object]], float]:
    from distill4all.evaluate.judge import generate_answers, judge

    assert cfg.judge is not None
    store = Store(ctx.dir / "judge.sqlite")
    budget = Budget(cfg.judge.max_cost_usd)
    try:
        answers = {}
        for m in models:
            answerer = TeacherConfig(
                name=f"answer-{m.label}", model=m.spec, max_tokens=cfg.judge.answer_max_tokens, concurrency=1
            )
            answers[m.label] = generate_answers(store, items, answerer, ctx.dir, budget)
        judge_cfg = cfg.judge.judge
        price = ctx.config.collect.price_of(judge_cfg) if ctx.config.collect else judge_cfg.price
        rates = [
            judge(
                store,
                items,
                (m.label, answers[m.label]),
                (baseline, answers[baseline]),
                judge_cfg,
                price or Price(input=0, output=0),
                ctx.dir,
                budget,
            )
            for m in models
            if m.label != baseline
        ]
        return [r.as_dict() for r in rates], budget.spent_usd
    finally:
        store.close()


def reset(ctx: StageContext) -> None:
    shutil.rmtree(ctx.dir, ignore_errors=True)
