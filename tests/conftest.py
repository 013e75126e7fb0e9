"""Shared fixtures: a private model cache per test session and a helper that runs the real CLI."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EVAL_SET = REPO.parent / "shared" / "data" / "self_instruct_user_oriented.jsonl"


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every test session builds its models into its own cache: nothing leaks in or out."""
    cache = tmp_path_factory.mktemp("model-cache")
    os.environ["DISTILL4ALL_CACHE"] = str(cache)
    os.environ["HF_HUB_OFFLINE"] = "1"
    return cache


@dataclass
class CliResult:
    code: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def run_cli(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> CliResult:
    """Run `distill4all ARGS` in a subprocess, as a user would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    p = subprocess.run(
        [sys.executable, "-m", "distill4all", *map(str, args)],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=900,
    )
    return CliResult(p.returncode, p.stdout, p.stderr)


def cli_command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "distill4all", *map(str, args)]


@pytest.fixture(scope="session")
def tiny_model(model_cache: Path) -> Path:
    from distill4all.models import resolve_model

    return resolve_model("tiny").path


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def stub_teacher() -> Iterator[str]:
    from servers import start_stub_process

    p, url = start_stub_process()
    yield url
    p.kill()
    p.wait()


@pytest.fixture
def make_run(tmp_path: Path, stub_teacher: str) -> Callable[..., Path]:
    """Write a config whose collect stage has the stub teacher answer `n` prompts, each after
    `delay` seconds, one at a time (so that a test can kill it half-way)."""

    def make(n: int = 6, delay: float = 0.0, batch_size: int = 2, **extra: Any) -> Path:
        write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question number {i}?"} for i in range(n)])
        teacher = {"name": "stub", "model": "stub", "base_url": stub_teacher, "max_tokens": 8, "concurrency": 1,
                   "extra_body": {"stub_delay": delay}}  # fmt: skip
        data: dict[str, Any] = {
            "name": "t",
            "run_dir": "run",
            "collect": {
                "sources": [{"name": "qs", "path": "prompts.jsonl"}],
                "teachers": [teacher],
                "batch_size": batch_size,
            },
            **extra,
        }
        return write_config(tmp_path / "run.yaml", data)

    return make


def store_query(run_dir: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read a run's store as another process would while a run writes it: read-only, and empty
    before the store exists or while it is locked."""
    path = run_dir / "store.sqlite"
    if not path.exists():
        return []
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.OperationalError:
        return []


def count_responses(run_dir: Path) -> int:
    rows = store_query(run_dir, "SELECT COUNT(*) FROM responses")
    return int(rows[0][0]) if rows else 0


def kill_at_answer_counts(command: list[str], run_dir: Path, thresholds: tuple[int, ...], poll: float) -> int:
    """Start `command` once per threshold and SIGKILL it as soon as the run holds that many answers;
    how many runs were killed (a run that finished first was not)."""
    kills = 0
    for threshold in thresholds:
        p = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 240
        while count_responses(run_dir) < threshold and p.poll() is None and time.time() < deadline:
            time.sleep(poll)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    return kills


@contextlib.contextmanager
def chromium_page(height: int, allowed: tuple[str, ...] = ("file:",)) -> Iterator[tuple[Any, list[str]]]:
    """A page in Debian's headless Chromium, and the list its console errors, page errors and any
    request outside `allowed` URL schemes are collected into."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": height})
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.on("request", lambda q: errors.append(f"network: {q.url}") if not q.url.startswith(allowed) else None)
        yield page, errors
        browser.close()
