"""Stage `collect`: read the configured sources into the store, then answer every pending task.

Resumable by construction: prompts and tasks are inserted idempotently, tasks left in flight by
a killed run are requeued, and each batch of answers commits with its tasks' state.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from distill4all import atomic
from distill4all.collect import ledger
from distill4all.collect.sources import read_source
from distill4all.config import RunConfig, TeacherConfig
from distill4all.run import StageContext, StageResult
from distill4all.runtime.engine import SamplingParams, load_engine

UPSTREAM: tuple[str, ...] = ()


def inputs(config: RunConfig) -> list[Path]:
    assert config.collect is not None
    return [s.path for s in config.collect.sources]


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.collect
    assert cfg is not None
    store = ctx.store
    teachers = [t.name for t in cfg.teachers]
    for source in cfg.sources:
        ledger.add_prompts(store, read_source(source), teachers)
    ledger.requeue_inflight(store)
    ctx.set_counts(**ledger.counts(store))

    for teacher in cfg.teachers:
        _answer_all(ctx, teacher, cfg.batch_size)

    pairs = ctx.dir / "pairs.jsonl"
    write_pairs(ctx, pairs)
    return StageResult(counts=ledger.counts(store), artifacts=[pairs])


def _answer_all(ctx: StageContext, teacher: TeacherConfig, batch_size: int) -> None:
    store = ctx.store
    todo = store.count("SELECT COUNT(*) FROM tasks WHERE teacher = ? AND state = 'pending'", (teacher.name,))
    if todo == 0:
        return
    engine = load_engine(teacher.model)
    params = SamplingParams(
        max_tokens=teacher.max_tokens,
        temperature=teacher.temperature,
        top_p=teacher.top_p,
        seed=teacher.seed,
    )
    with Progress(
        TextColumn(f"collect · {teacher.name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeRemainingColumn(),
        console=ctx.console,
        disable=ctx.quiet,
    ) as bar:
        task_id = bar.add_task("answers", total=todo, rate="")
        while batch := ledger.pending(store, teacher.name, batch_size):
            ledger.mark_inflight(store, batch)
            answers: list[ledger.Answer] = []
            for task in batch:
                messages = [{"role": "user", "content": task.text}]
                if teacher.system_prompt:
                    messages.insert(0, {"role": "system", "content": teacher.system_prompt})
                c = engine.chat(messages, params)
                answers.append(
                    ledger.Answer(task, engine.name, c.text, c.finish_reason, c.prompt_tokens,
                                  c.completion_tokens, c.seconds, params.as_dict())
                )  # fmt: skip
                bar.update(task_id, advance=1, rate=f"{c.tokens_per_second:.1f} tok/s")
            ledger.record(store, answers, [])
            ctx.set_counts(**ledger.counts(store))


def write_pairs(ctx: StageContext, path: Path) -> None:
    """The collected pairs in the GPT4All format (prompt, response, source), one JSON per line."""
    rows = ctx.store.db.execute(
        "SELECT p.text, r.text, p.source, r.teacher FROM responses r JOIN prompts p ON p.id = r.prompt_id ORDER BY r.id"
    )
    with atomic.output_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for prompt, response, source, teacher in rows:
            f.write(json.dumps({"prompt": prompt, "response": response, "source": source,
                                "teacher": teacher}, ensure_ascii=False) + "\n")  # fmt: skip


def reset(ctx: StageContext) -> None:
    ledger.reset(ctx.store)
    shutil.rmtree(ctx.dir, ignore_errors=True)
