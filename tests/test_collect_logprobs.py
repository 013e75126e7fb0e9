"""A teacher's logprobs at collection: asked for on every request, kept per answer token (the
sampled token and the top-K, as bytes and float16), written with the answer exactly once, and read
back for training. Real HTTP on 127.0.0.1: the tiny model's own `serve`, and a stub that gives none."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from conftest import cli_command, count_responses, kill_at_answer_counts, run_cli, write_config, write_jsonl
from distill4all.config import CollectConfig, TeacherConfig, load_config
from distill4all.errors import ConfigError, DataError
from distill4all.store import Store, logprobs, responses, tasks
from distill4all.store.prompts import Prompt, prompt_id
from distill4all.teacher.client import parse_logprobs

PROMPTS = [f"Tell me about item {i}." for i in range(10)] + ["東京は日本の首都です。", "def add(a, b):"]


def config(tmp_path: Path, prompts: list[str], **teacher: Any) -> Path:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    data = {
        "name": "lp",
        "run_dir": "run",
        "collect": {
            "sources": [{"name": "qs", "path": "prompts.jsonl"}],
            "teachers": [{"name": "t", "max_tokens": 16, "temperature": 0.0, "concurrency": 2, **teacher}],
            "batch_size": 4,
        },
    }
    return write_config(tmp_path / "run.yaml", data)


def manifest_counts(run_dir: Path) -> dict[str, Any]:
    counts: dict[str, Any] = json.loads((run_dir / "manifest.json").read_text())["stages"]["collect"]["counts"]
    return counts


def stored_answers(run_dir: Path) -> list[tuple[int, str, str, int]]:
    """(response id, text, finish reason, completion tokens) of every answer."""
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        rows = db.execute("SELECT id, text, finish_reason, completion_tokens FROM responses ORDER BY id").fetchall()
    finally:
        db.close()
    return [(int(a), str(b or ""), str(c), int(d)) for a, b, c, d in rows]


@pytest.fixture(scope="module")
def served_tiny(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    from distill4all.teacher.local import local_teacher

    with local_teacher(str(tiny_model), log_path=tmp_path_factory.mktemp("serve") / "serve.log") as served:
        yield served


def test_our_serve_gives_openai_shaped_logprobs_up_to_128(served_tiny: tuple[str, str]) -> None:
    url, model = served_tiny
    ask = {"model": model, "messages": [{"role": "user", "content": "東京"}], "max_tokens": 6, "temperature": 0}
    r = httpx.post(f"{url}/chat/completions", json={**ask, "logprobs": True, "top_logprobs": 128}, timeout=60)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    content = choice["logprobs"]["content"]
    assert content and all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} for t in content)
    for t in content:
        assert isinstance(t["bytes"], list) and all(isinstance(b, int) and 0 <= b < 256 for b in t["bytes"])
        assert len(t["top_logprobs"]) == 128 and all(set(a) == {"token", "logprob", "bytes"} for a in t["top_logprobs"])
    r = httpx.post(f"{url}/chat/completions", json={**ask, "logprobs": True, "top_logprobs": 129}, timeout=60)
    assert r.status_code == 422 and r.json()["error"]["param"] == "top_logprobs"


def test_collect_keeps_every_answer_tokens_logprobs(tmp_path: Path, served_tiny: tuple[str, str]) -> None:
    url, model = served_tiny
    cfg = config(tmp_path, PROMPTS, model=model, base_url=url, logprobs=5)
    r = run_cli("run", cfg, "--no-report")
    assert r.code == 0, r.output
    run_dir = tmp_path / "run"
    answers = stored_answers(run_dir)
    assert len(answers) == len(PROMPTS)
    with Store(run_dir / "store.sqlite") as store:
        got = {lp.response_id: lp for lp in logprobs.for_responses(store, [a[0] for a in answers])}
        assert [lp.response_id for lp in logprobs.for_responses(store)] == sorted(got)  # all, in id order
    assert set(got) == {a[0] for a in answers}  # one entry per answer
    for rid, _, finish, completion_tokens in answers:
        lp = got[rid]
        assert lp.k == 5 and finish in ("stop", "length")
        n = len(lp.tokens)
        assert n in (completion_tokens, completion_tokens - 1)  # the EOS that ended it is not an answer token
        assert lp.logprobs.shape == (n,) and lp.top_logprobs.shape == (n, 5) and len(lp.top_tokens) == n
        assert np.all(lp.logprobs <= 0) and np.all(np.diff(lp.top_logprobs, axis=1) <= 0)  # sorted, best first
        for i in range(n):  # greedy: the sampled token is among the top-K, with its logprob
            assert len(lp.top_tokens[i]) == 5 and lp.tokens[i] in lp.top_tokens[i]
            j = lp.top_tokens[i].index(lp.tokens[i])
            assert lp.top_logprobs[i, j] == pytest.approx(lp.logprobs[i], abs=0.01)
    # The random model often writes byte tokens that make no whole character: there the text holds
    # U+FFFD, so the bytes are compared after the same lossy decoding (the real model's test, below,
    # compares them exactly).
    assert_tokens_are_the_answers(answers, got, exact_share=0.0)
    counts = manifest_counts(run_dir)
    assert counts["logprob_tokens"] == sum(len(lp.tokens) for lp in got.values()) > 0
    assert counts["answers_without_logprobs"] == 0
    print(f"\nlogprobs at K=5: {counts['logprob_bytes_per_token']} bytes per answer token")


def assert_tokens_are_the_answers(
    answers: list[tuple[int, str, str, int]], got: dict[int, logprobs.ResponseLogprobs], exact_share: float
) -> None:
    """Each answer's sampled tokens concatenate to its text: exactly (its UTF-8) wherever they make
    whole characters, which must be so for `exact_share` of the answers; else with U+FFFD where a
    character is broken, as the text has it."""
    exact = 0
    for rid, text, _, _ in answers:
        joined = b"".join(got[rid].tokens)
        assert joined.decode("utf-8", errors="replace") == text, rid
        try:
            assert joined.decode("utf-8") == text, rid
            exact += 1
        except UnicodeDecodeError:
            pass
    print(f"\n{exact} of {len(answers)} answers are their tokens' bytes exactly")
    assert exact >= exact_share * len(answers)


@pytest.mark.slow
def test_collect_keeps_the_real_smollm2s_tokens_exactly(tmp_path: Path) -> None:
    prompts = ["What is the capital of France?", "Name a primary colour.", "Write a haiku about rain.",
               "Say hello in Japanese.", "How do I reverse a list in Python?", "What is 2 + 2?"]  # fmt: skip
    cfg = config(tmp_path, prompts, model="smollm2-135m-instruct", logprobs=20, max_tokens=24, concurrency=1)
    r = run_cli("run", cfg, "--no-report")
    assert r.code == 0, r.output
    answers = stored_answers(tmp_path / "run")
    with Store(tmp_path / "run" / "store.sqlite") as store:
        got = {lp.response_id: lp for lp in logprobs.for_responses(store)}
    assert set(got) == {a[0] for a in answers} and all(got[a[0]].tokens for a in answers)
    # greedy, yet not always the top-1: the server's default repeat_penalty reranks what it samples
    assert all(lp.tokens[i] in lp.top_tokens[i] for lp in got.values() for i in range(len(lp.tokens)))
    assert_tokens_are_the_answers(answers, got, exact_share=0.8)
    print(f"SmolLM2 at K=20: {manifest_counts(tmp_path / 'run')['logprob_bytes_per_token']} bytes per answer token")


def test_sigkill_then_rerun_stores_each_answers_logprobs_once(tmp_path: Path, served_tiny: tuple[str, str]) -> None:
    """Killed twice mid-collection and rerun, every answer has exactly one logprobs row, of its own
    tokens (the server outlives the collector, as a remote API would)."""
    url, model = served_tiny
    n = 24
    cfg = config(tmp_path, [f"Say something about number {i}." for i in range(n)], model=model, base_url=url,
                 logprobs=20, concurrency=1, max_tokens=8)  # fmt: skip
    run_dir = tmp_path / "run"
    kills = kill_at_answer_counts(cli_command("--quiet", "run", cfg, "--no-report"), run_dir, (2, 6), poll=0.02)
    assert kills == 2, "the stage finished before it could be killed; make it slower"
    assert 0 < count_responses(run_dir) < n
    r = run_cli("run", cfg, "--no-report")
    assert r.code == 0, r.output
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        per_prompt = db.execute("SELECT prompt_id, COUNT(*) FROM responses GROUP BY prompt_id").fetchall()
        assert len(per_prompt) == n and all(c == 1 for _, c in per_prompt)
        rows = db.execute(
            "SELECT r.id, r.completion_tokens, COUNT(l.response_id), MAX(l.n_tokens) FROM responses r"
            " LEFT JOIN response_logprobs l ON l.response_id = r.id GROUP BY r.id"
        ).fetchall()
        assert len(rows) == n and all(c == 1 for _, _, c, _ in rows)  # one logprobs row per answer
        assert all(tokens in (ct, ct - 1) for _, ct, _, tokens in rows)  # each of its own answer
        assert db.execute("SELECT COUNT(*) FROM response_logprobs").fetchone()[0] == n
    finally:
        db.close()
    counts = manifest_counts(run_dir)
    assert counts["answered"] == n and counts["logprob_tokens"] > 0
    print(f"\nlogprobs at K=20: {counts['logprob_bytes_per_token']} bytes per answer token")


def test_an_endpoint_that_gives_no_logprobs(tmp_path: Path, stub_teacher: str) -> None:
    required = config(tmp_path / "a", ["one?", "two?", "three?"], model="stub", base_url=stub_teacher, logprobs=5)
    r = run_cli("--quiet", "run", required, "--no-report")
    assert r.code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "logprobs: 5" in lines[0] and "teacher t" in lines[0], r.stderr
    assert count_responses(tmp_path / "a" / "run") == 0  # no answer stored without them
    assert not any(state == "failed" for (state,) in _states(tmp_path / "a" / "run"))  # still to ask

    optional = config(tmp_path / "b", ["one?", "two?", "three?"], model="stub", base_url=stub_teacher, logprobs=5,
                      require_logprobs=False)  # fmt: skip
    r = run_cli("run", optional, "--no-report")
    assert r.code == 0, r.output
    assert r.output.count("without logprobs") == 1, r.output
    counts = manifest_counts(tmp_path / "b" / "run")
    assert counts["answered"] == 3 and counts["answers_without_logprobs"] == 3 and counts["logprob_tokens"] == 0


def _states(run_dir: Path) -> list[tuple[str]]:
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        return db.execute("SELECT state FROM tasks").fetchall()
    finally:
        db.close()


def test_logprobs_beyond_the_endpoints_cap_are_refused_at_load(tmp_path: Path) -> None:
    openai = {"model": "gpt-4o-mini", "base_url": "https://api.openai.com/v1"}
    with pytest.raises(ConfigError, match=r"logprobs 21: OpenAI \(api.openai.com\) returns at most 20"):
        load_config(config(tmp_path, ["q"], **openai, logprobs=21))
    assert load_config(config(tmp_path, ["q"], **openai, logprobs=20)).config.collect is not None
    with pytest.raises(ConfigError, match="logprobs"):
        load_config(config(tmp_path, ["q"], **openai, logprobs=0))
    with pytest.raises(ConfigError, match="logprobs 129: a local teacher"):
        load_config(config(tmp_path, ["q"], model="tiny", logprobs=129))
    assert load_config(config(tmp_path, ["q"], model="m", base_url="http://127.0.0.1:8000/v1", logprobs=64))
    r = run_cli("run", config(tmp_path, ["q"], **openai, logprobs=21))
    assert r.code == 2 and "logprobs 21" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


def test_batch_export_asks_for_logprobs_and_ingest_stores_them(tmp_path: Path) -> None:
    from distill4all.collect import batch

    teacher = TeacherConfig(name="api", model="gpt-4o-mini", base_url="https://api.openai.com/v1", logprobs=2)
    cfg = CollectConfig(sources=[{"name": "qs", "path": "x.jsonl"}], teachers=[teacher])  # type: ignore[list-item]
    with Store(tmp_path / "s.sqlite") as store:
        tasks.add_prompts(store, [Prompt(prompt_id("qs", q), "qs", q) for q in ("a?", "b?")], [("api", 1)])
        assert batch.export_requests(store, cfg, "api", tmp_path / "batch.jsonl") == 2
        requests = [json.loads(x) for x in (tmp_path / "batch.jsonl").read_text().splitlines()]
        assert all(q["body"]["logprobs"] is True and q["body"]["top_logprobs"] == 2 for q in requests)

        def result(q: dict[str, Any], with_logprobs: bool) -> dict[str, Any]:
            token = {"token": "Hi", "logprob": -0.25, "bytes": [72, 105],
                     "top_logprobs": [{"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                                      {"token": "Yo", "logprob": -1.5, "bytes": None}]}  # fmt: skip
            choice = {"message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop",
                      "logprobs": {"content": [token]} if with_logprobs else None}  # fmt: skip
            body = {"model": "gpt-4o-mini", "choices": [choice], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}
            return {"id": "b", "custom_id": q["custom_id"], "response": {"status_code": 200, "body": body}}

        write_jsonl(tmp_path / "bare.jsonl", [result(q, False) for q in requests])
        with pytest.raises(DataError, match=r"bare.jsonl:1: no logprobs, which teacher api's setting logprobs: 2"):
            batch.ingest_results(store, cfg, tmp_path / "bare.jsonl")
        write_jsonl(tmp_path / "results.jsonl", [result(q, True) for q in requests])
        assert batch.ingest_results(store, cfg, tmp_path / "results.jsonl")["stored"] == 2
        assert batch.ingest_results(store, cfg, tmp_path / "results.jsonl")["stored"] == 0  # read twice: once
        got = list(logprobs.for_responses(store))
        assert len(got) == 2 and all(lp.tokens == [b"Hi"] and lp.top_tokens == [[b"Hi", b"Yo"]] for lp in got)
        assert np.allclose(got[0].top_logprobs, [[-0.25, -1.5]])
        assert tasks.counts(store)["logprob_tokens"] == 2


def test_the_format_round_trips_and_rows_go_with_their_answers(tmp_path: Path) -> None:
    positions = [
        (b" the", -0.01, [(b" the", -0.01), (b" a", -4.75), (b"\xe6", -70000.0)]),  # below float16: -inf
        (b"\xe6\x9d", -1.0, [(b"x", -0.5)]),  # part of a character; fewer alternatives than k
        (b"", -3.0, []),
    ]
    encoded = logprobs.encode(3, positions)
    assert encoded.n_tokens == 3 and encoded.data[0] == logprobs.FORMAT
    lp = logprobs.decode(9, encoded.k, encoded.n_tokens, encoded.data)
    assert lp.tokens == [b" the", b"\xe6\x9d", b""] and lp.top_tokens == [[b" the", b" a", b"\xe6"], [b"x"], []]
    assert np.allclose(lp.logprobs, [-0.01, -1.0, -3.0], atol=1e-3)
    assert lp.top_logprobs[0, 1] == -4.75 and np.isneginf(lp.top_logprobs[0, 2])
    assert np.isneginf(lp.top_logprobs[1, 1:]).all() and np.isneginf(lp.top_logprobs[2]).all()
    # An endpoint that leaves a token's bytes out: its text's bytes. An empty answer: no tokens.
    choice = {"logprobs": {"content": [{"token": "é", "logprob": -1.0, "bytes": None, "top_logprobs": []}]}}
    parsed = parse_logprobs(choice, 1, "é")
    assert parsed is not None and logprobs.decode(1, 1, 1, parsed.data).tokens == ["é".encode()]
    assert parse_logprobs({"logprobs": {"content": None}}, 1, "") == logprobs.encode(1, [])
    assert parse_logprobs({"logprobs": None}, 1, "text") is None

    with Store(tmp_path / "s.sqlite") as store:
        tasks.add_prompts(store, [Prompt(prompt_id("s", "q"), "s", "q")], [("t", 1)])
        (task,) = tasks.claim(store, "t", 1)
        answer = tasks.Answer(task, "m", "x", "stop", 1, 3, 0.1, 0.0, {"logprobs": True}, encoded)
        assert tasks.record(store, [answer], []) == 1
        other = tasks.Answer(task, "m", "y", "stop", 1, 1, 0.1, 0.0, {"logprobs": True}, logprobs.encode(3, []))
        assert tasks.record(store, [other], []) == 0  # the answer is stored once, its logprobs too
        (kept,) = logprobs.for_responses(store)
        assert kept.tokens == lp.tokens and logprobs.totals(store) == (1, 3, len(encoded.data))
        responses.remove_teacher(store, "t")
        assert logprobs.totals(store) == (0, 0, 0)
        tasks.reset(store)


# --- what a teacher sends is data: logprobs of the wrong shape fail their answer ------------------


def collect_one(tmp_path: Path, url: str, first_token: dict[str, Any]) -> tuple[Any, list[tuple[str, int]]]:
    """One prompt answered through the real client by a stub whose first logprobs entry has
    `first_token`'s fields; the outcome and (error, responses) of its task."""
    import asyncio

    from distill4all.config import Price
    from distill4all.teacher.answers import answer_pending
    from distill4all.teacher.client import TeacherClient
    from distill4all.teacher.cost import Budget
    from distill4all.teacher.limiter import RateLimiter

    teacher = TeacherConfig(name="t", model="m", logprobs=2, max_tokens=6, extra_body={"stub_logprobs": first_token})
    client = TeacherClient(url, api_key=None, timeout_s=5, max_retries=0, limiter=RateLimiter(None, None),
                           max_connections=1)  # fmt: skip
    with Store(tmp_path / "s.sqlite") as store:
        tasks.add_prompts(store, [Prompt(prompt_id("s", "q"), "s", "what is it?")], [("t", 1)])

        async def go() -> Any:
            try:
                return await answer_pending(store, teacher, client, Price(input=0, output=0), Budget(None),
                                            batch_size=1)  # fmt: skip
            finally:
                await client.aclose()

        outcome = asyncio.run(go())
        rows = store.db.execute("SELECT COALESCE(last_error, ''), (SELECT COUNT(*) FROM responses) FROM tasks")
        return outcome, [(str(e), int(n)) for e, n in rows]


