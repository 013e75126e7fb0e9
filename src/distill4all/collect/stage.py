"""Stage `collect`: read the configured sources into the store, then have each teacher answer every
pending task; export the pairs.

Resumable by construction: prompts and tasks are inserted idempotently, tasks left in flight by a
killed run are requeued, and every answer commits with its task's state (see collector.py).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from distill4all.collect.answering import answer_teacher
from distill4all.collect.gather import load_sources
from distill4all.collect.pairs_file import write_pairs
from distill4all.config import RunConfig
from distill4all.errors import BudgetReached, StageError
from distill4all.run import StageContext, StageResult
from distill4all.store import tasks
from distill4all.teacher.cost import Budget

UPSTREAM: tuple[str, ...] = ()
READS: tuple[str, ...] = ()


def inputs(config: RunConfig) -> list[Path]:
    assert config.collect is not None
    return [s.path for s in config.collect.sources if s.path is not None]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.collect
    assert cfg is not None
    load_sources(ctx.store, cfg, ctx.config.seed, ctx.console)
    tasks.requeue(ctx.store)
    ctx.set_counts(**tasks.counts(ctx.store))

    limit = ctx.options.get("max_cost_usd", cfg.max_cost_usd)
    budget = Budget(limit, spent_usd=tasks.spent_usd(ctx.store))
    for teacher in cfg.teachers:
        stopped = answer_teacher(
            ctx.store, cfg, teacher, budget, log_dir=ctx.dir, console=ctx.console, quiet=ctx.quiet,
            on_counts=lambda counts: ctx.set_counts(**counts),
        )  # fmt: skip
        if stopped == "budget":
            pending = sum(tasks.count_pending(ctx.store, t.name) for t in cfg.teachers)
            raise BudgetReached(
                f"budget reached: ${budget.spent_usd:.4f} spent of ${limit:.4f}; {pending} answers pending "
                "(rerun with a higher --max-cost, or none, to continue)"
            )
        if stopped == "interrupt":
            raise KeyboardInterrupt
        if stopped == "no-logprobs":
            raise StageError(
                f"teacher {teacher.name} ({teacher.base_url or teacher.model}) returned no logprobs, which its "
                f"setting logprobs: {teacher.logprobs} asks for; use an endpoint that gives them, or set "
                "require_logprobs: false to collect without them"
            )

    pairs = ctx.layout.collect.pairs
    write_pairs(ctx.store, pairs, "jsonl")
    counts = tasks.counts(ctx.store, final=True)
    return StageResult(counts=counts, costs={"collect_usd": counts["cost_usd"]}, artifacts=[pairs])


def reset(ctx: StageContext) -> None:
    """--force: archive the store (paid answers are never thrown away), then start collect afresh."""
    archive = ctx.run.layout.archive / f"store-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    archive.parent.mkdir(parents=True, exist_ok=True)
    ctx.store.backup_to(archive)
    ctx.console.print(f"collect: previous answers archived in {archive}")
    tasks.reset(ctx.store)
    shutil.rmtree(ctx.dir, ignore_errors=True)
