"""Answering every pending task of one teacher, for collection and for eval's judge: claim
pending tasks, send them with N in flight, and store each answer the moment it lands.

  claimer  ─▶ queue ─▶ N workers (window, limiter, budget, retries) ─▶ results ─▶ writer ─▶ store

The writer commits whatever has arrived in one transaction (group commit): one answer per commit
when answers trickle in, up to `batch_size` when they pour in, so a kill loses at most the answers
that arrived in the last few milliseconds. The first Ctrl-C stops sending and lets the answers in
flight (already paid for) land and be stored; a second one stops at once.

An answer that reports no `usage` is counted by teacher/usage.py and stored as such: its cost is
an estimate, and the progress says so.

Three answers from the teacher stop the sending early. A 401, 403 or 404 means no request can
succeed (key, access, model or URL): TeacherRefused at once, nothing stored as failed, every task
still pending — not one doomed request per prompt. A wait asked for beyond `max_retry_wait_s`
(a Retry-After of days) is TeacherUnavailable at once, the same way. And a streak of requests
that failed after all their retries (connection refused, timeouts, 5xx) stops with
"unavailable": the teacher is down, and the rest stays pending for a rerun instead of each prompt
waiting out its backoff.

Anything else a worker, the claimer or the writer raises is a bug: it cancels the others at once
and is raised (an internal error), after the answers that landed are stored — never a loop that
waits for workers that are gone.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from distill4all.config import Price, TeacherConfig
from distill4all.errors import TeacherError, TeacherRefused, TeacherUnavailable
from distill4all.redact import redact
from distill4all.store import Store, tasks
from distill4all.teacher.client import REFUSING_STATUS, Reply, estimate_prompt_tokens
from distill4all.teacher.cost import Budget, cost_usd
from distill4all.teacher.limiter import Window
from distill4all.teacher.usage import TokenCounter


class Completer(Protocol):
    async def complete(self, body: dict[str, Any], est_tokens: int, window: Window | None = None) -> Reply: ...


@dataclass
class AnswerProgress:
    answered: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    without_logprobs: int = 0  # asked for, not given (stored anyway: require_logprobs is false)
    without_usage: int = 0  # their tokens counted here, their cost estimated
    counted_by: str = ""  # how those were counted
    started: float = field(default_factory=time.monotonic)


@dataclass
class AnswerOutcome:
    answered: int
    failed: int
    # None: all done; "budget" | "interrupt" | "no-logprobs" | "unavailable": stopped early, resumable
    stopped: str | None
    without_logprobs: int = 0
    without_usage: int = 0
    counted_by: str = ""


def build_messages(teacher: TeacherConfig, prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "user", "content": prompt}]
    if teacher.system_prompt:
        messages.insert(0, {"role": "system", "content": teacher.system_prompt})
    return messages


def build_body(teacher: TeacherConfig, task: tasks.Task, model: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model or teacher.model,
        "messages": build_messages(teacher, task.text),
        "max_tokens": teacher.max_tokens,
        "temperature": teacher.temperature,
        "top_p": teacher.top_p,
    }
    if teacher.seed is not None:
        body["seed"] = teacher.seed + task.sample  # each sample its own seed
    if teacher.stop:
        body["stop"] = teacher.stop
    if teacher.logprobs is not None:
        body["logprobs"] = True
        body["top_logprobs"] = teacher.logprobs
    return body | teacher.extra_body


async def answer_pending(
    store: Store,
    teacher: TeacherConfig,
    client: Completer,
    price: Price,
    budget: Budget,
    *,
    model: str | None = None,
    batch_size: int,
    on_progress: Callable[[AnswerProgress], None] | None = None,
) -> AnswerOutcome:
    progress = AnswerProgress()
    counter = TokenCounter.for_teacher(teacher)
    refusal: list[str] = []
    waits: list[str] = []  # a wait asked for beyond max_retry_wait_s
    failing = {"streak": 0, "limit": max(8, 2 * teacher.concurrency)}
    queue: asyncio.Queue[tasks.Task | None] = asyncio.Queue(maxsize=teacher.concurrency * 2)
    results: asyncio.Queue[tasks.Answer | tasks.Failure | None] = asyncio.Queue()
    window = Window(teacher.concurrency)
    stop: dict[str, str | None] = {"why": None}
    claimed_unsent: set[tasks.Task] = set()

    async def claimer() -> None:
        while stop["why"] is None:
            claimed = tasks.claim(store, teacher.name, teacher.concurrency * 2)
            if not claimed:
                break
            claimed_unsent.update(claimed)
            for t in claimed:
                await queue.put(t)
        # not in a `finally`: cancelled, it would wait for room that workers already gone never make
        for _ in range(teacher.concurrency):
            await queue.put(None)

    async def worker() -> None:
        while (task := await queue.get()) is not None:
            if stop["why"] is not None:
                continue  # left claimed-unsent; released below
            body = build_body(teacher, task, model)
            est = estimate_prompt_tokens(body["messages"])
            worst = cost_usd(price, est, teacher.max_tokens)
            if not budget.reserve(worst):
                stop["why"] = "budget"
                continue
            claimed_unsent.discard(task)
            try:
                reply = await client.complete(body, est + teacher.max_tokens, window)
            except TeacherError as e:
                budget.settle(worst, 0.0)
                if e.status in REFUSING_STATUS or e.wait_s is not None:
                    stop["why"] = "refused"
                    (refusal if e.wait_s is None else waits).append(str(e))
                    claimed_unsent.add(task)  # not a failure of this task: it stays pending
                    continue
                failing["streak"] = 0 if e.permanent else failing["streak"] + 1
                if failing["streak"] >= failing["limit"] and stop["why"] is None:
                    stop["why"] = "unavailable"
                await results.put(tasks.Failure(task, str(e), e.permanent))
                continue
            except BaseException:  # a bug, or cancelled because one happened elsewhere
                budget.settle(worst, 0.0)
                claimed_unsent.add(task)  # no answer stored: back to pending
                raise
            failing["streak"] = 0
            prompt_tokens, completion_tokens, usage = counter.count(
                body["messages"], reply.text, reply.prompt_tokens, reply.completion_tokens
            )
            actual = cost_usd(price, prompt_tokens, completion_tokens)
            budget.settle(worst, actual)
            if body.get("logprobs") and reply.logprobs is None:
                if teacher.require_logprobs:
                    # not stored: an answer without them is not what was asked; the task stays pending
                    stop["why"] = "no-logprobs"
                    claimed_unsent.add(task)
                    continue
                progress.without_logprobs += 1
            params = {k: v for k, v in body.items() if k != "messages"} | {"attempts": reply.attempts}
            await results.put(
                tasks.Answer(task, reply.model, reply.text, reply.finish_reason, prompt_tokens,
                              completion_tokens, reply.latency_s, actual, params, reply.logprobs, usage,
                              reply.reasoning)
            )  # fmt: skip

    async def writer() -> None:
        done = False
        while not done:
            item = await results.get()
            batch = [item]
            while len(batch) < batch_size and not results.empty():
                batch.append(results.get_nowait())
            done = None in batch
            answers = [b for b in batch if isinstance(b, tasks.Answer)]
            failures = [b for b in batch if isinstance(b, tasks.Failure)]
            if answers or failures:
                tasks.record(store, answers, failures)
                progress.answered += len(answers)
                progress.failed += len(failures)
                progress.prompt_tokens += sum(a.prompt_tokens for a in answers)
                progress.completion_tokens += sum(a.completion_tokens for a in answers)
                progress.cost_usd += sum(a.cost_usd for a in answers)
                counted = [a.usage for a in answers if a.usage != tasks.USAGE_REPORTED]
                progress.without_usage += len(counted)
                progress.counted_by = counted[0] if counted else progress.counted_by
                if on_progress is not None:
                    on_progress(progress)

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()

    def on_sigint() -> None:
        if stop["why"] is None:
            stop["why"] = "interrupt"  # finish and store what is in flight, send nothing new
        elif main is not None:
            main.cancel()

    with _signal_handler(loop, on_sigint):
        writer_task = asyncio.create_task(writer())
        jobs = [asyncio.create_task(claimer()), *(asyncio.create_task(worker()) for _ in range(teacher.concurrency))]
        try:
            await _supervise(jobs, writer_task)
        finally:
            try:
                await results.put(None)
                await writer_task  # what landed is stored (paid for); a writer that failed raises here
            finally:
                if claimed_unsent:
                    tasks.release(store, list(claimed_unsent))
    # the teacher's own words may quote the key sent; the URL may carry a password
    where = f"{teacher.name} ({teacher.model}, {teacher.base_url or 'served locally'})"
    if refusal:
        raise TeacherRefused(redact(
            f"teacher {where} refused the request: {refusal[0]} — check its "
            "api_key, model and base_url; nothing was stored as failed and every answer is still pending"
        ))  # fmt: skip
    if waits:
        raise TeacherUnavailable(redact(
            f"teacher {where} {waits[0]}: stopped rather than wait; what was answered is stored and "
            "the rest is still pending — rerun later, or raise max_retry_wait_s, to continue"
        ))  # fmt: skip
    return AnswerOutcome(
        progress.answered, progress.failed, stop["why"], progress.without_logprobs, progress.without_usage,
        progress.counted_by,
    )  # fmt: skip


async def _supervise(jobs: list[asyncio.Task[None]], writer: asyncio.Task[None]) -> None:
    """Wait for the claimer and the workers to end. The first of them or the writer to fail (a
    writer that fails would let answers be paid for and never stored) cancels the jobs and is
    raised; so does a cancellation of this wait (a second Ctrl-C)."""
    waiting: set[asyncio.Task[None]] = {*jobs, writer}
    try:
        while any(not job.done() for job in jobs):
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # raises what it raised
    except BaseException:
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        raise


class _signal_handler:
    """Install a SIGINT handler on the loop for the block (only in the main thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> None:
        self.loop, self.handler, self.installed = loop, handler, False

    def __enter__(self) -> None:
        try:
            self.loop.add_signal_handler(signal.SIGINT, self.handler)
            self.installed = True
        except (RuntimeError, ValueError, NotImplementedError):
            pass

    def __exit__(self, *exc: object) -> None:
        if self.installed:
            self.loop.remove_signal_handler(signal.SIGINT)
