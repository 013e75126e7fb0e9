"""A client for a configured teacher: its API, or a local model that distill4all serves itself."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distill4all import atomic
from distill4all.config import TeacherConfig
from distill4all.teacher.client import TeacherClient
from distill4all.teacher.limiter import RateLimiter
from distill4all.teacher.local import local_teacher


@contextmanager
def connect(teacher: TeacherConfig, log_dir: Path) -> Iterator[tuple[TeacherClient, str]]:
    """An HTTP client for the teacher and the model id to ask for; a local model (no base_url) is
    first served on 127.0.0.1 by distill4all itself, its log in `log_dir`."""
    limiter = RateLimiter(teacher.requests_per_minute, teacher.tokens_per_minute, teacher.max_retry_wait_s)
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
    log_path = log_dir / f"teacher-{teacher.name}.log"
    atomic.claim(log_path)
    with local_teacher(teacher.model, log_path=log_path) as (base_url, model_id):
        client = TeacherClient(
            base_url,
            api_key=None,
            timeout_s=max(teacher.timeout_s, 600.0),  # one CPU model answers the queue in turn
            max_retries=teacher.max_retries,
            limiter=limiter,
            max_connections=teacher.concurrency,
        )
        yield client, model_id
