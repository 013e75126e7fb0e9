"""One teacher answering the collection's pending tasks, shown as a progress bar with rate,
tokens and spend; the loop itself is the shared teacher's (teacher/answers.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all.config import CollectConfig, Price, TeacherConfig
from distill4all.store import Store, tasks
from distill4all.teacher.answers import AnswerOutcome, AnswerProgress, answer_pending
from distill4all.teacher.client import TeacherClient
from distill4all.teacher.connect import connect
from distill4all.teacher.cost import Budget


def answer_teacher(
    store: Store,
    cfg: CollectConfig,
    teacher: TeacherConfig,
    budget: Budget,
    *,
    log_dir: Path,
    console: Console,
    quiet: bool,
    on_counts: Callable[[dict[str, Any]], None],
) -> str | None:
    """Have one teacher answer its pending tasks, with a progress bar; None when all are answered,
    else why it stopped early ("budget" | "interrupt" | "no-logprobs"). `on_counts` gets the
    ledger's counts now and then, for `distill4all status`."""
    todo = tasks.count_pending(store, teacher.name)
    if todo == 0:
        return None
    price = cfg.price_of(teacher)
    with (
        connect(teacher, log_dir) as (client, model_id),
        Progress(
            TextColumn(f"collect · {teacher.name}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            disable=quiet,
        ) as bar,
    ):
        task_id = bar.add_task("answers", total=todo, stats="")
        last_counts = [0.0]

        def on_progress(p: AnswerProgress) -> None:
            rate = (p.answered + p.failed) / max(1e-9, time.monotonic() - p.started)
            stats = f"{rate:.1f}/s · {p.prompt_tokens + p.completion_tokens:,} tok · ${budget.spent_usd:.4f}"
            if p.without_usage:
                stats += f" (estimated: {p.without_usage} without usage)"
            if p.failed:
                stats += f" · {p.failed} failed"
            bar.update(task_id, completed=p.answered + p.failed, stats=stats)
            if time.monotonic() - last_counts[0] > 2.0:  # keep `status` fresh without a write per answer
                last_counts[0] = time.monotonic()
                on_counts(tasks.counts(store))

        outcome = asyncio.run(_collect(store, cfg, teacher, model_id, client, price, budget, on_progress))
    on_counts(tasks.counts(store))
    if outcome.without_logprobs:
        console.print(
            f"collect · {teacher.name}: {outcome.without_logprobs} answers came without logprobs "
            f"(the endpoint returns none; require_logprobs is false)"
        )
    if outcome.without_usage:
        console.print(
            f"collect · {teacher.name}: {outcome.without_usage} answers came without usage; their tokens were "
            f"counted by {outcome.counted_by}, so their cost is an estimate",
            markup=False,
        )
    return outcome.stopped


async def _collect(
    store: Store,
    cfg: CollectConfig,
    teacher: TeacherConfig,
    model_id: str,
    client: TeacherClient,
    price: Price,
    budget: Budget,
    on_progress: Callable[[AnswerProgress], None],
) -> AnswerOutcome:
    try:
        outcome = await answer_pending(
            store,
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
    return outcome
