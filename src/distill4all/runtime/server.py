"""An OpenAI-compatible HTTP server over one engine: `distill4all serve MODEL`.

Endpoints: GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions and
POST /v1/completions (with `logprobs` and `echo`, so lm-evaluation-harness can score through it),
both with SSE streaming. Chat `top_logprobs` goes up to MAX_TOP_LOGPROBS (128), past OpenAI's 20,
for collecting a teacher's distribution. Errors have OpenAI's body, {"error": {message, type, param, code}}, and
status: 400 bad request or prompt too long for the context, 401 bad API key, 404 unknown model or
route, 408 body slower than the read timeout, 413 body too large, 422 wrong field types or values,
431 headers too large, 503 queue full. A streamed answer that fails after its first event ends with
an `{"error": …}` event and `[DONE]`, as OpenAI's stream does.

One engine serves every request: requests take turns on an asyncio lock (generation runs in a
worker thread, so the event loop stays free to accept, validate and reject). A request holds a
`Ticket` from the moment it is admitted until it holds the engine, so at most `max_queue` requests
wait, streaming or not; more get 503 at once rather than hanging. Everything a request makes the
engine do happens in its turn — building its grammar, tokenizing, generating, scoring — so one
request's work never runs beside another's. A request whose client has gone stops: a stream when
its next event cannot be sent, any other request at its next generated piece, scored batch or
tokenized piece (or while it waits for its turn).

What one request may ask for is bounded (MAX_MESSAGES, MAX_PROMPTS, MAX_LOGPROBS, the schema
limits in structured.py), so no single body holds the engine or memory out of proportion to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal, TypeVar

import anyio
import h11
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from uvicorn.protocols.http.h11_impl import H11Protocol

from distill4all import __version__
from distill4all.errors import ContextLengthError, UserError
from distill4all.records import lone_surrogate
from distill4all.runtime.engine import (
    Completion,
    Engine,
    Message,
    Progress,
    SamplingParams,
    TextStream,
    TokenLogprob,
    log_softmax,
)
from distill4all.runtime.structured import (
    Function,
    StructureError,
    history_text,
    json_object_grammar,
    read_call,
    schema_grammar,
    tools_grammar,
    tools_prompt,
)

MAX_BODY_BYTES = 4 * 1024 * 1024
MAX_TOP_LOGPROBS = 128  # chat's top_logprobs: OpenAI caps it at 20; distilling a teacher wants more
DRAIN_BYTES = 64 * 1024 * 1024
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_MESSAGES = 2048  # messages in one chat (OpenAI's limit): each costs template and tokenizer time
MAX_PROMPTS = 2048  # prompts in one completion request
MAX_LOGPROBS = 2**20  # logprobs one response may list, alternatives included (each is a few hundred bytes held)
SCORE_ROWS = 64  # log-softmax rows computed at once when scoring: [64, vocab] floats, not [len, vocab]
READ_TIMEOUT = 30.0  # seconds the body may stall between two chunks
API_KEY_ENV = "DISTILL4ALL_API_KEY"

log = logging.getLogger("distill4all.serve")


# --- errors ------------------------------------------------------------------------------------


class APIError(Exception):
    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _internal_error(exc: BaseException) -> APIError:
    """What a client sees of a bug: its kind only; the traceback goes to the server's log."""
    log.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}", type_="server_error")


class ClientGone(Exception):
    """The client closed its connection before its answer was ready."""


# --- request bodies ----------------------------------------------------------------------------


class _Body(BaseModel):
    # Inside a request, fields that change nothing are let through: clients send earlier answers
    # back as they got them (refusal, annotations, audio: null …).
    model_config = ConfigDict(extra="ignore")


# Top-level fields accepted without effect: bookkeeping for OpenAI's platform, or (parallel
# tool calls) a permission this server never needs, as it makes one call at most.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                       "safety_identifier"})  # fmt: skip


class _Request(_Body):
    """A request body. Any other parameter is refused by name rather than silently ignored, so a
    client never takes a normal-looking answer for the one it asked for."""

    model_config = ConfigDict(extra="allow")

    def refuse_unknown(self) -> None:
        for name, value in (self.model_extra or {}).items():
            if value is not None and name not in NO_EFFECT:
                raise APIError(400, f"the parameter {name!r} is not supported by this server", param=name,
                               code="unsupported_parameter")  # fmt: skip


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class CalledFunction(_Body):
    name: str
    arguments: str


class ToolCall(_Body):
    id: str | None = None
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn that called tools
    tool_call_id: str | None = None  # a tool's answer

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class JsonSchemaFormat(_Body):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(None, alias="schema")
    strict: bool | None = None  # the schema is always followed exactly (a grammar)


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionSpec(_Body):
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str = ""
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # the parameters are always followed exactly (a grammar)


class Tool(_Body):
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(_Body):
    include_usage: bool = False


Stop = str | list[str] | None


