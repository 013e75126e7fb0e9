"""Client-side pacing shared by every request to one teacher: token buckets for requests and
tokens per minute (fed by the server's x-ratelimit-* headers too), and an AIMD window of requests
in flight that halves on each 429. A wait a server asks for beyond the teacher's max_retry_wait_s
is not waited: every request then raises at once, and the caller stops (a rerun resumes)."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Mapping

from distill4all.errors import TeacherError

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")


def parse_duration(value: str) -> float | None:
    """OpenAI's reset headers: '1s', '6m0s', '20ms', '1h2m3.5s'; also a bare number of seconds
    ('inf' is a wait with no end); None for what reads as neither (a server's own word for it)."""
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(0.0, seconds)
    parts = _DURATION.findall(value)
    if not parts:
        return None
    scale = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    return sum(float(n) * scale[u] for n, u in parts)


class TokenBucket:
    """`rate` units a minute, refilled continuously, bursting at most `burst_s` seconds' worth."""

    def __init__(self, per_minute: float, burst_s: float = 5.0) -> None:
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.stamp = time.monotonic()

    def set_rate(self, per_minute: float) -> None:
        self._refill()
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * 5.0)
        self.level = min(self.level, self.capacity)

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait_time(self, amount: float) -> float:
        """Seconds until `amount` can be taken (an amount above capacity waits for a full bucket)."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount  # may go negative: a big request is paid back by waiting later


class RateLimiter:
    """Client-side requests/min and tokens/min, plus a pause shared by every worker.

    The pause is set by a 429's Retry-After and by x-ratelimit-remaining-* reaching zero, so one
    rate-limit answer stops all workers at once instead of each learning it separately. Limits the
    server announces (x-ratelimit-limit-*) are adopted when they are tighter than the configured ones.
    """

    def __init__(
        self, requests_per_minute: float | None, tokens_per_minute: float | None, max_wait_s: float = math.inf
    ) -> None:
        self.requests = TokenBucket(requests_per_minute) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute) if tokens_per_minute else None
        self.paused_until = 0.0
        self.max_wait_s = max_wait_s
        self.too_long: tuple[float, str] | None = None  # the longest wait asked for beyond max_wait_s, and by what
        self._lock = asyncio.Lock()  # FIFO: waiters are served in arrival order

    def pause(self, seconds: float, why: str = "") -> None:
        """Hold every request for `seconds`; past max_wait_s, not at all: `acquire` raises from then on
        (a server asking for days, or for ever, must not keep a run asleep without a word)."""
        if seconds > self.max_wait_s:
            if self.too_long is None or seconds > self.too_long[0]:
                self.too_long = (seconds, why)
            return
        self.paused_until = max(self.paused_until, time.monotonic() + seconds)

    def wait_refused(self) -> TeacherError:
        assert self.too_long is not None
        seconds, why = self.too_long
        return TeacherError(
            f"asks to wait {describe_wait(seconds)} ({why}), longer than max_retry_wait_s ({self.max_wait_s:g} s)",
            permanent=False,
            wait_s=seconds,
        )

    async def acquire(self, tokens: int) -> None:
        async with self._lock:
            while True:
                if self.too_long is not None:
                    raise self.wait_refused()
                wait = self.paused_until - time.monotonic()
                if self.requests is not None:
                    wait = max(wait, self.requests.wait_time(1))
                if self.tokens is not None:
                    wait = max(wait, self.tokens.wait_time(tokens))
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if self.requests is not None:
                self.requests.take(1)
            if self.tokens is not None:
                self.tokens.take(tokens)

    def observe(self, headers: Mapping[str, str], next_request_tokens: int) -> None:
        for kind, bucket_name, need in (("requests", "requests", 1), ("tokens", "tokens", next_request_tokens)):
            remaining = _int(headers.get(f"x-ratelimit-remaining-{kind}"))
            reset = headers.get(f"x-ratelimit-reset-{kind}")
            if remaining is not None and remaining < need and reset is not None:
                seconds = parse_duration(reset)
                if seconds:
                    self.pause(seconds, f"x-ratelimit-reset-{kind}: {reset.strip()[:40]}")
            limit = _int(headers.get(f"x-ratelimit-limit-{kind}"))
            if limit is not None and limit > 0:
                bucket: TokenBucket | None = getattr(self, bucket_name)
                if bucket is None:
                    setattr(self, bucket_name, TokenBucket(limit))
                elif bucket.rate * 60 > limit:
                    bucket.set_rate(limit)


def _int(value: str | None) -> int | None:
    try:
        return int(float(value)) if value is not None else None
    except (ValueError, OverflowError):  # not a number, NaN, or inf
        return None


def describe_wait(seconds: float) -> str:
    """'forever', '1157 days', '3 hours', '12 minutes', '40 s'."""
    if math.isinf(seconds):
        return "forever"
    for unit, size in (("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


class Window:
    """How many requests may be in flight: halved on each 429, grown by ~1 per round trip after
    (AIMD, as TCP does), between 1 and the configured concurrency. Keeps a teacher's limits
    without being told twice even when it announces none."""

    def __init__(self, maximum: int) -> None:
        self.maximum = maximum
        self.size = float(maximum)
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def enter(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < int(self.size))
            self.in_flight += 1

    async def leave(self, *, throttled: bool = False) -> None:
        async with self._changed:
            self.in_flight -= 1
            if throttled:
                self.size = max(1.0, self.size / 2)
            else:
                self.size = min(float(self.maximum), self.size + 1.0 / max(1.0, self.size))
            self._changed.notify_all()
