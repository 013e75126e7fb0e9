"""The teacher client and collector against real HTTP on 127.0.0.1: faults, limits, budget,
exactly-once under SIGKILL and Ctrl-C, batch files, exports, dry run."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
import pytest
import yaml

from conftest import cli_command, count_responses, run_cli, write_config, write_jsonl
from distill4all.config import Price, TeacherConfig
from distill4all.store import Store, tasks
from distill4all.store.prompts import Prompt, prompt_id
from distill4all.teacher.answers import answer_pending
from distill4all.teacher.client import TeacherClient
from distill4all.teacher.cost import Budget
from distill4all.teacher.limiter import RateLimiter, Window, parse_duration
from servers import Background, FaultProxy, StubTeacher, start_stub_process


@pytest.fixture
def stub() -> Iterator[tuple[StubTeacher, Background]]:
    teacher = StubTeacher(delay=0.01)
    server = Background(teacher.handle)
    yield teacher, server
    server.stop()


def fill(store: Store, texts: list[str], teacher: str = "t", samples: int = 1) -> None:
    tasks.add_prompts(store, [Prompt(prompt_id("s", t), "s", t) for t in texts], [(teacher, samples)])


def client_for(url: str, **kw: Any) -> TeacherClient:
    opts: dict[str, Any] = {"api_key": None, "timeout_s": 1.0, "max_retries": 8, "max_connections": 16}
    opts |= kw
    limiter = opts.pop("limiter", RateLimiter(None, None))
    c = TeacherClient(url, limiter=limiter, backoff_base_s=0.02, backoff_cap_s=0.2, **opts)
    return c


def run_collect(store: Store, teacher: TeacherConfig, client: TeacherClient, budget: Budget | None = None,
                price: Price | None = None) -> Any:  # fmt: skip
    async def go() -> Any:
        try:
            return await answer_pending(
                store, teacher, client, price or Price(input=0, output=0), budget or Budget(None), batch_size=8
            )
        finally:
            await client.aclose()

    return asyncio.run(go())


def stored(store: Store) -> dict[str, int]:
    return dict(
        store.db.execute(
            "SELECT p.text, COUNT(*) FROM responses r JOIN prompts p ON p.id = r.prompt_id GROUP BY p.text"
        )
    )


def test_every_prompt_answered_once_with_usage_and_length_finish(
    tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, server = stub
    store = Store(tmp_path / "s.sqlite")
    texts = [f"question {i}" for i in range(40)]
    fill(store, texts, samples=2)
    teacher = TeacherConfig(name="t", model="m", max_tokens=5, concurrency=8, samples=2)
    outcome = run_collect(store, teacher, client_for(server.url))
    assert outcome.answered == 80 and outcome.failed == 0 and outcome.stopped is None
    assert stored(store) == {t: 2 for t in texts}
    row = store.db.execute(
        "SELECT text, finish_reason, prompt_tokens, completion_tokens, params FROM responses LIMIT 1"
    ).fetchone()
    assert row[0].startswith("Answer to: question") and row[1] == "length" and row[3] == 5 and row[2] > 0
    params = json.loads(row[4])
    assert params["max_tokens"] == 5 and params["model"] == "m" and "messages" not in params
    seeds = {json.loads(p)["seed"] for (p,) in store.db.execute("SELECT params FROM responses")}
    assert seeds == {0, 1}  # each sample its own seed
    assert store.count("SELECT COUNT(*) FROM tasks WHERE state != 'done'") == 0


def test_faults_are_retried_until_answered_exactly_once(tmp_path: Path, stub: tuple[StubTeacher, Background]) -> None:
    teacher_stub, upstream = stub
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.45, seed=3, slow_s=2.0)
    server = Background(proxy.handle)
    try:
        store = Store(tmp_path / "s.sqlite")
        texts = [f"q{i}" for i in range(60)]
        fill(store, texts)
        teacher = TeacherConfig(name="t", model="m", max_tokens=8, concurrency=12)
        outcome = run_collect(store, teacher, client_for(server.url, timeout_s=0.5, max_retries=12))
    finally:
        server.stop()
    assert set(proxy.injected) == {"429", "500", "503", "slow", "drop", "malformed"}
    assert outcome.answered == 60 and outcome.failed == 0
    assert stored(store) == {t: 1 for t in texts}
    attempts = [json.loads(p)["attempts"] for (p,) in store.db.execute("SELECT params FROM responses")]
    assert max(attempts) > 1 and sum(a - 1 for a in attempts) >= sum(proxy.injected.values()) - 12
    # a slow answer that the client gave up on may still have reached the teacher: it is paid, never stored twice
    assert all(n >= 1 for n in teacher_stub.answered.values())


def test_retry_after_pauses_every_worker(tmp_path: Path, stub: tuple[StubTeacher, Background]) -> None:
    _, upstream = stub
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0, script=["429"])
    server = Background(proxy.handle)
    try:
        store = Store(tmp_path / "s.sqlite")
        fill(store, [f"q{i}" for i in range(12)])
        teacher = TeacherConfig(name="t", model="m", max_tokens=4, concurrency=1)
        client = client_for(server.url)
        run_collect(store, teacher, client)
    finally:
        server.stop()
    first, rest = proxy.arrivals[0], proxy.arrivals[1:]
    assert len(rest) == 12 and min(rest) - first >= 0.95  # Retry-After: 1, honoured by all
    assert client.throttled == 1


def test_aimd_window_halves_on_429_and_grows_back() -> None:
    async def go() -> list[float]:
        w = Window(16)
        sizes = []
        await w.enter()
        await w.leave(throttled=True)
        sizes.append(w.size)
        await w.enter()
        await w.leave(throttled=True)
        sizes.append(w.size)
        for _ in range(40):
            await w.enter()
            await w.leave()
        sizes.append(w.size)
        return sizes

    a, b, c = asyncio.run(go())
    assert (a, b) == (8.0, 4.0) and 8 < c <= 16


def test_rate_limit_headers_and_client_limits() -> None:
    assert parse_duration("6m0s") == 360 and parse_duration("20ms") == 0.02 and parse_duration("1.5") == 1.5
    assert parse_duration("1h2m3.5s") == 3723.5 and parse_duration("soon") is None
    lim = RateLimiter(requests_per_minute=None, tokens_per_minute=None)
    lim.observe(httpx.Headers({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2s",
                               "x-ratelimit-limit-tokens": "6000"}), next_request_tokens=100)  # fmt: skip
    assert lim.paused_until - time.monotonic() > 1.5
    assert lim.tokens is not None and lim.tokens.rate == 100  # adopted: 6000/min

    async def timed(rpm: float, n: int) -> float:
        limiter = RateLimiter(rpm, None)
        t0 = time.monotonic()
        for _ in range(n):
            await limiter.acquire(1)
        return time.monotonic() - t0

    # 120/min with 5 s of burst: 10 at once, then one every 0.5 s
    assert asyncio.run(timed(120, 10)) < 0.2
    assert 1.3 < asyncio.run(timed(120, 13)) < 2.5


def test_a_4xx_is_not_retried_and_fails_for_good(tmp_path: Path, stub: tuple[StubTeacher, Background]) -> None:
    _, upstream = stub
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0)
    server = Background(proxy.handle)
    try:
        store = Store(tmp_path / "s.sqlite")
        fill(store, ["fine", "REJECT me"])
        outcome = run_collect(store, TeacherConfig(name="t", model="m"), client_for(server.url))
    finally:
        server.stop()
    assert outcome.answered == 1 and outcome.failed == 1 and len(proxy.arrivals) == 2  # no retry
    state, err, permanent = store.db.execute(
        "SELECT state, last_error, permanent FROM tasks WHERE state = 'failed'"
    ).fetchone()
    assert state == "failed" and permanent == 1 and err == "HTTP 400: this prompt is rejected"
    assert tasks.requeue(store) == 0  # a permanent failure is not asked again


def test_budget_stops_cleanly_and_the_rest_resumes(tmp_path: Path, stub: tuple[StubTeacher, Background]) -> None:
    _, server = stub
    store = Store(tmp_path / "s.sqlite")
    fill(store, [f"q{i}" for i in range(30)])
    teacher = TeacherConfig(name="t", model="m", max_tokens=10, concurrency=4)
    price = Price(input=1000.0, output=1000.0)  # $0.001 a token: each answer ~$0.02-0.03
    budget = Budget(0.25)
    outcome = run_collect(store, teacher, client_for(server.url), budget=budget, price=price)
    assert outcome.stopped == "budget" and 0 < outcome.answered < 30
    assert tasks.spent_usd(store) <= 0.25 and abs(tasks.spent_usd(store) - budget.spent_usd) < 1e-9
    assert store.count("SELECT COUNT(*) FROM tasks WHERE state = 'inflight'") == 0  # unsent ones released
    more = run_collect(store, teacher, client_for(server.url), budget=Budget(None, tasks.spent_usd(store)), price=price)
    assert more.answered == 30 - outcome.answered
    assert store.count("SELECT COUNT(*) FROM responses") == 30


# --- endpoints that answer in other shapes -----------------------------------------------------


def answers(store: Store) -> list[tuple[str, str, int, int, float, str]]:
    return store.db.execute(
        "SELECT p.text, r.text, r.prompt_tokens, r.completion_tokens, r.cost_usd, r.usage"
        " FROM responses r JOIN prompts p ON p.id = r.prompt_id ORDER BY p.text"
    ).fetchall()


def test_an_answer_without_usage_is_estimated_at_four_characters_a_token_never_free(
    tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    from distill4all.teacher.answers import build_messages
    from distill4all.teacher.client import estimate_prompt_tokens

    _, server = stub
    store = Store(tmp_path / "s.sqlite")
    fill(store, ["question one", "question two", "REJECT this"])
    teacher = TeacherConfig(name="t", model="gpt-4o-mini", max_tokens=6, extra_body={"stub_usage": False})
    price = Price(input=1.0, output=2.0)
    outcome = run_collect(store, teacher, client_for(server.url), price=price)
    assert outcome.answered == 2 and outcome.without_usage == 2 and outcome.counted_by.startswith("estimate")
    for prompt, text, pt, ct, cost, usage in answers(store):
        assert usage == "estimate (~4 characters a token)"
        assert pt == estimate_prompt_tokens(build_messages(teacher, prompt)) and ct == (len(text) + 3) // 4 > 0
        assert cost == pytest.approx((pt * 1.0 + ct * 2.0) / 1e6) and cost > 0
    counts = tasks.counts(store)
    assert counts["cost_estimated_answers"] == 2 and counts["cost_usd"] > 0


def test_an_answer_without_usage_is_counted_with_the_teachers_tokenizer(
    tmp_path: Path, stub: tuple[StubTeacher, Background], tiny_model: Path
) -> None:
    from transformers import AutoTokenizer

    from distill4all.errors import ModelError
    from distill4all.teacher.answers import build_messages

    _, server = stub
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    reported = TeacherConfig(name="r", model=str(tiny_model), max_tokens=6)
    local_model = TeacherConfig(name="m", model=str(tiny_model), max_tokens=6, system_prompt="Be brief.",
                                extra_body={"stub_usage": False})  # fmt: skip
    named = TeacherConfig(name="n", model="served-name", tokenizer="tiny", max_tokens=6,
                          extra_body={"stub_usage": False})  # fmt: skip
    for teacher, how in (
        (reported, "reported"),
        (local_model, f"tokenizer of {tiny_model}"),
        (named, "tokenizer of tiny"),
    ):
        store = Store(tmp_path / f"{teacher.name}.sqlite")
        fill(store, ["what is a cat?"], teacher=teacher.name)
        run_collect(store, teacher, client_for(server.url), price=Price(input=1.0, output=1.0))
        ((prompt, text, pt, ct, cost, usage),) = answers(store)
        assert usage == how and cost == pytest.approx((pt + ct) / 1e6)
        if teacher is reported:
            assert (pt, ct) == (len(prompt.split()) + 8, 6)  # the stub's own usage, kept as it is
            continue
        rendered = tok.apply_chat_template(build_messages(teacher, prompt), tokenize=False, add_generation_prompt=True)
        assert pt == len(tok(rendered, add_special_tokens=False).input_ids)
        assert ct == len(tok(text, add_special_tokens=False).input_ids)
    # a tokenizer that was asked for and cannot be loaded stops before anything is sent
    store = Store(tmp_path / "x.sqlite")
    fill(store, ["q"], teacher="x")
    with pytest.raises(ModelError, match="neither a path that exists nor a known name"):
        run_collect(store, TeacherConfig(name="x", model="m", tokenizer=str(tmp_path / "nope")), client_for(server.url))
    assert store.count("SELECT COUNT(*) FROM tasks WHERE state = 'pending'") == 1


def test_content_as_a_list_of_parts_is_its_text_parts_joined(
    tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, server = stub
    store = Store(tmp_path / "s.sqlite")
    fill(store, ["question one"])
    as_text = run_collect(store, TeacherConfig(name="t", model="m", max_tokens=8), client_for(server.url))
    parts_store = Store(tmp_path / "p.sqlite")
    fill(parts_store, ["question one"])
    teacher = TeacherConfig(name="t", model="m", max_tokens=8, extra_body={"stub_content": "parts"})
    as_parts = run_collect(parts_store, teacher, client_for(server.url))
    assert as_text.answered == as_parts.answered == 1
    ((_, text, *_),) = answers(store)
    assert text == "Answer to: question one and more words and" and answers(parts_store)[0][1] == text


@pytest.mark.parametrize("shape", ["field", "ollama", "inline", "only"])
def test_a_reasoning_teachers_thinking_is_stored_apart_from_its_answer(
    shape: str, tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, server = stub
    store = Store(tmp_path / "s.sqlite")
    fill(store, ["question one"])
    teacher = TeacherConfig(name="t", model="m", max_tokens=8, extra_body={"stub_reasoning": shape})
    assert run_collect(store, teacher, client_for(server.url)).answered == 1
    ((text, reasoning),) = store.db.execute("SELECT text, reasoning FROM responses").fetchall()
    assert reasoning == "Thinking about question one: first this, then that."
    # content null beside the reasoning is an answer all reasoning, stored, not a failure
    assert text == ("" if shape == "only" else "Answer to: question one and more words and")


def test_an_error_in_a_200_answer_is_a_failure_with_its_message(
    tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, upstream = stub
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0)  # counts what arrives
    server = Background(proxy.handle)
    try:
        store = Store(tmp_path / "s.sqlite")
        fill(store, ["fine", "ERROR200 a", "ERROR200-INVALID b", "ERROR200-TEXT c"])
        outcome = run_collect(store, TeacherConfig(name="t", model="m"), client_for(server.url, max_retries=1))
    finally:
        server.stop()
    assert outcome.answered == 1 and outcome.failed == 3 and len(proxy.arrivals) == 1 + 2 + 1 + 2
    failed = dict(
        store.db.execute(
            "SELECT p.text, t.last_error || ' | ' || t.permanent FROM tasks t JOIN prompts p ON p.id = t.prompt_id"
            " WHERE t.state = 'failed'"
        ).fetchall()
    )
    assert failed == {
        "ERROR200 a": "gave up after 2 attempts: error in the answer (code 502): upstream overloaded | 0",
        "ERROR200-INVALID b": "error in the answer: prompt is too long | 1",  # an invalid request: not asked again
        "ERROR200-TEXT c": "gave up after 2 attempts: error in the answer: the model is loading | 0",
    }
    assert store.count("SELECT COUNT(*) FROM responses") == 1  # no empty answer stored for them


# --- through the CLI, against a teacher in another process -------------------------------------


@pytest.fixture
def stub_process() -> Iterator[str]:
    p, url = start_stub_process(delay=0.05)
    yield url
    p.kill()
    p.wait()


def api_config(tmp_path: Path, url: str, n: int, **teacher: Any) -> Path:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"prompt number {i}"} for i in range(n)])
    data = {
        "name": "c",
        "run_dir": "run",
        "collect": {
            "sources": [{"name": "qs", "path": "prompts.jsonl"}],
            "teachers": [
                {
                    "name": "api",
                    "model": "gpt-4o-mini",
                    "base_url": url,
                    "api_key": "${D4A_KEY}",
                    "max_tokens": 12,
                    "concurrency": 16,
                    **teacher,
                }
            ],
            "batch_size": 16,
        },
    }
    return write_config(tmp_path / "run.yaml", data)


def server_answers(url: str) -> dict[str, int]:
    return dict(httpx.get(url.removesuffix("/v1") + "/_stats").json()["answered"])


def test_sigkill_several_times_then_exactly_once(tmp_path: Path, stub_process: str) -> None:
    n = 600
    config = api_config(tmp_path, stub_process, n)
    env = {"D4A_KEY": "sk-test"}
    run_dir = tmp_path / "run"
    kills = 0
    for threshold in (50, 200, 350):
        p = subprocess.Popen(cli_command("--quiet", "run", config), env={**os.environ, **env},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        while count_responses(run_dir) < threshold and p.poll() is None:
            time.sleep(0.01)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            kills += 1
        p.wait()
    assert kills == 3
    r = run_cli("run", config, env=env)
    assert r.code == 0, r.output
    db = sqlite3.connect(run_dir / "store.sqlite")
    per = db.execute("SELECT prompt_id, COUNT(*) FROM responses GROUP BY prompt_id").fetchall()
    assert len(per) == n and {c for _, c in per} == {1}
    paid = sum(server_answers(stub_process).values())
    assert n <= paid <= n + kills * 16  # at most what was in flight at each kill was paid twice
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["collect"]["counts"]["answered"] == n
    assert manifest["costs"]["collect_usd"] > 0  # gpt-4o-mini has a list price


def test_ctrl_c_stores_everything_paid_for(tmp_path: Path, stub_process: str) -> None:
    n = 400
    config = api_config(tmp_path, stub_process, n)
    env = {**os.environ, "D4A_KEY": "sk-test"}
    p = subprocess.Popen(cli_command("--quiet", "run", config), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    while count_responses(tmp_path / "run") < 100 and p.poll() is None:
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    stored_now = count_responses(tmp_path / "run")
    assert stored_now == sum(server_answers(stub_process).values())  # every paid answer landed
    assert stored_now < n
    r = run_cli("status", tmp_path / "run")
    assert "failed" in r.stdout or "interrupted" in r.stdout
    assert run_cli("run", config, env={"D4A_KEY": "sk-test"}).code == 0
    assert count_responses(tmp_path / "run") == n == sum(server_answers(stub_process).values())


def test_max_cost_then_continue_and_exports(tmp_path: Path, stub_process: str) -> None:
    config = api_config(tmp_path, stub_process, 50, price={"input": 2000.0, "output": 2000.0})
    env = {"D4A_KEY": "sk-test"}
    r = run_cli("run", config, "--max-cost", "0.5", env=env)
    assert r.code == 2 and "budget reached" in r.stderr and "pending" in r.stderr
    partial = count_responses(tmp_path / "run")
    assert 0 < partial < 50
    r = run_cli("run", config, env=env)
    assert r.code == 0 and count_responses(tmp_path / "run") == 50

    for fmt, name in (("jsonl", "p.jsonl"), ("parquet", "p.parquet"), ("messages", "m.jsonl")):
        r = run_cli("collect", "export", config, tmp_path / name, "--format", fmt, env=env)
        assert r.code == 0, r.output
    rows = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and set(rows[0]) >= {"prompt", "response", "source"} and rows[0]["source"] == "qs"
    assert pq.read_table(tmp_path / "p.parquet").num_rows == 50
    msg = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[0])
    assert [m["role"] for m in msg["messages"]] == ["user", "assistant"]


def test_dry_run_estimates_without_sending_or_writing(tmp_path: Path, stub_process: str) -> None:
    config = api_config(tmp_path, stub_process, 100, price={"input": 1.0, "output": 3.0})
    r = run_cli("run", config, "--dry-run", env={"D4A_KEY": "sk-test"})
    assert r.code == 0, r.output
    assert "100" in r.stdout and "nothing was sent" in r.stdout
    assert not (tmp_path / "run").exists() and server_answers(stub_process) == {}


def test_batch_export_and_ingest(tmp_path: Path, stub_process: str) -> None:
    config = api_config(tmp_path, stub_process, 5, price={"input": 1e6, "output": 1e6})
    env = {"D4A_KEY": "sk-test"}
    (tmp_path / "run").mkdir()
    Store(tmp_path / "run" / "store.sqlite").close()
    r = run_cli("collect", "batch-export", config, tmp_path / "batch.jsonl", env=env)
    assert r.code == 0, r.output
    requests = [json.loads(x) for x in (tmp_path / "batch.jsonl").read_text().splitlines()]
    assert len(requests) == 5 and requests[0]["url"] == "/v1/chat/completions"
    assert requests[0]["body"]["model"] == "gpt-4o-mini" and requests[0]["body"]["max_tokens"] == 12
    # what the Batch API gives back, one line per request (the last one failed)
    results = []
    for i, req in enumerate(requests):
        if i == 4:
            results.append({"id": f"b{i}", "custom_id": req["custom_id"], "response": None,
                            "error": {"code": "server_error", "message": "batch item failed"}})  # fmt: skip
            continue
        body = {"model": "gpt-4o-mini", "choices": [{"message": {"role": "assistant", "content": f"batch answer {i}"},
                "finish_reason": "stop"}], "usage": {"prompt_tokens": 10, "completion_tokens": 3}}  # fmt: skip
        results.append(
            {
                "id": f"b{i}",
                "custom_id": req["custom_id"],
                "response": {"status_code": 200, "body": body},
                "error": None,
            }
        )
    write_jsonl(tmp_path / "results.jsonl", results)
    r = run_cli("collect", "batch-ingest", config, tmp_path / "results.jsonl", env=env)
    assert r.code == 0 and "stored 4" in r.stdout and "failed 1" in r.stdout, r.output
    r = run_cli("collect", "batch-ingest", config, tmp_path / "results.jsonl", env=env)
    assert "stored 0" in r.stdout and "already stored 4" in r.stdout
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    assert db.execute("SELECT SUM(cost_usd) FROM responses").fetchone()[0] == pytest.approx(4 * 13 * 0.5)
    # the run then asks only for the one that failed in the batch
    r = run_cli("run", config, env=env)
    assert r.code == 0, r.output
    assert sum(server_answers(stub_process).values()) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"custom_id": "nope:api:0", "response": {"status_code": 200, "body": {}}}\n')
    r = run_cli("collect", "batch-ingest", config, bad, env=env)
    assert r.code == 2 and f"{bad}:1: custom_id 'nope:api:0' names no prompt of this run" in r.stderr


def test_a_wrong_api_key_stops_at_the_first_answer_and_leaks_nothing(tmp_path: Path) -> None:
    stub = StubTeacher(api_key="sk-right")
    upstream = Background(stub.handle)
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0)  # counts what arrives
    server = Background(proxy.handle)
    try:
        config = api_config(tmp_path, server.url, 40, concurrency=4)
        r = run_cli("run", config, env={"D4A_KEY": "sk-wrong-SECRET"})
    finally:
        server.stop()
        upstream.stop()
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.code == 2 and len(errors) == 1 and errors[0] == r.stderr.strip().splitlines()[-1], r.output
    assert "teacher api" in r.stderr and "HTTP 401: Incorrect API key provided" in r.stderr
    assert "nothing to curate" not in r.output and len(proxy.arrivals) <= 4  # not one request per prompt
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    assert db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall() == [("pending", 40)]
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert b"sk-wrong-SECRET" not in f.read_bytes()
    data = yaml.safe_load(config.read_text())
    assert data["collect"]["teachers"][0]["api_key"] == "${D4A_KEY}"


def test_a_teacher_that_is_down_leaves_collect_unfinished_and_a_rerun_retries(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = api_config(tmp_path, f"http://127.0.0.1:{port}/v1", 6, max_retries=1)
    env = {"D4A_KEY": "k"}
    r = run_cli("collect", "run", config, env=env)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.code == 2 and len(errors) == 1, r.output
    assert "6 answers failed for reasons that may pass" in r.stderr
    assert "connection error ×6 (first: teacher api: gave up after 2 attempts: connection error" in r.stderr
    status = run_cli("status", tmp_path / "run")
    assert "failed" in status.stdout and "connection error ×6" in status.stdout, status.output

    server = Background(StubTeacher().handle, port=port)  # the teacher is back
    try:
        r = run_cli("collect", "run", config, env=env)
    finally:
        server.stop()
    assert r.code == 0, r.output
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    assert db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall() == [("done", 6)]
    assert count_responses(tmp_path / "run") == 6


def test_a_streak_of_failures_stops_sending(tmp_path: Path) -> None:
    """A teacher that is down is not asked once per prompt, each waiting out its retries."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    store = Store(tmp_path / "s.sqlite")
    fill(store, [f"q{i}" for i in range(60)])
    outcome = run_collect(store, TeacherConfig(name="t", model="m", concurrency=2), client_for(url, max_retries=0))
    assert outcome.stopped == "unavailable" and outcome.answered == 0
    assert 8 <= outcome.failed <= 10  # the streak (8), and what was in flight
    assert store.count("SELECT COUNT(*) FROM tasks WHERE state = 'pending'") == 60 - outcome.failed