ALT = {"token": "a", "logprob": -1.0, "bytes": [97]}


@pytest.mark.parametrize(
    ("first_token", "reason"),
    [
        ({"bytes": 200_000_000}, "token 0: bytes is not a list of integers from 0 to 255"),
        ({"bytes": [72, 256]}, "token 0: bytes is not a list of integers from 0 to 255"),
        ({"bytes": [72, True]}, "token 0: bytes is not a list of integers from 0 to 255"),
        ({"bytes": "SGk="}, "token 0: bytes is not a list of integers from 0 to 255"),
        ({"bytes": [32] * 5000}, "token 0: more bytes than a token has (at most 1024)"),
        ({"bytes": None, "token": "x" * 2000}, "token 0: more bytes than a token has (at most 1024)"),
        ({"token": 7}, "token 0: token is not a string"),
        ({"logprob": 0.5}, "token 0: logprob 0.5 is not a finite number ≤ 0"),
        ({"logprob": "-1"}, "token 0: logprob -1 is not a finite number ≤ 0"),
        ({"logprob": float("nan")}, "token 0: logprob nan is not a finite number ≤ 0"),
        ({"logprob": float("-inf")}, "token 0: logprob -inf is not a finite number ≤ 0"),
        ({"logprob": None}, "token 0: logprob None is not a finite number ≤ 0"),
        ({"logprob": 10**400}, "token 0: logprob 10000000000000000000 is not a finite number ≤ 0"),
        ({"top_logprobs": "x"}, "token 0: top_logprobs is a str, not a list of at most 256 alternatives"),
        ({"top_logprobs": [ALT] * 300}, "token 0: top_logprobs is 300 entries, not a list of at most 256 alternatives"),
        ({"top_logprobs": [ALT | {"bytes": 999_999}]}, "token 0, alternative 0: bytes is not a list of integers"),
        ({"top_logprobs": [5]}, "token 0, alternative 0 is a int, not an object"),
    ],
)
def test_a_logprobs_entry_of_the_wrong_shape_fails_its_answer_with_the_reason(
    first_token: dict[str, Any], reason: str, tmp_path: Path
) -> None:
    from servers import Background, StubTeacher

    server = Background(StubTeacher().handle)
    try:
        outcome, rows = collect_one(tmp_path, server.url, first_token)
    finally:
        server.stop()
    assert outcome.answered == 0 and outcome.failed == 1
    ((error, stored),) = rows
    assert error.startswith("gave up after 1 attempts: malformed logprobs in the response body: " + reason), error
    assert stored == 0 and (tmp_path / "s.sqlite").stat().st_size < 1_000_000