class _Sampling(_Request):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0, le=2**31 - 1)  # extension, as llama.cpp's server and vLLM accept
    min_p: float = Field(0.0, ge=0.0, le=1.0)  # extension
    repeat_penalty: float = Field(1.0, ge=0.01, le=100.0)  # extension; beyond, logits overflow
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    n: StrictInt = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Stop = None
    seed: StrictInt | None = Field(None, ge=-(2**63), le=2**63 - 1)  # OpenAI's: a 64-bit integer
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None  # token id → bias

    @field_validator("stop", mode="before")
    @classmethod
    def _few_stops(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(value)}")
        return value

    def sampling(self, max_tokens: int, choice: int, vocab_size: int) -> SamplingParams:
        if self.frequency_penalty or self.presence_penalty:
            raise APIError(400, "frequency_penalty and presence_penalty are not supported; use repeat_penalty",
                           param="frequency_penalty", code="unsupported_parameter")  # fmt: skip
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) <= 12 and int(key) < vocab_size):
                raise APIError(400, f"logit_bias: {key[:20]!r} is not a token id of this model (0..{vocab_size - 1})",
                               param="logit_bias")  # fmt: skip
            bias[int(key)] = value
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repeat_penalty=self.repeat_penalty,
            seed=None if self.seed is None else (self.seed + choice) % 2**32,  # the engines' seeds are 32-bit
            stop=stop,
            logit_bias=bias,
        )


def _at_most(value: Any, limit: int, what: str) -> Any:
    if isinstance(value, list) and len(value) > limit:
        raise ValueError(f"at most {limit} {what} are allowed in one request, got {len(value)}")
    return value


class ChatRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _few_messages(cls, value: Any) -> Any:
        return _at_most(value, MAX_MESSAGES, "messages")


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: StrictInt = Field(16, ge=0)  # OpenAI's default; 0 with echo scores the prompt only
    logprobs: StrictInt | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: StrictInt | None = Field(None, ge=1)

    @field_validator("prompt", mode="before")
    @classmethod
    def _few_prompts(cls, value: Any) -> Any:
        if isinstance(value, list) and not all(isinstance(x, int) for x in value):  # a flat list is one prompt
            return _at_most(value, MAX_PROMPTS, "prompts")
        return value


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)  # tokenized as the chat template renders them
    add_special_tokens: bool = True  # for `prompt`: BOS where the model adds one

    @field_validator("messages", mode="before")
    @classmethod
    def _few_messages(cls, value: Any) -> Any:
        return _at_most(value, MAX_MESSAGES, "messages")


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


# --- state -------------------------------------------------------------------------------------


@dataclass
class ServerState:
    engine: Engine
    model_id: str
    api_key: str | None = None
    max_queue: int = 64
    read_timeout: float = READ_TIMEOUT
    created: int = field(default_factory=lambda: int(time.time()))
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting: int = 0  # admitted requests that do not hold the engine yet

    def admit(self) -> Ticket:
        """A place in the queue, or a 503 at once when it is full (before anything is streamed)."""
        if self.waiting >= self.max_queue:
            raise APIError(503, f"the server is busy ({self.waiting} requests waiting); retry later",
                           type_="server_error", code="server_busy")  # fmt: skip
        self.waiting += 1
        return Ticket(self)


class Ticket:
    """A request's place in the queue: counted from admission until it holds the engine or gives
    up, whichever comes first (`leave` is idempotent, so every exit path may call it)."""

    def __init__(self, state: ServerState) -> None:
        self.state, self.queued = state, True

    def leave(self) -> None:
        if self.queued:
            self.queued = False
            self.state.waiting -= 1

    async def take(self) -> Turn:
        """Wait for the engine; the one place requests are serialized."""
        try:
            await self.state.lock.acquire()
        finally:
            self.leave()
        return Turn(self.state.lock)


class Turn:
    """The engine, held by one request until `release` (idempotent: every exit path may call it).
    A stream takes it before its response begins, so a prompt too long is still a 400, and its
    response releases it."""

    def __init__(self, lock: asyncio.Lock) -> None:
        self.lock, self.held = lock, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.lock.release()


T = TypeVar("T")


