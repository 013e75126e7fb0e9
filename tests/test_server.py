"""`distill4all serve` over real HTTP on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import contextlib
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from distill4all.runtime.engine import SamplingParams, load_engine
from runtime_models import CHATS, trained_export

KEY = "test-key-9f2c"
API_KEY = "DISTILL4ALL_API_KEY"


@dataclass
class Server:
    url: str
    gguf: Path
    proc: subprocess.Popen[str]

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        kwargs.setdefault("timeout", 60)
        return httpx.post(f"{self.url}{path}", headers=headers, **kwargs)  # type: ignore[arg-type]

    def health(self) -> dict[str, object]:
        return httpx.get(f"{self.url}/health", timeout=10).json()  # type: ignore[no-any-return]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_server(log: Path, *args: str, model: Path | None = None, key: str | None = KEY) -> Iterator[Server]:
    """`distill4all serve` in a subprocess (by default the tiny chat model's Q8_0 file, with an API key)."""
    model = model or trained_export() / "model-q8_0.gguf"
    port = free_port()
    env = {**os.environ, "DISTILL4ALL_API_KEY": key} if key else {k: v for k, v in os.environ.items() if k != API_KEY}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill4all", "serve", str(model), "--port", str(port),
             "--model-name", "tiny-chat", "--n-ctx", "256", *args],
            env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
        assert proc.poll() is None, log.read_text()
    try:
        yield Server(url, model, proc)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert KEY not in log.read_text()  # the key is never logged


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(log, "--max-queue", "32", "--read-timeout", "2") as s:
        yield s


def test_models_and_health(server: Server) -> None:
    assert [m.id for m in server.client().models.list()] == ["tiny-chat"]
    assert server.client().models.retrieve("tiny-chat").id == "tiny-chat"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok" and health["backend"] == "llama.cpp" and health["n_ctx"] == 256


def test_chat_completion_sync_and_streaming(server: Server) -> None:
    client = server.client()
    r = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "ping"}], temperature=0, max_tokens=20
    )
    assert r.choices[0].message.content == "pong pong" and r.choices[0].finish_reason == "stop"
    assert r.usage is not None and r.usage.prompt_tokens > 5 and r.usage.completion_tokens >= 3
    chunks = list(client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Say hello."}], temperature=0, max_tokens=30,
        stream=True, stream_options={"include_usage": True},
    ))  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == CHATS["Say hello."]
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 3  # really streamed
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 3
    r = client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": "Say hello."}], max_tokens=3, temperature=0, n=2
    )
    assert [c.finish_reason for c in r.choices] == ["length", "length"] and r.choices[0].message.content


def test_sampling_seed_and_stop(server: Server) -> None:
    client = server.client()

    def ask(seed: int) -> str:
        r = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Numbers"}],
                                           temperature=2.0, max_tokens=12, seed=seed)  # fmt: skip
        return r.choices[0].message.content or ""

    assert ask(3) == ask(3)
    assert len({ask(s) for s in range(4)}) > 1
    r = client.chat.completions.create(model="tiny-chat", temperature=0, stop=["capital"],
                                       messages=[{"role": "user", "content": "What is the capital of France?"}])  # fmt: skip
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("Paris is the ", "stop")


def test_completions_echo_logprobs_score_the_prompt(server: Server) -> None:
    engine = load_engine(str(server.gguf))
    text = "The quick brown fox jumps over the lazy dog."
    r = server.client().completions.create(model="tiny-chat", prompt=text, max_tokens=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp is not None and r.choices[0].text == text
    ids = engine.tokenize(text)
    assert lp.tokens == [engine.token_text(i) for i in ids]
    assert lp.token_logprobs is not None and lp.token_logprobs[0] is None
    assert np.allclose(lp.token_logprobs[1:], engine.token_logprobs(ids), atol=1e-4)
    assert lp.top_logprobs is not None and all(len(t) == 2 for t in lp.top_logprobs[1:])
    prompt_ids = engine.tokenize("The quick brown")  # token ids are taken as they are
    r = server.client().completions.create(
        model="tiny-chat", prompt=prompt_ids, max_tokens=4, temperature=0, logprobs=1
    )
    assert (r.choices[0].text, r.choices[0].finish_reason) == (" fox jumps", "length")
    assert r.choices[0].logprobs is not None and len(r.choices[0].logprobs.tokens or []) == 4
    pieces = [c.choices[0].text for c in server.client().completions.create(
        model="tiny-chat", prompt="The quick brown", max_tokens=20, temperature=0, stream=True)]  # fmt: skip
    assert "".join(pieces) == " fox jumps over the lazy dog."


def test_chat_logprobs(server: Server) -> None:
    r = server.client().chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "ping"}],
                                                temperature=0, logprobs=True, top_logprobs=3)  # fmt: skip
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and "".join(t.token for t in content) == "pong pong"
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token for t in content)


