"""`distill4all serve` over real HTTP on 127.0.0.1, driven by the official openai client and httpx."""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from distill4all.runtime.engine import load_engine
from runtime_models import CHATS, trained_export

KEY = "test-key-9f2c"


@dataclass
class Server:
    url: str
    gguf: Path
    proc: subprocess.Popen[str]

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0, timeout=60)

    def post(self, path: str, **kwargs: object) -> httpx.Response:
        headers = {"Authorization": f"Bearer {KEY}", **kwargs.pop("headers", {})}  # type: ignore[dict-item]
        return httpx.post(f"{self.url}{path}", headers=headers, timeout=60, **kwargs)  # type: ignore[arg-type]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    gguf = trained_export()
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "distill4all", "serve", str(gguf / "model-q8_0.gguf"), "--port", str(port),
             "--model-name", "tiny-chat", "--n-ctx", "256", "--max-queue", "32"],
            env={**os.environ, "DISTILL4ALL_API_KEY": KEY}, stdout=out, stderr=subprocess.STDOUT, text=True,
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
    yield Server(url, gguf / "model-q8_0.gguf", proc)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    assert KEY not in log.read_text()  # the key is never logged


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


def test_a_context_window_below_any_prompt_is_refused_before_loading() -> None:
    from conftest import run_cli

    for value in ("-5", "0", "15"):
        r = run_cli("serve", "tiny", "--n-ctx", value)
        assert r.code == 2 and "--n-ctx" in r.stderr, r.output