async def _in_thread(fn: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(fn)


# --- helpers -----------------------------------------------------------------------------------


async def _body(request: Request, read_timeout: float) -> bytes:
    # An oversized body is still read (and dropped) up to DRAIN_BYTES: a server that answers
    # before the client has finished sending makes most clients see a reset, not the 413.
    too_large = APIError(413, f"request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise too_large
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:  # a body that stalls (one shorter than its Content-Length) must not hold a connection forever
            chunk = await asyncio.wait_for(anext(stream), read_timeout)
        except StopAsyncIteration:
            break
        except TimeoutError:
            raise APIError(408, f"the request body stalled for {read_timeout:g} s before its end",
                           code="request_timeout") from None  # fmt: skip
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            chunks.append(chunk)
        elif size > DRAIN_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise too_large
    return b"".join(chunks)


async def _read_json(state: ServerState, request: Request, model: type[T]) -> T:
    body = await _body(request, state.read_timeout)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:  # arrays or objects nested thousands deep
        raise APIError(400, "the request body nests too deep", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    # "\ud800" is valid JSON but not text, which nothing can tokenize; only an escape can write one
    if (b"\\ud" in body or b"\\uD" in body) and (bad := lone_surrogate(data)):
        message = f"the request holds a lone surrogate \\u{ord(bad):04x}, which is not text"
        raise APIError(400, message, code="invalid_json")
    try:
        parsed = model.model_validate(data)  # type: ignore[attr-defined]
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        raise APIError(422, f"{param}: {first['msg']}{more}", param=param, code="invalid_value") from None
    if isinstance(parsed, _Request):
        parsed.refuse_unknown()
    return parsed  # type: ignore[no-any-return]


def _authorize(state: ServerState, request: Request) -> None:
    if not state.api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        why = "Incorrect API key provided" if given else "Missing API key (Authorization: Bearer …)"
        raise APIError(401, why, code="invalid_api_key")


def _check_model(state: ServerState, name: str) -> None:
    if name != state.model_id:
        raise APIError(404, f"The model '{name}' does not exist; this server has '{state.model_id}'",
                       param="model", code="model_not_found")  # fmt: skip


def _context_error(e: ContextLengthError, param: str) -> APIError:
    return APIError(400, str(e), param=param, code="context_length_exceeded")


def score_tokens(engine: Engine, context: list[int], targets: list[int], top: int,
                 gone: threading.Event | None = None) -> list[TokenLogprob]:  # fmt: skip
    """Logprob of each target token after context + the targets before it, with the `top` best:
    the engine's logits a batch at a time, SCORE_ROWS rows of them normalized at once, and
    ClientGone between those once `gone` is set."""
    if not targets:
        return []
    if not context:
        raise APIError(400, "cannot score the first token of a text with no context", param="prompt")
    first = len(context) - 1  # the row that predicts targets[0]
    out: list[TokenLogprob] = []
    at = 0  # the position of the batch's first row
    for batch in engine.logit_batches([*context, *targets[:-1]]):
        for lo in range(max(first - at, 0), len(batch), SCORE_ROWS):
            if gone is not None and gone.is_set():
                raise ClientGone
            for k, row in enumerate(log_softmax(batch[lo : lo + SCORE_ROWS])):
                out.append(TokenLogprob.of(row, targets[at + lo + k - first], top))
        at += len(batch)
    return out


def _progress(engine: Engine, gone: threading.Event, limit: int | None) -> Progress:
    """For tokenizing a prompt: stop once the client is gone, or once the prompt is known to have
    `limit` tokens or more (before all of a long text is tokenized)."""

    def progress(n: int) -> None:
        if gone.is_set():
            raise ClientGone
        if limit is not None and n >= limit:
            raise ContextLengthError(f"the prompt has at least {n} tokens but {engine.name}'s context holds "
                                     f"{engine.n_ctx} (prompt and answer together); shorten the prompt")  # fmt: skip

    return progress


def _check_logprobs(listed: int, top: int, param: str) -> None:
    """At most MAX_LOGPROBS in one response: `listed` tokens with `top` alternatives each."""
    if listed * (1 + top) > MAX_LOGPROBS:
        raise APIError(400, f"this request could list {listed} tokens' logprobs with {top} alternatives each, "
                       f"more than the {MAX_LOGPROBS} one response may hold; ask for fewer (n, max_tokens, "
                       "prompts) or fewer alternatives", param=param, code="too_many_logprobs")  # fmt: skip


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -9999.0  # JSON has no -inf


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# --- chat --------------------------------------------------------------------------------------


def _turns(messages: list[ChatMessage]) -> list[Message]:
    """Messages for the chat template: developer turns as system ones, earlier tool calls written as
    the model is asked to write them."""
    out: list[Message] = []
    for i, m in enumerate(messages):
        text = m.text()
        if m.tool_calls:
            calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in m.tool_calls]
            try:
                text = "\n".join(t for t in (text, history_text(calls)) if t)
            except StructureError as e:
                param = f"messages.{i}.tool_calls.{e.param}.function.arguments"
                raise APIError(400, f"{param}: {e}", param=param) from None
        out.append({"role": "system" if m.role == "developer" else m.role, "content": text})
    return out


def _chat_messages(req: ChatRequest, functions: list[Function]) -> list[Message]:
    """The conversation, with the functions the model may call told in its system turn."""
    out = _turns(req.messages)
    if functions:
        told = tools_prompt(functions, required=req.tool_choice not in (None, "auto"))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{told}"}
        else:
            out.insert(0, {"role": "system", "content": told})
    return out


def _functions(req: ChatRequest, engine: Engine) -> list[Function]:
    """The functions the answer may call, after the checks that need no grammar built yet (so a
    request they refuse never waits in the queue)."""
    fmt = req.response_format
    structured = fmt is not None and fmt.type != "text"
    if fmt is not None and fmt.type == "json_schema" and (fmt.json_schema is None or fmt.json_schema.schema_ is None):
        raise APIError(400, "response_format json_schema needs json_schema.schema", param="response_format")
    functions: list[Function] = []
    param, choice = "response_format", req.tool_choice
    if req.tools and choice != "none":
        param = "tools"
        if structured:
            raise APIError(400, "response_format and tools cannot be combined", param="response_format",
                           code="unsupported_parameter")  # fmt: skip
        functions = [Function(t.function.name, t.function.description, t.function.parameters or
                              {"type": "object", "properties": {}}, f"tools.{i}.function.parameters")
                     for i, t in enumerate(req.tools)]  # fmt: skip
        if isinstance(choice, NamedToolChoice):
            functions = [f for f in functions if f.name == choice.function.name]
            if not functions:
                raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among tools",
                               param="tool_choice")  # fmt: skip
    elif choice not in (None, "none", "auto"):
        raise APIError(400, "tool_choice asks for a tool call but no tools are given", param="tool_choice")
    if (structured or functions) and not engine.grammars:
        raise APIError(400, f"{param} needs an answer that follows a grammar, which the {engine.backend} engine "
                       "cannot give; serve a GGUF (llama.cpp)", param=param, code="unsupported_parameter")  # fmt: skip
    if functions and req.stream:
        raise APIError(400, "tools cannot be streamed yet; ask without stream", param="stream",
                       code="unsupported_parameter")  # fmt: skip
    return functions


def _grammar(req: ChatRequest, engine: Engine, functions: list[Function]) -> str | None:
    """The grammar the answer follows (response_format or tools), parsed by the engine before any
    sampler sees it; a 400 naming the field where it cannot be."""
    fmt, required = req.response_format, req.tool_choice not in (None, "auto")
    try:
        if functions:
            grammar = tools_grammar(functions, required=required)
        elif fmt is not None and fmt.type == "json_object":
            grammar = json_object_grammar()
        elif fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None  # _functions checked
            grammar = schema_grammar(fmt.json_schema.schema_, "response_format.json_schema.schema")
        else:
            return None
    except StructureError as e:
        raise APIError(400, str(e), param=e.param or ("tools" if functions else "response_format")) from None
    try:
        engine.check_grammar(grammar)
    except StructureError as e:
        param = functions[0].where if len(functions) == 1 else "tools" if functions else "response_format"
        if fmt is not None and fmt.type == "json_schema":
            param = "response_format.json_schema.schema"
        for f in functions if len(functions) > 1 else []:  # which function's parameters it is
            try:
                engine.check_grammar(tools_grammar([f], required=True))
            except StructureError:
                param = f.where
                break
        raise APIError(400, f"{param} cannot be followed: {e}", param=param) from None
    return grammar


def _chat_message(c: Completion, functions: list[Function]) -> tuple[dict[str, Any], str]:
    """The answer's message and finish reason: a tool call where the answer is one."""
    call = read_call(c.text.strip(), functions) if functions else None
    if call is not None:
        return {"role": "assistant", "content": None, "tool_calls": [call]}, "tool_calls"
    return {"role": "assistant", "content": c.text}, c.finish_reason


def _chat_logprobs(engine: Engine, prompt: list[int], c: Completion, top: int, gone: threading.Event,
                   ) -> dict[str, Any]:  # fmt: skip
    """OpenAI's shape: per generated token its text, logprob and exact bytes (a token may hold
    part of a character, whose text is then U+FFFD), and the `top` most likely in its place."""

    def entry(token: int, logprob: float) -> dict[str, Any]:
        return {
            "token": engine.token_text(token),
            "logprob": _finite(logprob),
            "bytes": list(engine.token_bytes(token)),
        }

    # kept while sampling where the engine can (no second pass), else scored afterwards
    scored = c.logprobs if c.logprobs is not None else score_tokens(engine, prompt, c.token_ids, top, gone)
    content = [{**entry(t.token, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top]} for t in scored]
    return {"content": content}


async def chat_completions(state: ServerState, request: Request) -> Any:
    req = await _read_json(state, request, ChatRequest)
    _check_model(state, req.model)
    ticket = state.admit()
    try:
        return await _chat(state, ticket, request, req)
    except BaseException:
        ticket.leave()  # a streamed answer's response owns the ticket; any other exit gives it up
        raise


async def _chat(state: ServerState, ticket: Ticket, request: Request, req: ChatRequest) -> Any:
    engine = state.engine
    max_tokens = req.max_completion_tokens or req.max_tokens or engine.n_ctx
    if req.stream and req.logprobs:
        raise APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    functions = _functions(req, engine)
    sampling = [req.sampling(max_tokens, i, engine.vocab_size) for i in range(req.n)]

    def prepare(gone: threading.Event) -> tuple[list[int], list[SamplingParams]]:
        """In the request's turn: the grammar, the prompt's tokens (given up on once they are
        known not to fit), and each choice's sampling."""
        grammar = _grammar(req, engine, functions)
        messages = _chat_messages(req, functions)
        try:
            prompt = engine.chat_ids(messages, progress=_progress(engine, gone, engine.n_ctx))
            engine.check_fits(len(prompt))
        except ContextLengthError as e:
            raise _context_error(e, "messages") from None
        except UserError as e:  # the chat template rejected the conversation
            raise APIError(400, str(e), param="messages") from None
        if req.logprobs:
            _check_logprobs(req.n * min(max_tokens, engine.n_ctx - len(prompt)), req.top_logprobs or 0, "top_logprobs")
        params = [dataclasses.replace(p, grammar=grammar) for p in sampling]
        if req.logprobs:
            params = [dataclasses.replace(p, logprobs=req.top_logprobs or 0) for p in params]
        return prompt, params

    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.model_id, "system_fingerprint": f"distill4all-{__version__}"}

    if req.stream:
        (prompt, params), turn = await _in_turn(request, ticket, prepare)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_response(turn, _chat_chunks(state, head, prompt, params, include_usage))

    def run(gone: threading.Event) -> dict[str, Any]:
        prompt, params = prepare(gone)
        choices, used = [], 0
        for i, p in enumerate(params):
            c = _collect(engine.stream_ids(prompt, p), gone)
            used += c.completion_tokens
            logprobs = _chat_logprobs(engine, prompt, c, req.top_logprobs or 0, gone) if req.logprobs else None
            message, finish = _chat_message(c, functions)
            choices.append({"index": i, "message": message, "logprobs": logprobs, "finish_reason": finish})
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), used)}

    return await _answer(request, ticket, run)