def test_bad_requests_get_openai_errors_and_the_server_survives(server: Server) -> None:
    chat = "/v1/chat/completions"
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 5}
    cases = [
        (server.post(chat, content=b'{"model": "tiny-chat", "messages": [', headers={"content-type": "application/json"}),
         400, "invalid_json"),
        (server.post(chat, json={**ok, "messages": "ping"}), 422, "invalid_value"),
        (server.post(chat, json={**ok, "max_tokens": "many"}), 422, "invalid_value"),
        (server.post(chat, json={**ok, "temperature": 9}), 422, "invalid_value"),
        (server.post(chat, json={**ok, "model": "gpt-4"}), 404, "model_not_found"),
        (server.post(chat, json={**ok, "messages": [{"role": "user", "content": "word " * 400}]}),
         400, "context_length_exceeded"),
        (server.post("/v1/completions", json={"model": "tiny-chat", "prompt": [5, 99999]}), 400, None),
        (server.post(chat, content=b"x" * (5 * 1024 * 1024)), 413, "request_too_large"),
        (server.post("/v1/nothing", json=ok), 404, "not_found"),
        (httpx.post(f"{server.url}{chat}", json=ok, headers={"Authorization": "Bearer nope"}), 401, "invalid_api_key"),
        (httpx.post(f"{server.url}{chat}", json=ok), 401, "invalid_api_key"),
        # bodies that were a 500: nesting past the parser's depth, lone surrogates, numbers past the engines
        (server.post(chat, content=b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"), 400, "invalid_json"),
        (server.post(chat, content=b'{"model": "tiny-chat", "max_tokens": 5, '
                                   b'"messages": [{"role": "user", "content": "x \\ud800"}]}'), 400, "invalid_json"),
        (server.post(chat, content=b'{"model": "\\udfff", "messages": [{"role": "user", "content": "x"}]}'),
         400, "invalid_json"),
        (server.post("/v1/completions", content=b'{"model": "tiny-chat", "prompt": "\\ud83d"}'), 400, "invalid_json"),
        (server.post(chat, json={**ok, "seed": 2**64}), 422, "invalid_value"),
        (server.post(chat, json={**ok, "repeat_penalty": 1e-300}), 422, "invalid_value"),
        (server.post(chat, content=json.dumps({**ok, "repeat_penalty": float("inf")}).encode()), 422, "invalid_value"),
        (server.post(chat, json={**ok, "top_k": 10**30}), 422, "invalid_value"),
        (server.post(chat, json={**ok, "max_tokens": "5"}), 422, "invalid_value"),  # numbers are numbers
        (server.post(chat, json={**ok, "max_tokens": True}), 422, "invalid_value"),
    ]  # fmt: skip
    for response, status, code in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"] and error["code"] == code
    with pytest.raises(openai.AuthenticationError):
        server.client("wrong").chat.completions.create(model="tiny-chat", messages=ok["messages"])  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="other", messages=ok["messages"])  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client().completions.create(model="tiny-chat", prompt="word " * 400)
    assert server.post(chat, json=ok).status_code == 200  # still serving
    emoji = b'{"model": "tiny-chat", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud83d\\ude00"}]}'
    assert server.post(chat, content=emoji).status_code == 200  # a surrogate pair is one character
    for seed in (2**63 - 1, -(2**63)):  # any 64-bit seed works
        assert server.post(chat, json={**ok, "seed": seed, "temperature": 1.0}).status_code == 200


def test_a_concurrent_burst_is_served_one_at_a_time_without_mixing(server: Server) -> None:
    client = server.client()
    prompts = list(CHATS)

    def ask(i: int) -> str:
        messages = [{"role": "user", "content": prompts[i % len(prompts)]}]
        if i % 2:
            stream = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0,  # type: ignore[arg-type]
                                                    max_tokens=30, stream=True)  # fmt: skip
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        r = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=30)  # type: ignore[arg-type]
        return r.choices[0].message.content or ""

    with cf.ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(ask, range(48)))
    assert answers == [CHATS[prompts[i % len(prompts)]] for i in range(48)]

    # A client that goes away mid-stream frees the engine for the next one.
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "tiny-chat", "messages": [{"role": "user", "content": "Numbers"}],
                            "max_tokens": 200, "stream": True}, timeout=30) as r:  # fmt: skip
        next(r.iter_lines())
    assert ask(0) == CHATS[prompts[0]]
    assert server.proc.poll() is None