@pytest.mark.parametrize(
    "first_token", [{"bytes": None}, {"logprob": 1e-7}, {"logprob": 0}, {"top_logprobs": None}, {"bytes": []}]
)
def test_logprobs_entries_of_every_allowed_shape_are_kept(first_token: dict[str, Any], tmp_path: Path) -> None:
    from servers import Background, StubTeacher

    server = Background(StubTeacher().handle)
    try:
        outcome, rows = collect_one(tmp_path, server.url, {"top_logprobs": [ALT] * 3} | first_token)
    finally:
        server.stop()
    assert outcome.answered == 1 and rows == [("", 1)]
    with Store(tmp_path / "s.sqlite") as store:
        (lp,) = logprobs.for_responses(store)
    assert lp.tokens[1:] == [b" to:", b" what", b" is", b" it?", b" and"]
    assert lp.top_tokens[0] == ([] if "top_logprobs" in first_token else [b"a", b"a"])  # K = 2 kept of 3


def test_a_bytes_field_cannot_bloat_the_store(tmp_path: Path, stub_teacher: str) -> None:
    """`"bytes": 2000000` (an integer, not a list) made 2 MB of NUL bytes of one token, stored as done;
    now each such answer fails with the reason, stays to be asked again, and the store stays small."""
    cfg = config(tmp_path, ["one?", "two?", "three?"], model="stub", base_url=stub_teacher, logprobs=5,
                 max_retries=0, extra_body={"stub_logprobs": {"bytes": 2_000_000}})  # fmt: skip
    r = run_cli("collect", "run", cfg)
    assert r.code == 2 and "3 answers failed for reasons that may pass" in r.stderr, r.output
    assert "malformed logprobs in the response body: token 0: bytes is not a list of integers" in r.stderr
    assert count_responses(tmp_path / "run") == 0
    assert sum(f.stat().st_size for f in (tmp_path / "run").rglob("*") if f.is_file()) < 1_000_000
