"""The Python API: load a model, ask it things, hold a conversation.

    from distill4all import Assistant

    a = Assistant.load("runs/demo/export/model-q4_0.gguf")   # or "smollm2-135m-instruct"
    print(a.generate("Name three colours."))
    for piece in a.generate("Tell me a story.", stream=True):
        print(piece, end="", flush=True)
    with a.chat_session(system="You answer in one sentence.") as s:
        s.send("What is the capital of France?")
        s.send("And of Spain?")                               # the history goes in the template

`generate` answers a prompt as one user turn of the model's chat template (models without a
template get the raw text); `complete` continues raw text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace
from types import TracebackType
from typing import Any, Literal, overload

from distill4all import offline_defaults
from distill4all.config import ASSISTANT_SAMPLING
from distill4all.errors import UserError
from distill4all.runtime.engine import Backend, Completion, Engine, Message, SamplingParams, TextStream, load_engine

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def _params(defaults: SamplingParams, overrides: dict[str, Any]) -> SamplingParams:
    unknown = set(overrides) - _PARAM_NAMES
    if unknown:
        raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    return replace(defaults, **overrides)


class Assistant:
    """A loaded model with default sampling parameters."""

    def __init__(self, engine: Engine, params: SamplingParams | None = None) -> None:
        offline_defaults()  # the Python API has no main(): it starts here (or in load_engine)
        self.engine = engine
        self.params = params or SamplingParams.from_defaults(ASSISTANT_SAMPLING)
        self.last: Completion | None = None  # the latest finished generation (counts, timing)

    @classmethod
    def load(cls, model: str, *, backend: Backend = "auto", n_ctx: int | None = None, **params: Any) -> Assistant:
        """Load a GGUF file, HF folder, adapter folder or model name; `params` are sampling
        defaults (max_tokens, temperature, top_p, top_k, min_p, repeat_penalty, seed, stop)."""
        engine = load_engine(model, backend, n_ctx=n_ctx)
        return cls(engine, _params(SamplingParams.from_defaults(ASSISTANT_SAMPLING), params))

    @property
    def name(self) -> str:
        return self.engine.name

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> Assistant:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, stream: TextStream, as_stream: bool) -> str | Iterator[str]:
        if as_stream:
            return self._tracked(stream)
        self.last = stream.collect()
        return self.last.text

    def _tracked(self, stream: TextStream) -> Iterator[str]:
        try:
            yield from stream
        finally:
            stream.close()
            self.last = stream.completion

    def messages_for(self, prompt: str, system: str | None = None) -> list[Message]:
        messages = [{"role": "user", "content": prompt}]
        if system:
            messages.insert(0, {"role": "system", "content": system})
        return messages

    @overload
    def generate(
        self, prompt: str, *, system: str | None = ..., stream: Literal[False] = ..., **params: Any
    ) -> str: ...
    @overload
    def generate(
        self, prompt: str, *, system: str | None = ..., stream: Literal[True], **params: Any
    ) -> Iterator[str]: ...

    def generate(
        self, prompt: str, *, system: str | None = None, stream: bool = False, **params: Any
    ) -> str | Iterator[str]:
        """The model's answer to `prompt` (a single user turn), whole or as an iterator of pieces."""
        p = _params(self.params, params)
        if self.engine.chat_template is None:
            return self._run(self.engine.stream(prompt, p), stream)
        return self._run(self.engine.stream_chat(self.messages_for(prompt, system), p), stream)

    @overload
    def complete(self, text: str, *, stream: Literal[False] = ..., **params: Any) -> str: ...
    @overload
    def complete(self, text: str, *, stream: Literal[True], **params: Any) -> Iterator[str]: ...

    def complete(self, text: str, *, stream: bool = False, **params: Any) -> str | Iterator[str]:
        """Continue `text` as it is, with no chat template."""
        return self._run(self.engine.stream(text, _params(self.params, params)), stream)

    def chat_session(self, system: str | None = None, **params: Any) -> ChatSession:
        return ChatSession(self, system, _params(self.params, params))


class ChatSession:
    """A conversation whose whole history is rendered with the model's chat template each turn.

    With llama.cpp the shared prefix of the previous turn stays in the KV cache, so a turn costs
    only its new tokens.
    """

    def __init__(self, assistant: Assistant, system: str | None, params: SamplingParams) -> None:
        if assistant.engine.chat_template is None:
            raise UserError(f"{assistant.name} has no chat template; use Assistant.complete for raw text")
        self.assistant = assistant
        self.system = system
        self.params = params
        self.history: list[Message] = []
        self.dropped_turns = 0  # exchanges forgotten to fit the context window
        self.reset()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.history = []

    def reset(self, system: str | None = None) -> None:
        """Forget the conversation; a new `system` prompt replaces the old one."""
        if system is not None:
            self.system = system or None
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    @overload
    def send(self, text: str, *, stream: Literal[False] = ..., **params: Any) -> str: ...
    @overload
    def send(self, text: str, *, stream: Literal[True], **params: Any) -> Iterator[str]: ...

    def send(self, text: str, *, stream: bool = False, **params: Any) -> str | Iterator[str]:
        """Add a user turn and return the answer; the answer joins the history when it is done
        (for a stream: when it is exhausted or closed, with what was generated so far)."""
        p = _params(self.params, params)
        turn = self._fit([*self.history, {"role": "user", "content": text}], p)
        s = self.assistant.engine.stream_chat(turn, p)
        if not stream:
            answer = str(self.assistant._run(s, False))
            self.history = [*turn, {"role": "assistant", "content": answer}]
            return answer
        return self._streamed(turn, s)

    def _fit(self, turn: list[Message], params: SamplingParams) -> list[Message]:
        """Drop the oldest exchanges (never the system prompt) until the conversation leaves room
        for an answer in the context window."""
        engine = self.assistant.engine
        room = min(params.max_tokens, engine.n_ctx // 4)
        first = 1 if turn[0]["role"] == "system" else 0
        while len(turn) > first + 1 and len(engine.chat_ids(turn)) + room > engine.n_ctx:
            del turn[first : first + 2]
            self.dropped_turns += 1
        return turn

    def _streamed(self, turn: list[Message], s: TextStream) -> Iterator[str]:
        pieces: list[str] = []
        try:
            for piece in self.assistant._tracked(s):
                pieces.append(piece)
                yield piece
        finally:
            self.history = [*turn, {"role": "assistant", "content": "".join(pieces)}]

    @property
    def last(self) -> Completion | None:
        return self.assistant.last