def slow_body(prompts: int) -> dict[str, object]:
    """A completion request that keeps the engine busy for a while: `prompts` prompts of 200 tokens."""
    rng = random.Random(0)
    return {"model": "tiny-chat", "prompt": [[rng.randrange(1, 200) for _ in range(200)] for _ in range(prompts)],
            "max_tokens": 1}  # fmt: skip


def wait_idle(server: Server, limit: float) -> float:
    """Seconds until the server has nothing running or waiting (at most `limit`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        health = server.health()
        if not health["busy"] and not health["waiting"]:
            break
        time.sleep(0.05)
    return time.monotonic() - t0


def test_the_queue_limit_holds_for_streaming_and_non_streaming_requests(tmp_path: Path) -> None:
    chat = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 5}
    with running_server(tmp_path / "server.log", "--max-queue", "4") as s, cf.ThreadPoolExecutor(51) as pool:
        blocker = pool.submit(s.post, "/v1/completions", json=slow_body(800))
        while not s.health()["busy"]:
            time.sleep(0.01)
        burst = [pool.submit(s.post, "/v1/chat/completions", json={**chat, "stream": bool(i % 2)}) for i in range(50)]
        while sum(f.done() for f in burst) < 46 and not blocker.done():
            time.sleep(0.02)
        during = s.health()
        statuses = Counter(f.result().status_code for f in burst)
        assert blocker.result().status_code == 200
    assert during["busy"] and during["waiting"] == 4, during  # the blocker ran all along: 4 waited, no more
    assert statuses == {200: 4, 503: 46}


def test_the_work_of_clients_that_left_is_dropped(server: Server) -> None:
    t0 = time.monotonic()
    assert server.post("/v1/completions", json=slow_body(300)).status_code == 200
    one = time.monotonic() - t0  # what each request below would cost if it ran to its end

    def leave() -> None:
        with contextlib.suppress(httpx.TimeoutException):
            server.post("/v1/completions", json=slow_body(300), timeout=one / 3)

    with cf.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: leave(), range(4)))
    # four requests' work (4 × one, less what ran before they left) unless it is dropped
    assert wait_idle(server, 3 * one) < one, server.health()
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    assert server.post("/v1/chat/completions", json=ok).status_code == 200


def test_slow_bodies_huge_headers_and_too_many_stops_get_clear_errors(server: Server) -> None:
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    r = server.post("/v1/chat/completions", json={**ok, "stop": ["x"] * 100})
    assert r.status_code == 422 and "at most 4 stop sequences" in r.json()["error"]["message"]

    # a body shorter than its Content-Length: answered after the read timeout (2 s here), not never
    port = int(server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
                     + b"\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":")  # fmt: skip
        t0, answer = time.monotonic(), b""
        while b"request_timeout" not in answer and (chunk := sock.recv(4096)):
            answer += chunk
    waited = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, (answer, waited)

    for headers in ({"X-Big": "a" * (1 << 20)}, {f"X-H{i}": "v" for i in range(20_000)}):
        r = server.post("/v1/chat/completions", json=ok, headers=headers)
        assert r.status_code == 431 and r.json()["error"]["code"] == "headers_too_large"
    assert server.post("/v1/chat/completions", json=ok).status_code == 200


def test_a_stream_that_fails_midway_ends_with_an_error_event_and_done() -> None:
    """What a client sees when generation breaks after the answer has begun: the official client
    raises with the server's message instead of a connection cut short."""
    from fastapi import FastAPI

    from distill4all.runtime import server as srv

    engine = load_engine(str(trained_export() / "model-q8_0.gguf"))
    state = srv.ServerState(engine, "tiny-chat")
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> object:
        head = {"id": "chatcmpl-1", "created": 0, "model": "tiny-chat"}
        params = SamplingParams(max_tokens=20, temperature=0)
        events = srv._chat_chunks(state, head, engine.chat_ids([{"role": "user", "content": "ping"}]), [params], False)

        def breaking() -> Iterator[str]:
            yield from itertools.islice(events, 2)
            raise RuntimeError("the engine broke")

        return srv._stream_response(await state.admit().take(), breaking())

    async def ask() -> tuple[list[str], str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            raw = (await http.post("/v1/chat/completions")).text
            client = openai.AsyncOpenAI(base_url="http://x/v1", api_key="k", http_client=http)
            stream = await client.chat.completions.create(model="tiny-chat", messages=[], stream=True)
            pieces = []
            with pytest.raises(openai.APIError) as caught:
                async for chunk in stream:
                    pieces.append(chunk.choices[0].delta.content or "")
        return pieces, raw, str(caught.value)

    try:
        pieces, raw, error = asyncio.run(ask())
    finally:
        engine.close()
    events = [e.removeprefix("data: ") for e in raw.strip().split("\n\n")]
    assert len(events) == 4 and events[-1] == "[DONE]", raw
    assert json.loads(events[2])["error"] == {"message": "internal error: RuntimeError", "type": "server_error",
                                              "param": None, "code": None}  # fmt: skip
    assert len(pieces) == 2 and "internal error: RuntimeError" in error
    assert state.waiting == 0 and not state.lock.locked()


def test_a_context_window_below_any_prompt_is_refused_before_loading() -> None:
    from conftest import run_cli

    for value in ("-5", "0", "15"):
        r = run_cli("serve", "tiny", "--n-ctx", value)
        assert r.code == 2 and "--n-ctx" in r.stderr, r.output


def test_hostile_numbers_and_nesting_are_4xx_naming_the_field(server: Server) -> None:
    """Each of these was a 500: a logit_bias key past int()'s 4300 digits, tool-call arguments
    nested past the JSON reader's depth (chat and /tokenize alike)."""
    ok = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 2}
    deep = [{"role": "user", "content": "x"},
            {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
                "name": "f", "arguments": "[" * 100_000 + "]" * 100_000}}]},
            {"role": "user", "content": "y"}]  # fmt: skip
    cases = [
        (server.post("/v1/chat/completions", json={**ok, "logit_bias": {"7" * 5000: 1}}), "logit_bias"),
        (server.post("/v1/completions", json={"model": "tiny-chat", "prompt": "a", "logit_bias": {"1" * 5000: -1}}),
         "logit_bias"),
        (server.post("/v1/chat/completions", json={**ok, "messages": deep}), "messages.1.tool_calls.0.function.arguments"),
        (server.post("/tokenize", json={"messages": deep}), "messages.1.tool_calls.0.function.arguments"),
    ]  # fmt: skip
    for response, param in cases:
        assert response.status_code in (400, 422), (param, response.status_code, response.text[:300])
        error = response.json()["error"]
        assert error["param"] == param and error["message"] and error["type"] == "invalid_request_error", error
    assert server.post("/v1/chat/completions", json=ok).status_code == 200