def _collect(stream: TextStream, gone: threading.Event) -> Completion:
    """Generate to the end, or stop at the next piece once the client is gone."""
    try:
        if gone.is_set():
            raise ClientGone
        for _ in stream:
            if gone.is_set():
                raise ClientGone
    finally:
        stream.close()
    assert stream.completion is not None
    return stream.completion


async def _disconnected(request: Request) -> None:
    """Return when the client closes its connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.05)  # a pipelined request's data: not ours to read


async def _in_turn(request: Request, ticket: Ticket, run: Callable[[threading.Event], T]) -> tuple[T, Turn]:
    """`run(gone)` on the engine in this request's turn, which it still holds after (the caller
    releases it). If the client leaves first, a request still waiting leaves the queue, and one
    running gets `gone` set and stops at its next check (its thread is never abandoned: the
    engine is not free until it returns); then the turn is released and ClientGone raised."""
    gone = threading.Event()
    started = False

    async def work() -> tuple[T, Turn]:
        nonlocal started
        turn = await ticket.take()
        try:
            if gone.is_set():
                raise ClientGone
            started = True
            return await _in_thread(lambda: run(gone)), turn
        except BaseException:
            turn.release()
            raise

    working = asyncio.ensure_future(work())
    watching = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({working, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not working.done():
            gone.set()
            if not started:
                working.cancel()
    if working.done() and not working.cancelled():
        return working.result()
    await asyncio.wait({working})
    if not working.cancelled() and working.exception() is None:
        working.result()[1].release()  # it finished after its client left: no one needs the engine held
    raise ClientGone


async def _answer(request: Request, ticket: Ticket, run: Callable[[threading.Event], dict[str, Any]]) -> Response:
    """`run(gone)` in this request's turn (see _in_turn), the engine free again after; its JSON is
    written in a worker thread too (a response listing 10^6 logprobs takes seconds to encode, which
    on the event loop would stall every other connection)."""
    result, turn = await _in_turn(request, ticket, run)
    turn.release()
    body = await _in_thread(lambda: json.dumps(result, ensure_ascii=False, allow_nan=False, separators=(",", ":")))
    return Response(body.encode("utf-8"), media_type="application/json")


def _chat_chunks(
    state: ServerState, head: dict[str, Any], prompt: list[int], params: list[SamplingParams], include_usage: bool
) -> Iterator[str]:
    """The SSE events of a streamed chat answer; each next() runs in a worker thread."""
    chunk = {**head, "object": "chat.completion.chunk"}

    def event(i: int, delta: dict[str, str], finish: str | None) -> str:
        return _sse({**chunk, "choices": [{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}]})

    used = 0
    for i, p in enumerate(params):
        yield event(i, {"role": "assistant", "content": ""}, None)
        stream = state.engine.stream_ids(prompt, p)
        try:
            for piece in stream:
                yield event(i, {"content": piece}, None)
        finally:
            stream.close()
        assert stream.completion is not None
        used += stream.completion.completion_tokens
        yield event(i, {}, stream.completion.finish_reason)
    if include_usage:
        yield _sse({**chunk, "choices": [], "usage": _usage(len(prompt), used)})
    yield "data: [DONE]\n\n"


class _EngineStream(StreamingResponse):
    """A streaming response that always closes its body and releases the engine, whatever ends it.

    When a client goes away mid-stream, Starlette may leave the body generator suspended at a
    `yield`, holding the engine until garbage collection; closing it here (shielded from the
    cancellation) stops the generation and hands the engine to the next request at once. A
    client gone before the body starts never runs it, so the turn is released here too."""

    def __init__(self, turn: Turn, body: AsyncIterator[str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.turn = turn

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.turn.release()


def _stream_response(turn: Turn, events: Iterator[str]) -> StreamingResponse:
    """SSE from `events` in the turn the request holds, released after the last event. A failure
    after the response has begun cannot change its status, so it becomes an error event and `[DONE]`."""

    async def body() -> AsyncIterator[str]:
        try:
            while (event := await _in_thread(lambda: next(events, None))) is not None:
                yield event
        except Exception as e:
            yield _sse((e if isinstance(e, APIError) else _internal_error(e)).body())
            yield "data: [DONE]\n\n"
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()  # quick: it only unwinds the generators
            turn.release()

    return _EngineStream(turn, body())


# --- completions -------------------------------------------------------------------------------


def _prompts(engine: Engine, req: CompletionRequest, gone: threading.Event) -> list[tuple[str, list[int]]]:
    """(text, token ids) per prompt; text prompts get the model's BOS as llama.cpp and vLLM do,
    token prompts are taken as they are (after a range check: llama.cpp must never see a bad id).
    A text is given up on once it is known not to fit (max_tokens 0 scores one token more)."""
    limit = engine.n_ctx + (0 if req.max_tokens > 0 else 1)
    p = req.prompt
    try:
        if isinstance(p, str):
            return [(p, engine.tokenize(p, progress=_progress(engine, gone, limit)))]
        if all(isinstance(x, str) for x in p):
            return [(str(x), engine.tokenize(str(x), progress=_progress(engine, gone, limit))) for x in p]
    except ContextLengthError as e:
        raise _context_error(e, "prompt") from None
    return [(engine.detokenize(ids), ids) for ids in _id_prompts(engine, req)]


def _id_prompts(engine: Engine, req: CompletionRequest) -> list[list[int]]:
    """The token-id prompts, checked (none for text prompts)."""
    p = req.prompt
    if isinstance(p, str) or not all(isinstance(x, list | int) for x in p) or any(isinstance(x, str) for x in p):
        return []
    flat = all(isinstance(x, int) for x in p)
    lists: list[list[int]] = [[int(x) for x in p]] if flat else [list(x) for x in p]  # type: ignore[arg-type]
    for ids in lists:
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        _check_ids(engine, ids, "prompt")
    return lists


def _check_ids(engine: Engine, ids: list[int], param: str) -> None:
    bad = [t for t in ids if not 0 <= t < engine.vocab_size]
    if bad:
        raise APIError(400, f"token id {bad[0]} is outside the vocabulary (0..{engine.vocab_size - 1})", param=param)


Scored = tuple[list[str], list[float | None], list[dict[str, float] | None]]  # tokens, logprobs, top logprobs


def _scored(engine: Engine, context: list[int], targets: list[int], top: int, gone: threading.Event) -> Scored:
    texts, lps, tops = [], [], []
    for t in score_tokens(engine, context, targets, top, gone):
        texts.append(engine.token_text(t.token))
        lps.append(_finite(t.logprob))
        tops.append({engine.token_text(i): _finite(lp) for i, lp in t.top})
    return texts, lps, tops  # type: ignore[return-value]


def _completion_logprobs(engine: Engine, prompt: list[int], c: Completion | None, echoed: Scored | None,
                         top: int, gone: threading.Event) -> dict[str, Any]:  # fmt: skip
    """The choice's logprobs: the prompt's (`echoed`, scored once for all its choices) and the
    generated tokens'."""
    generated = c.token_ids if c is not None else []
    if c is not None and c.stop_token is not None:
        # The end-of-text token the model chose is listed (its text is not in the answer), as
        # OpenAI does: scorers such as lm-eval drop the last entry as the generated one.
        generated = [*generated, c.stop_token]
    texts, lps, tops = _scored(engine, prompt, generated, top, gone)
    if echoed is not None:
        texts, lps, tops = echoed[0] + texts, echoed[1] + lps, echoed[2] + tops
    offsets = [0]
    for s in texts[:-1]:
        offsets.append(offsets[-1] + len(s))
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets[: len(texts)]}


