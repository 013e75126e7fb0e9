"""Stage `collect`: read the configured sources into the store, then have each teacher answer every
pending task; export the pairs.

Resumable by construction: prompts and tasks are inserted idempotently, tasks left in flight by a
killed run are requeued, and every answer commits with its task's state (see collector.py).
"""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all.collect import ledger
from distill4all.collect.collector import Progress as CollectProgress
from distill4all.collect.collector import collect
from distill4all.collect.cost import Budget
from distill4all.collect.export import write_pairs
from distill4all.collect.local import local_teacher
from distill4all.collect.sources import SourceStats, read_source
from distill4all.collect.teacher import RateLimiter, TeacherClient
from distill4all.config import CollectConfig, Price, RunConfig, TeacherConfig
from distill4all.errors import UserError
from distill4all.run import StageContext, StageResult

UPSTREAM: tuple[str, ...] = ()


class BudgetReached(UserError):
    """The budget is spent; everything paid for is stored and the rest stays pending."""


def inputs(config: RunConfig) -> list[Path]:
    assert config.collect is not None
    return [s.path for s in config.collect.sources if s.path is not None]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.collect
    assert cfg is not None
    load_sources(ctx, cfg)
    ledger.requeue(ctx.store)
    ctx.set_counts(**ledger.counts(ctx.store))

    limit = ctx.options.get("max_cost_usd", cfg.max_cost_usd)
    budget = Budget(limit, spent_usd=ledger.spent_usd(ctx.store))
    for teacher in cfg.teachers:
        stopped = _answer_all(ctx, cfg, teacher, budget)
        if stopped == "budget":
            pending = sum(ledger.count_pending(ctx.store, t.name) for t in cfg.teachers)
            raise BudgetReached(
                f"budget reached: ${budget.spent_usd:.4f} spent of ${limit:.4f}; {pending} answers pending "
                "(rerun with a higher --max-cost, or none, to continue)"
            )
        if stopped == "interrupt":
            raise KeyboardInterrupt

    pairs = ctx.dir / "pairs.jsonl"
    write_pairs(ctx.store, pairs, "jsonl")
    counts = ledger.counts(ctx.store)
    return StageResult(counts=counts, costs={"collect_usd": counts["cost_usd"]}, artifacts=[pairs])


def load_sources(ctx: StageContext, cfg: CollectConfig) -> dict[str, SourceStats]:
    """Read every source into the store (idempotent: prompts already there are kept)."""
    stats: dict[str, SourceStats] = {}
    teachers = [(t.name, t.samples) for t in cfg.teachers]

    def warn(message: str) -> None:
        ctx.console.print(message, style="yellow", markup=False)

    for source in cfg.sources:
        stats[source.name] = st = SourceStats()
        prompts = read_source(source, run_seed=ctx.config.seed, stats=st, warn=warn)
        ledger.add_prompts(ctx.store, prompts, teachers)
        ctx.console.print(
            f"source {source.name}: {st.kept} prompts from {st.rows} rows"
            + "".join(
                f", {n} {label}"
                for n, label in (
                    (st.duplicates, "duplicates"),
                    (st.too_short, "too short"),
                    (st.too_long, "too long"),
                    (st.sampled_out, "not sampled"),
                    (st.bad_rows, "bad rows skipped"),
                )
                if n
            )
        )
    return stats


@contextmanager
def teacher_client(teacher: TeacherConfig, log_dir: Path) -> Iterator[tuple[TeacherClient, str]]:
    """An HTTP client for the teacher and the model id to ask for; a local model (no base_url) is
    first served on 127.0.0.1 by distill4all itself."""
    limiter = RateLimiter(teacher.requests_per_minute, teacher.tokens_per_minute)
    if teacher.base_url is not None:
        key = teacher.api_key.get_secret_value() if teacher.api_key else None
        client = TeacherClient(
            teacher.base_url,
            api_key=key,
            timeout_s=teacher.timeout_s,
            max_retries=teacher.max_retries,
            limiter=limiter,
            max_connections=teacher.concurrency,
        )
        yield client, teacher.model
        return
    with local_teacher(teacher.model, log_path=log_dir / f"teacher-{teacher.name}.log") as (base_url, model_id):
        client = TeacherClient(
            base_url,
            api_key=None,
            timeout_s=max(teacher.timeout_s, 600.0),  # one CPU model answers the queue in turn
            max_retries=teacher.max_retries,
            limiter=limiter,
            max_connections=teacher.concurrency,
        )
        yield client, model_id


def _answer_all(ctx: StageContext, cfg: CollectConfig, teacher: TeacherConfig, budget: Budget) -> str | None:
    todo = ledger.count_pending(ctx.store, teacher.name)
    if todo == 0:
        return None
    price = cfg.price_of(teacher)
    with (
        teacher_client(teacher, ctx.dir) as (client, model_id),
        Progress(
            TextColumn(f"collect · {teacher.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=ctx.console,
            disable=ctx.quiet,
        ) as bar,
    ):
        task_id = bar.add_task("answers", total=todo, stats="")
        last_counts = [0.0]

        def on_progress(p: CollectProgress) -> None:
            rate = (p.answered + p.failed) / max(1e-9, time.monotonic() - p.started)
            stats = f"{rate:.1f}/s · {p.prompt_tokens + p.completion_tokens:,} tok · ${budget.spent_usd:.4f}"
            if p.failed:
                stats += f" · {p.failed} failed"
            bar.update(task_id, completed=p.answered + p.failed, stats=stats)
            if time.monotonic() - last_counts[0] > 2.0:  # keep `status` fresh without a write per answer
                last_counts[0] = time.monotonic()
                ctx.set_counts(**ledger.counts(ctx.store))

        outcome = asyncio.run(_collect(ctx, cfg, teacher, model_id, client, price, budget, on_progress))
    ctx.set_counts(**ledger.counts(ctx.store))
    return outcome


async def _collect(
    ctx: StageContext,
    cfg: CollectConfig,
    teacher: TeacherConfig,
    model_id: str,
    client: TeacherClient,
    price: Price,
    budget: Budget,
    on_progress: Callable[[CollectProgress], None],
) -> str | None:
    try:
        outcome = await collect(
            ctx.store,
            teacher,
            client,
            price,
            budget,
            model=model_id,
            batch_size=cfg.batch_size,
            on_progress=on_progress,
        )
    finally:
        await client.aclose()
    return outcome.stopped


def reset(ctx: StageContext) -> None:
    """--force: archive the store (paid answers are never thrown away), then start collect afresh."""
    archive = ctx.run.path / "archive" / f"store-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    archive.parent.mkdir(parents=True, exist_ok=True)
    target = sqlite3.connect(archive)
    try:
        ctx.store.db.backup(target)
    finally:
        target.close()
    ctx.console.print(f"collect: previous answers archived in {archive}")
    ledger.reset(ctx.store)
    shutil.rmtree(ctx.dir, ignore_errors=True)