def scoring_body(prompts: int, n: int = 1) -> dict[str, object]:
    """lm-eval's way of scoring: each prompt's logprobs with echo, nothing generated."""
    rng = random.Random(1)
    return {"model": "tiny-chat", "prompt": [[rng.randrange(1, 200) for _ in range(250)] for _ in range(prompts)],
            "max_tokens": 0, "echo": True, "logprobs": 5, "n": n}  # fmt: skip


def leave(server: Server, path: str, body: dict[str, object], after: float) -> None:
    """Send a request and go away `after` seconds later, answered or not."""
    with contextlib.suppress(httpx.TimeoutException):
        server.post(path, json=body, timeout=after)


def test_a_client_that_leaves_while_its_prompts_are_scored_frees_the_engine(server: Server) -> None:
    t0 = time.monotonic()
    assert server.post("/v1/completions", json=scoring_body(200), timeout=300).status_code == 200
    one = time.monotonic() - t0  # what the request below costs if it is scored to its end
    leave(server, "/v1/completions", scoring_body(200), one / 8)
    # unless the scoring stops when its client leaves, 7/8 of its work remains
    assert wait_idle(server, 2 * one) < one / 3, (one, server.health())


def test_scoring_n_copies_of_a_prompt_scores_it_once_and_a_response_holds_a_bounded_number_of_logprobs(
    server: Server,
) -> None:
    single = server.post("/v1/completions", json=scoring_body(12), timeout=300)
    many = server.post("/v1/completions", json=scoring_body(12, n=16), timeout=300)
    assert single.status_code == many.status_code == 200, many.text[:300]
    choices = many.json()["choices"]
    assert len(choices) == 12 * 16 and all(c["index"] == i for i, c in enumerate(choices))
    for i, c in enumerate(single.json()["choices"]):
        assert all(d["logprobs"] == c["logprobs"] and d["text"] == c["text"] for d in choices[16 * i : 16 * i + 16])

    # the audit's request (n 16, top-5, prompts filling the context): refused at once, by name
    t0 = time.monotonic()
    r = server.post("/v1/completions", json=scoring_body(50, n=16), timeout=300)
    assert r.status_code == 400 and time.monotonic() - t0 < 10, r.text[:300]
    assert r.json()["error"]["code"] == "too_many_logprobs" and str(2**20) in r.json()["error"]["message"]