async def completions(state: ServerState, request: Request) -> Any:
    req = await _read_json(state, request, CompletionRequest)
    _check_model(state, req.model)
    ticket = state.admit()
    try:
        return await _complete(state, ticket, request, req)
    except BaseException:
        ticket.leave()
        raise


async def _complete(state: ServerState, ticket: Ticket, request: Request, req: CompletionRequest) -> Any:
    if req.suffix:
        raise APIError(400, "suffix (insertion) is not supported", param="suffix", code="unsupported_parameter")
    if req.best_of not in (None, req.n):
        raise APIError(400, "best_of other than n is not supported", param="best_of", code="unsupported_parameter")
    if req.stream and req.logprobs is not None:
        raise APIError(400, "logprobs are not available when streaming; ask without stream", param="logprobs")
    if not req.prompt:
        raise APIError(400, "prompt must not be empty", param="prompt")
    engine = state.engine
    _id_prompts(engine, req)  # checked before the queue: a bad id never waits for its 400
    params = [req.sampling(req.max_tokens, i, engine.vocab_size) for i in range(req.n)]
    top = req.logprobs or 0

    def prepare(gone: threading.Event) -> list[tuple[str, list[int]]]:
        prompts = _prompts(engine, req, gone)
        for _, ids in prompts:
            if not ids:
                raise APIError(400, "prompt must not be empty", param="prompt")
            try:
                engine.check_fits(len(ids) if req.max_tokens > 0 else len(ids) - 1)
            except ContextLengthError as e:
                raise _context_error(e, "prompt") from None
        if req.logprobs is not None:
            room = [min(req.max_tokens, engine.n_ctx - len(ids)) + 1 if req.max_tokens > 0 else 0 for _, ids in prompts]
            listed = req.n * sum((len(ids) if req.echo else 0) + r for (_, ids), r in zip(prompts, room, strict=True))
            _check_logprobs(listed, top, "logprobs")
        return prompts

    rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": state.model_id, "system_fingerprint": f"distill4all-{__version__}"}

    if req.stream:
        prompts, turn = await _in_turn(request, ticket, prepare)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _stream_response(turn, _completion_chunks(state, head, prompts, params, req.echo, include_usage))

    def run(gone: threading.Event) -> dict[str, Any]:
        prompts = prepare(gone)
        choices: list[dict[str, Any]] = []
        used = 0
        for text, ids in prompts:
            # Scored once per prompt, not once per choice: the prompt's logprobs, and with nothing
            # generated, a choice's whole logprobs (all n alike).
            echoed = _scored(engine, ids[:1], ids[1:], top, gone) if req.echo and req.logprobs is not None else None
            if echoed is not None:
                echoed = ([engine.token_text(ids[0])] + echoed[0], [None, *echoed[1]], [None, *echoed[2]])
            alike: dict[str, Any] | None = None
            for p in params:
                c = _collect(engine.stream_ids(ids, p), gone) if req.max_tokens > 0 else None
                used += c.completion_tokens if c else 0
                logprobs = None
                if req.logprobs is not None:
                    if c is None:
                        alike = alike or _completion_logprobs(engine, ids, None, echoed, top, gone)
                    logprobs = alike or _completion_logprobs(engine, ids, c, echoed, top, gone)
                out = (text if req.echo else "") + (c.text if c else "")
                choices.append({"index": len(choices), "text": out, "logprobs": logprobs,
                                "finish_reason": c.finish_reason if c else "length"})  # fmt: skip
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(prompt_tokens, used)}

    return await _answer(request, ticket, run)


