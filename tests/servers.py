"""Stand-ins for the outside world of the collect stage, on 127.0.0.1:

- `StubTeacher`: an OpenAI-compatible chat endpoint that answers after a fixed delay (the
  benchmark's "remote API"), honouring max_tokens (finish_reason=length) and an API key or HTTP
  Basic credentials; and, as some real endpoints do, answering without `usage`, with `content`
  as a list of parts, with an HTTP 200 whose body is an error, with logprobs of any shape, or
  with errors that quote the credentials they were sent (see StubTeacher.handle);
- `FaultProxy`: sits in front of any teacher and injects the failures real APIs produce — 429 with
  Retry-After (or any headers), 500/503, answers slower than the client's timeout, dropped
  connections, malformed JSON — at a seeded rate, and counts what it did.

Both are tiny asyncio HTTP/1.1 servers (keep-alive, Content-Length bodies), written by hand
because the proxy must be able to drop a connection mid-request, which ASGI servers do not allow.
Run as a script to serve in a subprocess: `python tests/servers.py stub --port 8000 --delay 0.5`.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import random
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

Handler = Callable[[str, str, dict[str, str], bytes], Awaitable[tuple[int, dict[str, str], bytes] | None]]


async def _serve_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, handler: Handler) -> None:
    try:
        while True:
            line = await reader.readline()
            if not line:
                return
            method, path, _ = line.decode("latin-1").split(" ", 2)
            headers: dict[str, str] = {}
            while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                k, v = h.decode("latin-1").split(":", 1)
                headers[k.strip().lower()] = v.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            result = await handler(method, path, headers, body)
            if result is None:  # drop the connection without an answer
                writer.transport.abort()
                return
            status, out_headers, payload = result
            head = f"HTTP/1.1 {status} X\r\nContent-Length: {len(payload)}\r\n"
            head += "".join(f"{k}: {v}\r\n" for k, v in out_headers.items())
            writer.write(head.encode("latin-1") + b"\r\n" + payload)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError, ValueError):
        return
    finally:
        with contextlib.suppress(Exception):
            writer.close()


def _json(status: int, obj: Any, **headers: str) -> tuple[int, dict[str, str], bytes]:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(obj).encode()


# Prompts the stub answers with an HTTP 200 whose body is an error, as gateways pass on an upstream's
ERRORS_IN_200 = {
    "ERROR200-INVALID": {"error": {"message": "prompt is too long", "type": "invalid_request_error",
                                   "code": "context_length_exceeded"}},
    "ERROR200-TEXT": {"error": "the model is loading"},
    "ERROR200": {"error": {"message": "upstream overloaded", "code": 502}},
}  # fmt: skip


class StubTeacher:
    """Answers 'Answer to: <prompt>' after `delay` seconds; each word is one completion token.

    A request may ask for the shapes some endpoints answer in (the collect config's extra_body
    passes them): `stub_usage: false` leaves `usage` out, `stub_content: "parts"` gives `content`
    as a list of parts, `stub_reasoning` a reasoning model's answer ("field": reasoning_content
    beside the answer, "ollama": `reasoning`, "inline": `<think>…</think>` before it, "only": content
    null), `stub_logprobs` a logprobs entry per word (OpenAI's shape), its first token's fields
    replaced by the object given; a prompt starting with a key of ERRORS_IN_200 gets that body with
    HTTP 200.

    With `api_key` (a Bearer token) or `basic` (user, password) set, other credentials get a 401;
    with `echo` every error quotes the Authorization it was sent, as careless servers do, and a
    prompt starting with ECHO-400 or ECHO-500 gets that status.
    """

    def __init__(
        self,
        delay: float = 0.0,
        api_key: str | None = None,
        words: int = 40,
        basic: tuple[str, str] | None = None,
        echo: bool = False,
    ) -> None:
        self.delay, self.api_key, self.words, self.echo = delay, api_key, words, echo
        self.basic = "Basic " + base64.b64encode(":".join(basic).encode()).decode() if basic else None
        self.answered: Counter[str] = Counter()  # prompt → answers sent

    def _error(self, status: int, message: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
        if self.echo:
            message += f" (you sent {headers.get('authorization')!r})"
        return _json(status, {"error": {"message": message, "type": "invalid_request_error"}})

    async def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        expected = f"Bearer {self.api_key}" if self.api_key is not None else self.basic
        if expected is not None and headers.get("authorization") != expected:
            return self._error(401, "Incorrect API key provided", headers)
        if method == "GET" and path.endswith("/models"):
            return _json(200, {"object": "list", "data": [{"id": "stub", "object": "model"}]})
        if method == "GET" and path == "/_stats":
            return _json(200, {"answered": dict(self.answered)})
        try:
            req = json.loads(body)
            prompt = req["messages"][-1]["content"]
            max_tokens = int(req.get("max_tokens", 16))
        except (ValueError, KeyError, IndexError, TypeError):
            return _json(400, {"error": {"message": "bad request body", "type": "invalid_request_error"}})
        if prompt.startswith("REJECT"):
            return _json(400, {"error": {"message": "this prompt is rejected", "type": "invalid_request_error"}})
        if prompt.startswith(("ECHO-400", "ECHO-500")):
            return self._error(int(prompt[5:8]), "this prompt is rejected", headers)
        if error := next((body for start, body in ERRORS_IN_200.items() if prompt.startswith(start)), None):
            return _json(200, error)
        await asyncio.sleep(float(req.get("stub_delay", self.delay)))  # a test may ask for its own delay
        words = (f"Answer to: {prompt} " + "and more words " * self.words).split()[: self.words]
        finish = "length" if len(words) > max_tokens else "stop"
        text = " ".join(words[:max_tokens])
        self.answered[prompt] += 1
        usage = {"prompt_tokens": len(prompt.split()) + 8, "completion_tokens": min(len(words), max_tokens)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        content: str | list[dict[str, Any]] = text
        if req.get("stub_content") == "parts":  # the text in two parts, a part that is not text between
            head, _, tail = text.partition(" ")
            content = [{"type": "text", "text": head + " "}, {"type": "image_url", "image_url": {"url": "x"}},
                       {"type": "text", "text": tail}]  # fmt: skip
        message: dict[str, Any] = {"role": "assistant", "content": content}
        thinking = f"Thinking about {prompt}: first this, then that."
        shape = req.get("stub_reasoning")
        if shape == "field" or shape == "only":
            message |= {"reasoning_content": thinking} | ({"content": None} if shape == "only" else {})
        elif shape == "ollama":
            message["reasoning"] = thinking
        elif shape == "inline":
            message["content"] = f"<think>\n{thinking}\n</think>\n\n{text}"
        choice: dict[str, Any] = {"index": 0, "message": message, "finish_reason": finish}
        if (first := req.get("stub_logprobs")) is not None:
            tokens = [w if i == 0 else f" {w}" for i, w in enumerate(text.split(" "))]
            content = [{"token": t, "logprob": -0.5, "bytes": list(t.encode()), "top_logprobs": []} for t in tokens]
            content[0] |= first
            choice["logprobs"] = {"content": content}
        answer = {
            "id": f"chatcmpl-{time.monotonic_ns()}",
            "object": "chat.completion",
            "model": req.get("model", "stub"),
            "choices": [choice],
        }
        return _json(200, answer if req.get("stub_usage") is False else answer | {"usage": usage})


FAULTS = ("429", "500", "503", "slow", "drop", "malformed")


class FaultProxy:
    """Forwards to `upstream`, replacing a seeded share of requests with a failure."""

    def __init__(
        self,
        upstream: str,
        rate: float = 0.3,
        faults: tuple[str, ...] = FAULTS,
        seed: int = 0,
        slow_s: float = 3.0,
        script: list[str] | None = None,
        retry_after: dict[str, str] | None = None,
        answer_headers: dict[str, str] | None = None,
    ) -> None:
        self.upstream = upstream.rstrip("/")
        self.rate, self.faults, self.slow_s = rate, faults, slow_s
        self.retry_after = {"Retry-After": "1"} if retry_after is None else retry_after  # a 429's headers
        self.answer_headers = answer_headers or {}  # added to every answer passed on (x-ratelimit-*)
        self.script = list(script or [])  # faults for the first requests, in order ("ok" for none)
        self.arrivals: list[float] = []  # monotonic time of each POST
        self.rng = random.Random(seed)
        self.injected: Counter[str] = Counter()
        self.forwarded = 0
        self.client: httpx.AsyncClient | None = None

    async def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes] | None:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=600)
        fault = "ok"
        if method == "POST":
            self.arrivals.append(time.monotonic())
            if self.script:
                fault = self.script.pop(0)
            elif self.rng.random() < self.rate:
                fault = self.rng.choice(self.faults)
        if fault != "ok":
            self.injected[fault] += 1
            if fault == "429":
                return _json(429, {"error": {"message": "Rate limit reached", "type": "requests"}}, **self.retry_after)
            if fault in ("500", "503"):
                return _json(int(fault), {"error": {"message": "The server had an error", "type": "server_error"}})
            if fault == "drop":
                return None
            if fault == "malformed":
                return 200, {"Content-Type": "application/json"}, b'{"choices": [{"message": '
            if fault == "slow":
                await asyncio.sleep(self.slow_s)  # longer than the client's timeout: it gives up
        keep = {k: v for k, v in headers.items() if k in ("authorization", "content-type")}
        r = await self.client.request(method, self.upstream + path, headers=keep, content=body)
        self.forwarded += 1
        out = {"Content-Type": r.headers.get("content-type", "application/json")} | self.answer_headers
        return r.status_code, out, r.content


class Background:
    """Run a handler's server on 127.0.0.1 in a thread with its own event loop."""

    def __init__(self, handler: Handler, port: int = 0) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(lambda r, w: _serve_conn(r, w, handler), "127.0.0.1", port, backlog=1024)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.server.close()
        for task in asyncio.all_tasks(self.loop):
            task.cancel()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()


def start_stub_process(delay: float = 0.0, words: int = 40) -> tuple[subprocess.Popen[bytes], str]:
    """A StubTeacher in its own process (its own core); returns the process and its /v1 URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, __file__, "stub", "--port", str(port), "--delay", str(delay), "--words", str(words)]
    p = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(200):
        try:
            httpx.get(f"{url}/models", timeout=1)
            return p, url
        except httpx.HTTPError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError("the stub teacher did not start")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=["stub"])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--delay", type=float, default=0.0)
    ap.add_argument("--words", type=int, default=40)
    args = ap.parse_args()
    stub = StubTeacher(delay=args.delay, words=args.words)

    async def run() -> None:
        server = await asyncio.start_server(
            lambda r, w: _serve_conn(r, w, stub.handle), "127.0.0.1", args.port, backlog=4096
        )
        async with server:
            await server.serve_forever()

    asyncio.run(run())


if __name__ == "__main__":
    main()