def test_tokenizing_is_linear_queued_and_bounded(server: Server) -> None:
    """llama.cpp splits text at special tokens in quadratic time (100k `<|im_start|>` took 45 s);
    tokenizing waited for no one; a chat of 120,000 empty messages held a queue slot for minutes."""
    t0 = time.monotonic()
    r = server.post("/tokenize", json={"prompt": "<|im_start|>" * 100_000})
    assert r.status_code == 200 and r.json()["count"] == 100_001, r.text[:300]  # BOS and the special tokens
    assert time.monotonic() - t0 < 10
    t0 = time.monotonic()  # a prompt known to be too long before it is all tokenized
    r = server.post("/v1/completions", json={"model": "tiny-chat", "prompt": "<|im_start|>user\n" * 200_000})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded", r.text[:300]
    assert "at least" in r.json()["error"]["message"] and time.monotonic() - t0 < 10
    for path, body in [("/v1/chat/completions", {"model": "tiny-chat", "max_tokens": 2}), ("/tokenize", {})]:
        t0 = time.monotonic()
        r = server.post(path, json={**body, "messages": [{"role": "user", "content": ""}] * 120_000})
        assert r.status_code == 422 and r.json()["error"]["param"] == "messages", r.text[:300]
        assert "at most 2048 messages" in r.json()["error"]["message"] and time.monotonic() - t0 < 10
    r = server.post("/v1/completions", json={"model": "tiny-chat", "prompt": ["a"] * 3000, "max_tokens": 1})
    assert r.status_code == 422 and "at most 2048 prompts" in r.json()["error"]["message"], r.text[:300]

    # /tokenize waits for its turn like generation, and leaves the queue when its client does
    with cf.ThreadPoolExecutor(3) as pool:
        blocker = pool.submit(server.post, "/v1/completions", json=slow_body(300), timeout=600)
        while not server.health()["busy"]:
            time.sleep(0.01)
        tokenized = pool.submit(server.post, "/tokenize", json={"prompt": "hello"}, timeout=600)
        leaving = pool.submit(leave, server, "/tokenize", {"prompt": "hello"}, 0.5)
        time.sleep(0.3)
        waiting = server.health()
        leaving.result()
        time.sleep(0.3)
        after = server.health()
        assert blocker.result().status_code == 200 and tokenized.result().status_code == 200
    assert waiting["busy"] and waiting["waiting"] == 2 and after["busy"] and after["waiting"] == 1, (waiting, after)


def test_tokenizing_in_pieces_gives_llama_cpps_own_tokens(server: Server) -> None:
    """/tokenize cuts a text full of special tokens into pieces; llama.cpp tokenizing it whole agrees."""
    import llama_cpp
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    llm = llama_cpp.Llama(str(server.gguf), vocab_only=True, verbose=False)
    specials = ["<|im_start|>", "<|im_end|>", "<s>", "<pad>"]
    near = [t[:k] for t in specials for k in range(1, len(t))] + [t + t[1:] for t in specials]  # parts, overlaps
    words = [" ", "\n", "  ", "a", "hello", " world", "é", "東京", "🚀"]
    bit = st.sampled_from(specials) | st.sampled_from(near + words) | st.text(max_size=4)
    texts = st.integers(0, 300).flatmap(lambda n: st.lists(bit, min_size=n, max_size=n)).map("".join)

    @settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
    @given(texts, st.booleans())
    def same(text: str, add_special: bool) -> None:
        r = server.post("/tokenize", json={"prompt": text, "add_special_tokens": add_special})
        assert r.status_code == 200, r.text[:300]
        assert r.json()["tokens"] == llm.tokenize(text.encode(), add_bos=add_special, special=True), text

    same()
    llm.close()