# --- tokenizer (vLLM's endpoints, which lm-eval's remote tokenizer reads) --------------------------


async def tokenize(state: ServerState, request: Request) -> Response:
    req = await _read_json(state, request, TokenizeRequest)
    if req.model is not None:
        _check_model(state, req.model)
    if (req.prompt is None) == (req.messages is None):
        raise APIError(400, "give either prompt or messages", param="prompt")
    engine = state.engine

    def run(gone: threading.Event) -> dict[str, Any]:
        """In the request's turn, like generation: tokenizing 4 MiB of text takes a while."""
        progress = _progress(engine, gone, None)
        try:
            if req.messages is not None:
                ids = engine.chat_ids(_turns(req.messages), progress=progress)
            else:
                ids = engine.tokenize(req.prompt or "", add_special=req.add_special_tokens, progress=progress)
        except UserError as e:  # the chat template rejected the conversation
            raise APIError(400, str(e), param="messages") from None
        return {"tokens": ids, "count": len(ids), "max_model_len": engine.n_ctx}

    ticket = state.admit()
    try:
        return await _answer(request, ticket, run)
    except BaseException:
        ticket.leave()
        raise


async def detokenize(state: ServerState, request: Request) -> Response:
    req = await _read_json(state, request, DetokenizeRequest)
    if req.model is not None:
        _check_model(state, req.model)
    _check_ids(state.engine, req.tokens, "tokens")
    ticket = state.admit()
    try:
        return await _answer(request, ticket, lambda gone: {"prompt": state.engine.detokenize(req.tokens)})
    except BaseException:
        ticket.leave()
        raise


