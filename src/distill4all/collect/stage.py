"""Stage `collect`: read the configured sources into the store, then have each teacher answer every
pending task; export the pairs.

Resumable by construction: prompts and tasks are inserted idempotently, tasks left in flight by a
killed run are requeued, and every answer commits with its task's state (see collector.py). The
stage is done only when every task is answered or failed for good (a 400 for that prompt): a
failure that may pass (connection refused, timeouts, 5xx, 429 after every retry) leaves it
unfinished with the first error of each kind, and a rerun asks again.
"""

from __future__ import annotations

import time
from pathlib import Path

from distill4all.collect.answering import answer_teacher
from distill4all.collect.gather import load_sources
from distill4all.collect.pairs_file import write_pairs
from distill4all.config import RunConfig
from distill4all.errors import BudgetReached, StageError, TeacherUnavailable
from distill4all.redact import strip_userinfo
from distill4all.run import StageContext, StageResult
from distill4all.store import tasks
from distill4all.teacher.client import failure_kind
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
                f"teacher {teacher.name} ({strip_userinfo(teacher.base_url or teacher.model)}) returned no logprobs, "
                f"which its setting logprobs: {teacher.logprobs} asks for; use an endpoint that gives them, or set "
                "require_logprobs: false to collect without them"
            )

    _stop_unless_settled(ctx, [t.name for t in cfg.teachers])
    if permanent := tasks.failures(ctx.store, permanent=True):
        ctx.console.print(f"collect: {len(permanent)} prompts failed for good (not asked again): "
                          f"{_kinds(permanent)}", markup=False, soft_wrap=True)  # fmt: skip

    pairs = ctx.layout.collect.pairs
    write_pairs(ctx.store, pairs, "jsonl")
    counts = tasks.counts(ctx.store, final=True)
    return StageResult(counts=counts, costs={"collect_usd": counts["cost_usd"]}, artifacts=[pairs])


def _stop_unless_settled(ctx: StageContext, teachers: list[str]) -> None:
    """TeacherUnavailable when answers are missing for reasons that may pass; a rerun retries them."""
    transient = [(t, e) for t, e in tasks.failures(ctx.store, permanent=False) if t in teachers]
    pending = sum(tasks.count_pending(ctx.store, t) for t in teachers)  # a failed task is not pending
    if not transient and not pending:
        return
    parts = [f"{len(transient)} answers failed for reasons that may pass"] if transient else []
    parts += [f"{pending} were not asked"] if pending else []
    raise TeacherUnavailable(
        f"collect is not finished: {' and '.join(parts)}; rerun to ask again (what was answered is kept)"
        + (f" — {_kinds(transient)}" if transient else "")
    )


def _kinds(failures: list[tuple[str, str]], width: int = 240) -> str:
    """Each kind of failure with its count and its first error: "HTTP 503 ×4 (first: teacher t: …)"."""
    first: dict[str, tuple[str, str]] = {}
    count: dict[str, int] = {}
    for teacher, error in failures:
        kind = failure_kind(error)
        first.setdefault(kind, (teacher, error))
        count[kind] = count.get(kind, 0) + 1
    return "; ".join(
        f"{kind} ×{count[kind]} (first: teacher {t}: {e if len(e) <= width else e[: width - 1] + '…'})"
        for kind, (t, e) in first.items()
    )


def reset(ctx: StageContext) -> None:
    """--force: archive the store (paid answers are never thrown away), then start collect afresh
    (the runner removes the stage's files)."""
    archive = ctx.run.layout.archive / f"store-{time.strftime('%Y%m%d-%H%M%S')}.sqlite"
    archive.parent.mkdir(parents=True, exist_ok=True)
    ctx.store.backup_to(archive)
    ctx.console.print(f"collect: previous answers archived in {archive}")
    tasks.reset(ctx.store)