def test_files_a_stage_writes_are_readable_by_others(tmp_path: Path, stub_process: str) -> None:
    """Under the usual umask every file is 0644 and every folder 0755 (temp files made 0600 and
    renamed into place used to stay unreadable to anyone else)."""
    config = api_config(tmp_path, stub_process, 4)
    before = os.umask(0o022)
    try:
        r = run_cli("collect", "run", config, env={"D4A_KEY": "k"})
        init = run_cli("init", tmp_path / "starter.yaml")
    finally:
        os.umask(before)
    assert r.code == 0 and init.code == 0, r.output + init.output
    written = [tmp_path / "starter.yaml", *(tmp_path / "run").rglob("*")]
    assert {"manifest.json", "pairs.jsonl", "store.sqlite"} <= {p.name for p in written}
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in written}
    assert modes == {name: 0o755 if (tmp_path / name).is_dir() else 0o644 for name in modes}


def test_status_in_a_pipe_and_as_json(tmp_path: Path, stub_process: str) -> None:
    config = api_config(tmp_path, stub_process, 3)
    assert run_cli("collect", "run", config, env={"D4A_KEY": "k"}).code == 0
    long_dir = tmp_path / ("a-run-folder-with-a-long-name-" * 4)
    (tmp_path / "run").rename(long_dir)
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    table = subprocess.run(cli_command("status", long_dir), capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0 and str(long_dir) in table.stdout, table.stdout  # the title, whole
    assert "answered 3" in table.stdout and "prompts_by_source" not in table.stdout
    r = subprocess.run(cli_command("status", long_dir, "--json"), capture_output=True, text=True, env=env, timeout=120)
    shown = json.loads(r.stdout)
    assert shown["run_dir"] == str(long_dir)
    (collect,) = shown["stages"]
    assert collect["stage"] == "collect" and collect["status"] == "done" and collect["attempts"] == 1
    assert collect["counts"]["answered"] == 3 and collect["counts"]["prompts_by_source"] == {"qs": 3}
    assert collect["artifacts"] and collect["error"] is None


def test_collect_says_the_cost_is_estimated_and_shows_an_error_given_with_http_200(
    tmp_path: Path, stub_process: str
) -> None:
    config = api_config(tmp_path, stub_process, 3, extra_body={"stub_usage": False}, max_retries=1)
    with open(tmp_path / "prompts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"prompt": "ERROR200 then nothing"}) + "\n")
    r = run_cli("collect", "run", config, env={"D4A_KEY": "k"})
    assert r.code == 2, r.output
    assert "collect · api: 3 answers came without usage; their tokens were counted by estimate" in r.stderr
    assert "error in the answer ×1 (first: teacher api: gave up after 2 attempts: error in the answer (code 502): " \
           "upstream overloaded)" in r.stderr  # fmt: skip
    status = run_cli("status", tmp_path / "run")
    assert "cost_usd ~" in status.stdout and "(estimated: 3 answers without usage)" in status.stdout, status.stdout
    assert "upstream overloaded" in status.stdout
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    assert db.execute("SELECT usage, COUNT(*), MIN(cost_usd) > 0 FROM responses GROUP BY usage").fetchall() == [
        ("estimate (~4 characters a token)", 3, 1)
    ]


# --- nothing hangs a paid run: bugs, and waits a teacher asks for --------------------------------


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() in a thread, failing the test if it has not returned in time (a hang must not hang CI)."""
    box: dict[str, Any] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the test
            box["error"] = e

    thread = threading.Thread(target=call, daemon=True)
    t0 = time.monotonic()
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    box["seconds"] = time.monotonic() - t0
    return box


def collect_within(seconds: float, path: Path, texts: list[str], teacher: TeacherConfig, client: Any) -> Any:
    """`within` for run_collect on a new store of `texts` (a store is used in the thread that opened it)."""

    def go() -> Any:
        with Store(path) as store:
            fill(store, texts)
            return run_collect(store, teacher, client)

    return within(seconds, go)


def states(path: Path) -> dict[str, int]:
    with Store(path) as store:
        return dict(store.db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())


class FailsAfter:
    """A Completer that answers through the real client, then raises what no code expects (a bug
    in a later version, a library that changed): the loop must end at once and say so."""

    def __init__(self, client: TeacherClient, answers: int) -> None:
        self.client, self.answers, self.answered = client, answers, 0

    async def complete(self, body: dict[str, Any], est_tokens: int, window: Window | None = None) -> Any:
        if self.answered >= self.answers:
            raise RuntimeError("a bug in the client")
        reply = await self.client.complete(body, est_tokens, window)
        self.answered += 1
        return reply

    async def aclose(self) -> None:
        await self.client.aclose()


def test_a_bug_in_a_worker_ends_the_loop_at_once_with_its_cause(
    tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, server = stub
    client = client_for(server.url)
    teacher = TeacherConfig(name="t", model="m", max_tokens=4, concurrency=4)
    path = tmp_path / "s.sqlite"
    ended = collect_within(20, path, [f"q{i}" for i in range(40)], teacher, FailsAfter(client, 3))
    assert isinstance(ended.get("error"), RuntimeError) and str(ended["error"]) == "a bug in the client"
    assert ended["seconds"] < 5
    # the answers that landed are stored, those in flight were cut off, and none is left in flight
    done = states(path)
    assert 3 <= done["done"] <= 3 + 4 and done == {"done": done["done"], "pending": 40 - done["done"]}


@pytest.mark.parametrize(
    ("header", "value", "said"),
    [
        ("Retry-After", "99999999", r"1157 days \(retry-after: 99999999\)"),
        ("Retry-After", "inf", r"forever \(retry-after: inf\)"),
        ("retry-after-ms", "inf", r"forever \(retry-after-ms: inf\)"),
        ("Retry-After", "Thu, 01 Jan 2099 00:00:00 GMT", r"\d+ days \(retry-after: Thu, 01 Jan 2099 00:00:00 GMT\)"),
        ("Retry-After", "30", r"30 s \(retry-after: 30\)"),  # past this client's max_wait_s of 5
        ("x-ratelimit-reset-requests", "99999h", r"4167 days \(x-ratelimit-reset-requests: 99999h\)"),
    ],
)
def test_a_wait_past_the_limit_stops_at_once_and_loses_nothing(
    header: str, value: str, said: str, tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    from distill4all.errors import TeacherUnavailable

    _, upstream = stub
    if header.startswith("x-ratelimit"):  # an answer that says no request is left until the reset
        proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0,
                           answer_headers={"x-ratelimit-remaining-requests": "0", header: value})  # fmt: skip
    else:
        proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=1.0, faults=("429",), retry_after={header: value})
    server = Background(proxy.handle)
    try:
        client = client_for(server.url, limiter=RateLimiter(None, None, max_wait_s=5))
        teacher = TeacherConfig(name="t", model="m", base_url=server.url, concurrency=2)
        ended = collect_within(20, tmp_path / "s.sqlite", [f"q{i}" for i in range(12)], teacher, client)
    finally:
        server.stop()
    error = ended.get("error")
    assert isinstance(error, TeacherUnavailable), ended
    told = rf"^teacher t \(m, {re.escape(server.url)}\) asks to wait {said}, longer than max_retry_wait_s \(5 s\)"
    assert re.search(told, str(error)), str(error)
    assert ended["seconds"] < 5 and len(proxy.arrivals) <= 3
    # the answers that said so (both in flight) are kept, the rest pending
    done = states(tmp_path / "s.sqlite").get("done", 0)
    assert states(tmp_path / "s.sqlite") == {"pending": 12 - done} | ({"done": done} if done else {})
    assert done == 0 if header == "Retry-After" or header == "retry-after-ms" else 1 <= done <= 2


@pytest.mark.parametrize(
    ("header", "value"),
    [("Retry-After", "soon"), ("Retry-After", "nan"), ("retry-after-ms", "later"), ("Retry-After", "")],
)
def test_a_wait_the_client_cannot_read_is_its_own_backoff(
    header: str, value: str, tmp_path: Path, stub: tuple[StubTeacher, Background]
) -> None:
    _, upstream = stub
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0, script=["429", "429"], retry_after={header: value})
    server = Background(proxy.handle)
    try:
        teacher = TeacherConfig(name="t", model="m", concurrency=1)
        ended = collect_within(20, tmp_path / "s.sqlite", ["q1", "q2"], teacher, client_for(server.url))
    finally:
        server.stop()
    assert "error" not in ended, ended
    assert ended["value"].answered == 2 and proxy.injected["429"] == 2


def test_a_huge_retry_after_ends_collect_with_one_line_and_a_rerun_resumes(tmp_path: Path) -> None:
    upstream = Background(StubTeacher().handle)
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0, script=["ok", "429"],
                       retry_after={"Retry-After": "99999999"})  # fmt: skip
    server = Background(proxy.handle)
    env = {"D4A_KEY": "k"}
    try:
        r = run_cli("collect", "run", api_config(tmp_path, server.url, 6, concurrency=1), env=env)
        lines = r.stderr.strip().splitlines()
        assert r.code == 2 and lines[-1].startswith("error: ") and sum(x.startswith("error") for x in lines) == 1
        assert "asks to wait 1157 days (retry-after: 99999999), longer than max_retry_wait_s (600 s)" in lines[-1]
        assert "rerun later" in lines[-1] and count_responses(tmp_path / "run") == 1
        # the setting is honoured, and changing it is no "other settings": the stage goes on
        proxy.script, proxy.retry_after = ["429"], {"Retry-After": "1"}
        config = api_config(tmp_path, server.url, 6, concurrency=1, max_retry_wait_s=0.5)
        r = run_cli("collect", "run", config, env=env)
        assert r.code == 2 and "asks to wait 1 s (retry-after: 1), longer than max_retry_wait_s (0.5 s)" in r.stderr
        r = run_cli("collect", "run", config, env=env)
    finally:
        server.stop()
        upstream.stop()
    assert r.code == 0, r.output
    assert count_responses(tmp_path / "run") == 6 and proxy.forwarded == 6  # each answer asked for once


def test_what_is_not_finished_is_counted_right(tmp_path: Path) -> None:
    """Failed answers and answers never asked are counted apart: a teacher down for a streak of 8
    of 30 prompts leaves 8 failed and 22 not asked."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    r = run_cli("collect", "run", api_config(tmp_path, url, 30, concurrency=1, max_retries=0), env={"D4A_KEY": "k"})
    assert r.code == 2 and "8 answers failed for reasons that may pass and 22 were not asked;" in r.stderr, r.output
    r = run_cli("collect", "run", api_config(tmp_path / "b", url, 6, max_retries=0), env={"D4A_KEY": "k"})
    assert r.code == 2 and "collect is not finished: 6 answers failed for reasons that may pass; rerun" in r.stderr