def tokenizer_info(engine: Engine) -> dict[str, Any]:
    return {
        "tokenizer_class": engine.backend,
        "bos_token": engine.special_token("bos"),
        "eos_token": engine.special_token("eos"),
        "pad_token": engine.special_token("pad"),
        "add_bos_token": engine.adds_bos,
        "chat_template": engine.chat_template,
        "model_max_length": engine.n_ctx,
        "vocab_size": engine.vocab_size,
    }


def _completion_chunks(state: ServerState, head: dict[str, Any], prompts: list[tuple[str, list[int]]],
                       params: list[SamplingParams], echo: bool, include_usage: bool) -> Iterator[str]:  # fmt: skip
    chunk = {**head, "object": "text_completion"}

    def event(i: int, text: str, finish: str | None) -> str:
        return _sse({**chunk, "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}]})

    used, index = 0, 0
    for text, ids in prompts:
        for p in params:
            if echo:
                yield event(index, text, None)
            finish = "length"
            if p.max_tokens > 0:
                stream = state.engine.stream_ids(ids, p)
                try:
                    for piece in stream:
                        yield event(index, piece, None)
                finally:
                    stream.close()
                assert stream.completion is not None
                used += stream.completion.completion_tokens
                finish = stream.completion.finish_reason
            yield event(index, "", finish)
            index += 1
    if include_usage:
        prompt_tokens = sum(len(ids) for _, ids in prompts)
        yield _sse({**chunk, "choices": [], "usage": _usage(prompt_tokens, used)})
    yield "data: [DONE]\n\n"


# --- the app -----------------------------------------------------------------------------------


def create_app(engine: Engine, *, model_id: str | None = None, api_key: str | None = None,
               max_queue: int = 64, read_timeout: float = READ_TIMEOUT) -> FastAPI:  # fmt: skip
    state = ServerState(engine, model_id or engine.name, api_key or None, max_queue, read_timeout)
    app = FastAPI(title="distill4all", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.distill4all = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"Unknown request URL: {request.method} {request.url.path}" if exc.status_code == 404 else exc.detail
        return APIError(exc.status_code, str(message), code="not_found" if exc.status_code == 404 else None).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
        return APIError(499, "the client closed the connection", code="client_closed_request").response()

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        return _internal_error(exc).response()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": state.model_id, "backend": engine.backend, "n_ctx": engine.n_ctx,
                "busy": state.lock.locked(), "waiting": state.waiting}  # fmt: skip

    def model_card() -> dict[str, Any]:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "distill4all"}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        _authorize(state, request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict[str, Any]:
        _authorize(state, request)
        _check_model(state, model)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        _authorize(state, request)
        return await chat_completions(state, request)

    @app.post("/v1/completions")
    async def complete(request: Request) -> Any:
        _authorize(state, request)
        return await completions(state, request)

    @app.post("/tokenize")
    async def tokenize_(request: Request) -> Response:
        _authorize(state, request)
        return await tokenize(state, request)

    @app.post("/detokenize")
    async def detokenize_(request: Request) -> Response:
        _authorize(state, request)
        return await detokenize(state, request)

    @app.get("/tokenizer_info")
    async def tokenizer_info_(request: Request) -> dict[str, Any]:
        _authorize(state, request)
        return await _in_thread(lambda: tokenizer_info(engine))

    return app


class HTTPProtocol(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, answering a request it cannot parse instead of resetting it.

    uvicorn answers headers past h11's buffer limit (16 KiB) with a 400 and closes at once, so a
    client still sending its headers sees a connection reset. Here the status is h11's own hint
    (431 for headers too large), the body is an OpenAI error, and the rest of what the client
    sends is read and dropped (up to DRAIN_BYTES, for at most READ_TIMEOUT) so it can read it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused_with = 400
        self.draining = 0
        parse = self.conn.next_event

        def next_event() -> Any:
            try:
                return parse()
            except h11.RemoteProtocolError as e:
                self.refused_with = e.error_status_hint
                raise

        self.conn.next_event = next_event  # type: ignore[method-assign]

    def data_received(self, data: bytes) -> None:
        if not self.draining:
            super().data_received(data)
            return
        self.draining += len(data)
        if self.draining > DRAIN_BYTES:
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        status = self.refused_with
        message = "the request headers are too large" if status == 431 else f"invalid HTTP request ({msg})"
        error = APIError(status, message, code="headers_too_large" if status == 431 else "invalid_request")
        body = json.dumps(error.body()).encode()
        head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")  # fmt: skip
        self.transport.write(head.encode("latin-1") + body)
        self.draining = 1
        self.loop.call_later(READ_TIMEOUT, self.transport.close)


def serve(engine: Engine, *, host: str = "127.0.0.1", port: int = 4891, api_key: str | None = None,
          model_id: str | None = None, max_queue: int = 64, read_timeout: float = READ_TIMEOUT,
          quiet: bool = False) -> None:  # fmt: skip
    """Serve until interrupted (Ctrl-C or SIGTERM)."""
    import uvicorn

    app = create_app(engine, model_id=model_id, api_key=api_key, max_queue=max_queue, read_timeout=read_timeout)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning" if quiet else "info",
                            http=HTTPProtocol, timeout_graceful_shutdown=5)  # fmt: skip
    uvicorn.Server(config).run()
