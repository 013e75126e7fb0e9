"""Local inference behind one interface, with two backends.

`load_engine(spec)` resolves a model name or path: a GGUF file runs on llama.cpp
(llama-cpp-python), an HF checkpoint folder (optionally a PEFT adapter folder) runs on
transformers. Both tokenize, render the model's own chat template, score text (`logits`,
`token_logprobs`) and generate with the same sampling parameters, whole or streamed.

Generation is shared: a backend only yields sampled token ids (`_sample`); the base class turns
them into text incrementally, applies stop strings and EOS, and counts tokens and time.
An engine is not thread-safe: one request at a time (the server serializes with a lock).
"""

from __future__ import annotations

import atexit
import functools
import itertools
import json
import os
import random
import re
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from distill4all import offline_defaults
from distill4all.config import ENGINE_SAMPLING, SamplingDefaults
from distill4all.errors import ContextLengthError, ModelError
from distill4all.models import resolve_model
from distill4all.models.chat_templates import answer_end, hf_stop_ids, is_paper_layout, paper_prompt_ids
from distill4all.models.registry import quiet_hf
from distill4all.runtime.structured import StructureError

Message = dict[str, str]
# Called while a text is tokenized with a lower bound of its token count (first before any work);
# it may raise to stop, e.g. when the client has gone or the count is already past the context.
Progress = Callable[[int], None]
Backend = Literal["auto", "llama.cpp", "transformers"]
BACKENDS: tuple[Backend, ...] = ("auto", "llama.cpp", "transformers")


@dataclass
class SamplingParams:
    """One generation's sampling; the defaults are config.ENGINE_SAMPLING (their meanings are there)."""

    max_tokens: int = ENGINE_SAMPLING.max_tokens
    temperature: float = ENGINE_SAMPLING.temperature
    top_p: float = ENGINE_SAMPLING.top_p
    top_k: int = ENGINE_SAMPLING.top_k
    min_p: float = ENGINE_SAMPLING.min_p
    repeat_penalty: float = ENGINE_SAMPLING.repeat_penalty
    seed: int | None = ENGINE_SAMPLING.seed
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # keep each generated token's logprob and this many alternatives
    grammar: str | None = None  # a GBNF grammar the answer follows (engines with `grammars` only)
    logit_bias: dict[int, float] = field(default_factory=dict)  # added to those tokens' logits

    @classmethod
    def from_defaults(cls, defaults: SamplingDefaults) -> SamplingParams:
        return cls(**asdict(defaults))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenLogprob:
    """A generated (or scored) token's log-probability and the `top` most likely in its place."""

    token: int
    logprob: float
    top: list[tuple[int, float]]

    @classmethod
    def of(cls, logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
        """From one position's log-softmax row."""
        best = (
            np.argpartition(-logprobs, top)[:top] if 0 < top < len(logprobs) else np.arange(len(logprobs) if top else 0)
        )
        best = best[np.argsort(-logprobs[best])]
        return cls(token, float(logprobs[token]), [(int(i), float(logprobs[i])) for i in best])


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float  # prompt processing + decoding
    prompt_seconds: float = 0.0  # time to the first generated token
    token_ids: list[int] = field(default_factory=list)  # the generated tokens behind `text`
    # with params.logprobs, one per token id, taken from the logits each was sampled from; None
    # when the engine cannot give them while sampling (score the tokens afterwards instead)
    logprobs: list[TokenLogprob] | None = None
    stop_token: int | None = None  # the end-of-generation token sampled last, if that ended it

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        """Generation speed after the prompt was read (the first token comes with the prompt)."""
        decode = self.seconds - self.prompt_seconds
        return (self.completion_tokens - 1) / decode if self.completion_tokens > 1 and decode > 0 else 0.0


class TextStream(Iterator[str]):
    """Text pieces as they are generated; `completion` is set once the stream is exhausted.

    Closing it early (or breaking out of a loop over it) stops generation at once.
    """

    def __init__(self, make: Callable[[TextStream], Iterator[str]]) -> None:
        self.completion: Completion | None = None
        self._pieces = make(self)  # a generator that sets `completion` when it ends

    def __next__(self) -> str:
        return next(self._pieces)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()

    def collect(self) -> Completion:
        for _ in self:
            pass
        assert self.completion is not None
        return self.completion


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas.

    Decoding token by token breaks multi-byte characters and leading-space rules, so each step
    decodes a short window of recent tokens and emits only what is new (the same scheme as
    text-generation-inference); a trailing U+FFFD means a character is still incomplete.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, token: int) -> str:
        self.ids.append(token)
        before = self.engine.detokenize(self.ids[self.prefix : self.read])
        now = self.engine.detokenize(self.ids[self.prefix :])
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (e.g. a truncated character)."""
        before = self.engine.detokenize(self.ids[self.prefix : self.read])
        now = self.engine.detokenize(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return now[len(before) :] if len(now) > len(before) else ""


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that could still grow into a stop string."""
    held = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held


class Engine(ABC):
    """One loaded model. Subclasses provide tokenization, templates, scoring and sampling."""

    name: str
    backend: str
    n_ctx: int
    eos_ids: set[int]
    grammars: bool = False  # whether sampling can follow a GBNF grammar (JSON, JSON Schema, tool calls)

    # --- what a backend implements ------------------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, *, add_special: bool = True, progress: Progress | None = None) -> list[int]:
        """Token ids of `text`; `add_special` adds the BOS token where the model wants one.
        Special tokens written in the text (e.g. `<|im_end|>`) are parsed as such. `progress`
        hears a lower bound of the count as the work goes, and may raise to stop it."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """Text of `ids`, special tokens left out."""

    @abstractmethod
    def token_text(self, token: int) -> str:
        """The text of one token as it would be printed (special tokens included), for logprobs."""

    def token_bytes(self, token: int) -> bytes:
        """The exact bytes of one token, which may be part of a character (logprobs' `bytes`);
        the tokens of a text concatenate to its UTF-8. A backend that cannot tell gives its text's."""
        return self.token_text(token).encode()

    @abstractmethod
    def special_token(self, kind: Literal["bos", "eos", "pad"]) -> str | None:
        """The text of the model's BOS, EOS or pad token; None if it has none."""

    @property
    @abstractmethod
    def chat_template(self) -> str | None: ...

    @abstractmethod
    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model's own chat template writes it."""

    @abstractmethod
    def use_chat_template(self, jinja: str) -> None:
        """Render chats with `jinja` from now on, e.g. a baseline in the layout it was trained in."""

    @property
    def adds_bos(self) -> bool:
        """Whether tokenizing with special tokens puts a token in front of the text."""
        plain, special = self.tokenize("a", add_special=False), self.tokenize("a", add_special=True)
        return len(special) > len(plain) and special[1 : 1 + len(plain)] == plain

    @abstractmethod
    def logits(self, ids: list[int]) -> np.ndarray:
        """float32 [len(ids), vocab]: row i holds the next-token logits after ids[: i + 1]."""

    def logit_batches(self, ids: list[int]) -> Iterator[np.ndarray]:
        """`logits(ids)` a batch of rows at a time, where the engine computes them so (a long
        text never holds all its rows at once); stopping early stops the work."""
        yield self.logits(ids)

    def check_grammar(self, grammar: str) -> None:
        """Raise StructureError unless sampling can follow `grammar` (GBNF)."""
        if not self.grammars:
            raise StructureError(f"the {self.backend} engine cannot follow a grammar; run a GGUF (llama.cpp)")

    @abstractmethod
    def _sample(self, ids: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        """Yield sampled token ids after the prompt `ids`, forever (the caller stops it)."""

    def _sampled_logits(self) -> np.ndarray | None:
        """Inside `_sample`'s loop: the raw next-token logits the token just yielded was drawn
        from, where the engine keeps them (before any sampling penalty); None if it does not."""
        return None

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    def close(self) -> None:  # noqa: B027 - optional for backends
        """Free the model's memory now rather than at garbage collection."""

    # --- shared on top ------------------------------------------------------------------------

    def token_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1 (the first token has no context)."""
        if len(ids) < 2:
            return []
        logits = self.logits(ids[:-1])
        logprobs = log_softmax(logits)
        return [float(x) for x in logprobs[np.arange(len(ids) - 1), ids[1:]]]

    def chat_ids(self, messages: list[Message], *, progress: Progress | None = None) -> list[int]:
        if is_paper_layout(self.chat_template) and all(m["role"] != "assistant" for m in messages):
            tokenize = functools.partial(self.tokenize, progress=progress)
            return paper_prompt_ids(tokenize, [m["content"] for m in messages])
        # A rendered chat template holds every special token it wants (as apply_chat_template's
        # own tokenize=True path assumes), so nothing is added.
        return self.tokenize(self.render_chat(messages), add_special=False, progress=progress)

    def check_fits(self, n_prompt: int) -> None:
        if n_prompt >= self.n_ctx:
            raise ContextLengthError(
                f"the prompt has {n_prompt} tokens but {self.name}'s context holds {self.n_ctx} "
                "(prompt and answer together); shorten the prompt"
            )

    def stream_ids(self, ids: list[int], params: SamplingParams) -> TextStream:
        """Generate after the prompt token ids; the returned stream yields text pieces."""
        if params.grammar is not None and not self.grammars:
            raise ModelError(f"the {self.backend} engine cannot follow a grammar; run a GGUF (llama.cpp)")
        if any(not 0 <= t < self.vocab_size for t in params.logit_bias):
            raise ModelError(f"logit_bias names a token outside the vocabulary (0..{self.vocab_size - 1})")
        self.check_fits(len(ids))
        return TextStream(lambda stream: self._pieces(ids, params, stream))

    def stream(self, prompt: str, params: SamplingParams) -> TextStream:
        return self.stream_ids(self.tokenize(prompt), params)

    def stream_chat(self, messages: list[Message], params: SamplingParams) -> TextStream:
        return self.stream_ids(self.chat_ids(messages), params)

    def generate(self, prompt: str, params: SamplingParams) -> Completion:
        return self.stream(prompt, params).collect()

    def generate_ids(self, ids: list[int], params: SamplingParams) -> Completion:
        return self.stream_ids(ids, params).collect()

    def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        return self.stream_chat(messages, params).collect()

    def _pieces(self, ids: list[int], params: SamplingParams, stream: TextStream) -> Iterator[str]:
        budget = min(params.max_tokens, self.n_ctx - len(ids))
        seed = params.seed if params.seed is not None else random.randrange(2**31)
        stops = [s for s in params.stop if s]
        decoder = IncrementalDecoder(self)
        pending, text, finish = "", "", "length"
        kept: list[int] = []
        scored: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        t0 = time.perf_counter()
        first_at = 0.0
        tokens = self._sample(ids, params, seed) if budget > 0 else iter(())
        n, by_string = 0, False
        stop_token: int | None = None
        try:
            for token in tokens:
                n += 1
                if n == 1:
                    first_at = time.perf_counter() - t0
                if token in self.eos_ids:
                    finish, stop_token = "stop", token
                    break
                kept.append(token)
                if scored is not None:
                    row = self._sampled_logits()
                    if row is None:
                        scored = None
                    else:
                        scored.append(TokenLogprob.of(log_softmax(row[None])[0], token, params.logprobs or 0))
                pending += decoder.add(token)
                piece, pending, hit = _split_at_stop(pending, stops)
                if piece:
                    text += piece
                    yield piece
                if hit:
                    finish, by_string = "stop", True
                    break
                if n >= budget:
                    break
            if not by_string:
                # End of generation: what was held back can no longer become a stop string.
                tail, _, hit = _split_at_stop(pending + decoder.flush(), stops, final=True)
                finish = "stop" if hit else finish
                if tail:
                    text += tail
                    yield tail
        finally:
            close = getattr(tokens, "close", None)
            if close is not None:
                close()
            stream.completion = Completion(
                text=text,
                finish_reason=finish,
                prompt_tokens=len(ids),
                completion_tokens=n,
                seconds=time.perf_counter() - t0,
                prompt_seconds=first_at,
                token_ids=kept,
                logprobs=scored,
                stop_token=stop_token,
            )


def _split_at_stop(pending: str, stops: Sequence[str], *, final: bool = False) -> tuple[str, str, bool]:
    """Split pending text into (safe to emit, still held back, a stop string was hit).

    Text before the first stop string is emitted and the rest dropped; otherwise a suffix that
    could still grow into a stop string is held back, unless this is the end (`final`).
    """
    hit = min((i for i in (pending.find(s) for s in stops) if i >= 0), default=-1)
    if hit >= 0:
        return pending[:hit], "", True
    cut = len(pending) if final else len(pending) - _held_back(pending, stops)
    return pending[:cut], pending[cut:], False


def decode_speed(spec: str | Path, tokens: int = 64, rounds: int = 3) -> float:
    """Greedy decode tokens/s of a model after a short chat prompt: the fastest of `rounds`, since
    other work on the machine only ever slows a round down."""
    engine = load_engine(str(spec))
    try:
        ids = engine.chat_ids([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
        best = 0.0
        for _ in range(rounds):
            stream = engine._sample(ids, SamplingParams(temperature=0.0, repeat_penalty=1.0), 0)
            t0 = time.perf_counter()
            for _ in range(tokens):
                next(stream)
            best = max(best, tokens / (time.perf_counter() - t0))
        return best
    finally:
        engine.close()


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    out: np.ndarray = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return out


def _threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


# --- llama.cpp -------------------------------------------------------------------------------


class LlamaCppEngine(Engine):
    """A GGUF file run by llama.cpp on the CPU."""

    backend = "llama.cpp"
    grammars = True
    DEFAULT_MAX_CTX = 4096  # the KV cache is allocated up front; a larger n_ctx can be asked for

    def __init__(self, path: Path, name: str | None = None, *, n_ctx: int | None = None) -> None:
        import llama_cpp
        from llama_cpp import _logger

        _logger.set_verbose(False)
        self.name = name or path.name
        self.path = path
        n_ctx_train = _gguf_context_length(path)
        self.n_ctx = n_ctx or min(n_ctx_train, self.DEFAULT_MAX_CTX)
        threads = _threads()
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(path),
                n_ctx=self.n_ctx,
                n_batch=512,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
            )
        except (ValueError, RuntimeError) as e:
            raise ModelError(
                f"llama.cpp cannot load {path}: {e} (a GGUF from a newer llama.cpp, or a damaged file? "
                "see docs/runtime.md)"
            ) from None
        self.metadata: dict[str, str] = dict(self.llm.metadata)
        self._vocab = self.llm._model.vocab
        self._n_vocab = self.llm.n_vocab()
        self._eog = {t for t in range(self._n_vocab) if llama_cpp.llama_vocab_is_eog(self._vocab, t)}
        self.eos_ids = set(self._eog)
        self._template = self.metadata.get("tokenizer.chat_template")
        self._formatters: dict[bool, Any] = {}
        self._parsed_grammar: str | None = None  # the last grammar llama.cpp parsed (checked once)
        # Free llama.cpp's memory before interpreter shutdown tears down the bindings, which
        # Llama.__del__ would otherwise trip over.
        atexit.register(_close_if_alive, weakref.ref(self))

    @property
    def vocab_size(self) -> int:
        return int(self._n_vocab)

    def tokenize(self, text: str, *, add_special: bool = True, progress: Progress | None = None) -> list[int]:
        """llama.cpp's tokens, a few special tokens' worth of text at a time.

        llama.cpp splits a text at its special tokens by searching, for each special token, every
        fragment split off so far, each search running to the end of the whole text: quadratic in
        the special tokens a text holds (100k `<|im_start|>` took 45 s). Cut where llama.cpp would
        split anyway (before a special token that no other one overlaps), the pieces tokenize to
        the same ids, in time linear in the text, and `progress` is heard between them."""
        data = text.encode("utf-8")
        if progress is not None:
            progress(len(data) // self._max_token_bytes if self._splittable else 0)
        cuts = self._cuts(data) if self._splittable else []
        if not cuts:
            return self._tokenize_bytes(data, add_special)
        ids = [self._bos] if add_special and self._bos is not None else []
        for start, end in itertools.pairwise([0, *cuts, len(data)]):
            ids += self._tokenize_bytes(data[start:end], False)
            if progress is not None:
                progress(len(ids))
        if add_special and self._eos is not None:
            ids.append(self._eos)
        return ids

    def _tokenize_bytes(self, data: bytes, add_special: bool) -> list[int]:
        import llama_cpp

        size = len(data) + 8
        while True:
            buffer = (llama_cpp.llama_token * size)()
            n = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, size, add_special, True)
            if n >= 0:
                return list(buffer[:n])
            size = -n

    SPECIALS_PER_CALL = 32  # special tokens in one piece: few enough to stay linear, enough to be few calls

    def _cuts(self, data: bytes) -> list[int]:
        """Where `data` may be cut so that its pieces tokenize as it does, every SPECIALS_PER_CALL
        special tokens: the starts of special tokens that no earlier one reaches past (llama.cpp
        takes the longest first, so an overlapped start may not be a boundary), and where a token
        strips the whitespace before it, not after whitespace."""
        pattern, lstrip = self._special_starts
        cuts: list[int] = []
        reach, seen = 0, 0
        for m in pattern.finditer(data):
            start = m.start()
            if reach <= start and start > 0 and not (lstrip and data[start - 1 : start].isspace()):
                seen += 1
                if seen % self.SPECIALS_PER_CALL == 0:
                    cuts.append(start)
            reach = max(reach, start + len(m.group(1)))
        return cuts

    @functools.cached_property
    def _special_starts(self) -> tuple[re.Pattern[bytes], bool]:
        """Every position where a special token llama.cpp parses in text starts (the longest one
        there), and whether any of them strips the whitespace before it."""
        import llama_cpp

        # the tokens llama.cpp looks for in text when it parses special tokens (its cache_special_tokens)
        mask = (
            llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
            | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
            | llama_cpp.LLAMA_TOKEN_ATTR_UNKNOWN
        )
        texts: set[bytes] = set()
        lstrip = False
        for t in range(self._n_vocab):
            attr = llama_cpp.llama_vocab_get_attr(self._vocab, t)
            if attr & mask and (raw := llama_cpp.llama_vocab_get_text(self._vocab, t)):
                texts.add(raw)
                lstrip = lstrip or bool(attr & llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP)
        alternatives = b"|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True))
        return re.compile(b"(?=(" + alternatives + b"))" if texts else b"(?!)"), lstrip

    @functools.cached_property
    def _splittable(self) -> bool:
        """Tokenizers whose fragments between special tokens are tokenized independently and
        that neither drop nor merge text (so `_max_token_bytes` bounds the count): BPE and
        SentencePiece; the others (WordPiece, Unigram, RWKV) are left whole."""
        import llama_cpp

        kinds = (llama_cpp.LLAMA_VOCAB_TYPE_SPM, llama_cpp.LLAMA_VOCAB_TYPE_BPE)
        return int(llama_cpp.llama_vocab_type(self._vocab)) in kinds

    @functools.cached_property
    def _max_token_bytes(self) -> int:
        """The most bytes of text one token stands for: a text of N bytes has at least N / this tokens."""
        return max(1, *(len(self.token_bytes(t)) for t in range(self._n_vocab)))

    @functools.cached_property
    def _bos(self) -> int | None:
        import llama_cpp

        return int(llama_cpp.llama_vocab_bos(self._vocab)) if llama_cpp.llama_vocab_get_add_bos(self._vocab) else None

    @functools.cached_property
    def _eos(self) -> int | None:
        import llama_cpp

        return int(llama_cpp.llama_vocab_eos(self._vocab)) if llama_cpp.llama_vocab_get_add_eos(self._vocab) else None

    def detokenize(self, ids: Sequence[int]) -> str:
        return bytes(self.llm.detokenize(list(ids))).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        return bytes(self.llm.detokenize([token], special=True)).decode("utf-8", errors="replace")

    def token_bytes(self, token: int) -> bytes:
        return bytes(self.llm.detokenize([token], special=True))

    @property
    def chat_template(self) -> str | None:
        return self._template

    def use_chat_template(self, jinja: str) -> None:
        """Also stops at the token that ends an answer under `jinja`, where the GGUF's own
        end-of-generation tokens do not include it."""
        self._template = jinja
        self._formatters = {}
        try:
            end = answer_end(lambda m: self.render_chat(list(m), add_generation_prompt=False), self._control_tokens)
        except ModelError:  # a template that rejects the probe conversation: its GGUF's stops only
            end = None
        self.eos_ids = self._eog | ({self._control_tokens[end]} if end is not None else set())

    @functools.cached_property
    def _control_tokens(self) -> dict[str, int]:
        import llama_cpp

        attr = llama_cpp.llama_vocab_get_attr
        control = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL
        return {self.token_text(t): t for t in range(self._n_vocab) if attr(self._vocab, t) & control}

    def special_token(self, kind: Literal["bos", "eos", "pad"]) -> str | None:
        tid = self.metadata.get(f"tokenizer.ggml.{kind}_token_id")
        return self.token_text(int(tid)) if tid is not None else None

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self._template:
            raise ModelError(f"{self.name} has no chat template in its GGUF metadata (tokenizer.chat_template)")
        if add_generation_prompt not in self._formatters:
            self._formatters[add_generation_prompt] = Jinja2ChatFormatter(
                self._template, self.special_token("eos") or "", self.special_token("bos") or "", add_generation_prompt
            )
        try:
            return str(self._formatters[add_generation_prompt](messages=messages).prompt)
        except Exception as e:  # jinja2 errors: the template rejects these messages
            raise ModelError(f"{self.name}'s chat template failed on these messages: {e}") from None

    def _logit_rows(self, ids: list[int]) -> Iterator[np.ndarray]:
        """Logits of every position, a batch at a time.

        Llama.eval keeps only the last row unless the whole context was made with logits_all,
        which would slow every prompt down; so scoring asks llama.cpp for all rows of its own
        batches (the same calls Llama.eval makes) and leaves the cache empty afterwards.
        """
        llm = self.llm
        self.check_fits(len(ids) - 1)
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)
        try:
            for start in range(0, len(ids), llm.n_batch):
                chunk = ids[start : start + llm.n_batch]
                llm._batch.set_batch(batch=chunk, n_past=start, logits_all=True)
                llm._ctx.decode(llm._batch)
                rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * self._n_vocab,))
                yield rows.reshape(len(chunk), self._n_vocab).copy()
        finally:
            llm._ctx.kv_cache_seq_rm(-1, 0, -1)
            llm.reset()

    def logits(self, ids: list[int]) -> np.ndarray:
        if not ids:
            return np.zeros((0, self._n_vocab), dtype=np.float32)
        return np.concatenate(list(self._logit_rows(ids))).astype(np.float32, copy=False)

    def logit_batches(self, ids: list[int]) -> Iterator[np.ndarray]:
        return self._logit_rows(ids) if ids else iter(())

    MAX_GRAMMAR_DEPTH = 2000  # llama.cpp parses a grammar's groups recursively: ~18,000 deep overflowed an 8 MiB stack

    def check_grammar(self, grammar: str) -> None:
        """llama.cpp parses the grammar (a grammar it cannot parse becomes a NULL sampler, which
        llama-cpp-python adds to the chain anyway: a segfault at the first token)."""
        import llama_cpp

        if grammar == self._parsed_grammar:
            return
        if (depth := _grammar_depth(grammar)) > self.MAX_GRAMMAR_DEPTH:
            raise StructureError(f"the grammar nests {depth} groups deep; at most {self.MAX_GRAMMAR_DEPTH} are allowed")
        sampler = llama_cpp.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise StructureError("llama.cpp cannot parse the grammar it becomes (its parser's message is in the log)")
        llama_cpp.llama_sampler_free(sampler)
        self._parsed_grammar = grammar

    def token_logprobs(self, ids: list[int]) -> list[float]:
        # Batch by batch, so a long text never holds [len, vocab] floats at once.
        if len(ids) < 2:
            return []
        out: list[float] = []
        start = 0
        for rows in self._logit_rows(ids[:-1]):
            targets = ids[start + 1 : start + 1 + len(rows)]
            lp = log_softmax(rows)
            out.extend(float(x) for x in lp[np.arange(len(rows)), targets])
            start += len(rows)
        return out

    def _sampled_logits(self) -> np.ndarray | None:
        # Llama.generate yields a token before evaluating it, so the context's last output row is
        # the distribution the token was sampled from: the sampler chain copies it and leaves it
        # as llama.cpp computed it (Llama.scores is not kept without logits_all).
        import llama_cpp

        row = llama_cpp.llama_get_logits_ith(self.llm._ctx.ctx, -1)
        return np.ctypeslib.as_array(row, shape=(self._n_vocab,)).copy() if row else None

    def _sample(self, ids: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        from llama_cpp import LlamaGrammar, LogitsProcessorList

        self.llm.set_seed(seed)
        if params.grammar:
            self.check_grammar(params.grammar)
        grammar = LlamaGrammar.from_string(params.grammar, verbose=False) if params.grammar else None
        processors = LogitsProcessorList([_bias_adder(params.logit_bias)]) if params.logit_bias else None
        # Llama.generate reuses the cached prefix of the previous prompt (multi-turn chat).
        yield from self.llm.generate(
            ids,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=params.min_p,
            temp=params.temperature,
            repeat_penalty=params.repeat_penalty,
            reset=True,
            grammar=grammar,
            logits_processor=processors,
        )

    def close(self) -> None:
        self.llm.close()


def _grammar_depth(grammar: str) -> int:
    """How deep a GBNF grammar's parentheses nest (outside strings, character classes and comments)."""
    depth = deepest = 0
    quote: str | None = None  # the closing character of the string or class we are in
    comment = False
    chars = iter(grammar)
    for c in chars:
        if comment:
            comment = c not in "\r\n"
        elif quote is not None:
            if c == "\\":
                next(chars, None)
            elif c == quote:
                quote = None
        elif c == '"' or c == "[":
            quote = '"' if c == '"' else "]"
        elif c == "#":
            comment = True
        elif c == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif c == ")":
            depth -= 1
    return deepest


def _bias_adder(bias: dict[int, float]) -> Callable[[Any, np.ndarray], np.ndarray]:
    """A llama-cpp-python logits processor adding OpenAI's logit_bias to the next-token logits."""
    ids = np.fromiter(bias, dtype=np.int64, count=len(bias))
    add = np.fromiter(bias.values(), dtype=np.float32, count=len(bias))

    def adder(_input_ids: Any, scores: np.ndarray) -> np.ndarray:
        scores[ids] += add
        return scores

    return adder


def _close_if_alive(ref: weakref.ref[LlamaCppEngine]) -> None:
    engine = ref()
    if engine is not None:
        engine.close()


def _gguf_context_length(path: Path) -> int:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ModelError(f"{path} is not a readable GGUF file: {e}") from None
    arch = reader.get_field("general.architecture")
    field_ = reader.get_field(f"{arch.contents()}.context_length") if arch is not None else None
    return int(field_.contents()) if field_ is not None else 2048


# --- transformers ----------------------------------------------------------------------------


class TransformersEngine(Engine):
    """An HF checkpoint (optionally with a PEFT adapter) run by transformers, fp32 on the CPU."""

    backend = "transformers"

    def __init__(self, path: str | Path, name: str | None = None, *, n_ctx: int | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = Path(path)
        self.name = name or path.name
        adapter = (path / "adapter_config.json").is_file()
        base = adapter_base(path) if adapter else path
        try:
            with quiet_hf():
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
                if adapter:
                    from peft import PeftModel

                    self.model = PeftModel.from_pretrained(self.model, path)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load {path}: {e}") from None
        self.model.eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        config = self.model.config
        self.n_ctx = n_ctx or int(getattr(config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id
        self._config_eos = {eos} if isinstance(eos, int) else set(eos or [])
        self.eos_ids = self._config_eos | set(hf_stop_ids(self.tokenizer))

    @property
    def vocab_size(self) -> int:
        return int(self.model.config.vocab_size)

    def tokenize(self, text: str, *, add_special: bool = True, progress: Progress | None = None) -> list[int]:
        if progress is not None:  # HF tokenizers split at added tokens in linear time: one call
            progress(0)
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def detokenize(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def token_bytes(self, token: int) -> bytes:
        from distill4all.models.tokens import token_bytes

        return token_bytes(self.tokenizer, token, byte_level=self._byte_level, special=self._special_ids)

    def special_token(self, kind: Literal["bos", "eos", "pad"]) -> str | None:
        token = getattr(self.tokenizer, f"{kind}_token", None)
        return str(token) if token is not None else None

    @functools.cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(self.tokenizer.all_special_ids)

    @functools.cached_property
    def _byte_level(self) -> bool:
        from distill4all.models.tokens import is_byte_level

        return is_byte_level(self.tokenizer)

    @property
    def chat_template(self) -> str | None:
        template = self.tokenizer.chat_template
        return template if isinstance(template, str) else None

    def use_chat_template(self, jinja: str) -> None:
        self.tokenizer.chat_template = jinja
        self.eos_ids = self._config_eos | set(hf_stop_ids(self.tokenizer))

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.name} has no chat template")
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        self.check_fits(len(ids) - 1)
        with torch.inference_mode():
            out = self.model(torch.tensor([ids], device=self.device)).logits[0]
        return np.asarray(out.float().cpu().numpy(), dtype=np.float32)

    def token_logprobs(self, ids: list[int]) -> list[float]:
        # In torch, by cross-entropy: no [len, vocab] log-softmax copied out to numpy.
        import torch

        if len(ids) < 2:
            return []
        self.check_fits(len(ids) - 1)
        with torch.inference_mode():
            x = torch.tensor([ids], device=self.device)
            logits = self.model(x[:, :-1]).logits[0].float()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
        return [-float(v) for v in nll.cpu().tolist()]

    def _sample(self, ids: list[int], params: SamplingParams, seed: int) -> Iterator[int]:
        """A plain KV-cached decoding loop with transformers' own logits processors.

        model.generate cannot be paused between tokens without a thread; this loop yields each
        token as it is chosen, and a per-call torch.Generator keeps the seed local to the call.
        """
        import torch
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        penalty = LogitsProcessorList()
        if params.repeat_penalty != 1.0:
            penalty.append(RepetitionPenaltyLogitsProcessor(params.repeat_penalty))
        processors = LogitsProcessorList()
        sampling = params.temperature > 0
        if sampling:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_k > 0:
                processors.append(TopKLogitsWarper(params.top_k))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            if params.min_p > 0:
                processors.append(MinPLogitsWarper(params.min_p))
        generator = torch.Generator(device=self.device).manual_seed(seed)
        bias = None
        if params.logit_bias:
            values = list(params.logit_bias.values())
            bias = (
                torch.tensor(list(params.logit_bias), device=self.device),
                torch.tensor(values, dtype=torch.float64, device=self.device),
            )
        seen = torch.tensor([ids], device=self.device)
        step_input = seen
        cache = None
        with torch.inference_mode():
            while True:
                out = self.model(input_ids=step_input, cache=cache, use_cache=True)
                cache = out.cache
                # float64, best logit at 0, then the temperature: a tiny one (1e-300, which float32 rounds
                # to 0) gives 0 and -inf, which is greedy, instead of 0/0 or inf - inf
                scores = penalty(seen, out.logits[:, -1, :].double())
                if bias is not None:
                    scores[0, bias[0]] += bias[1]
                scores = processors(seen, scores - scores.max(dim=-1, keepdim=True).values)
                if sampling:
                    token = torch.multinomial(torch.softmax(scores, dim=-1), 1, generator=generator)
                else:
                    token = scores.argmax(dim=-1, keepdim=True)
                seen = torch.cat([seen, token], dim=1)
                step_input = token
                yield int(token.item())


def adapter_base(adapter_dir: Path) -> Path:
    """The base checkpoint a PEFT adapter folder names (a path or a distill4all model name)."""
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {adapter_dir / 'adapter_config.json'}: {e}") from None
    base = config.get("base_model_name_or_path")
    if not base:
        raise ModelError(f"{adapter_dir}: adapter_config.json names no base_model_name_or_path")
    return resolve_model(str(base), want="hf").path


# --- loading ---------------------------------------------------------------------------------


def load_engine(spec: str, backend: Backend = "auto", *, n_ctx: int | None = None) -> Engine:
    """Load a model by name or path: GGUF → llama.cpp, HF folder or PEFT adapter → transformers.

    `backend="transformers"` on a GGUF file runs its dequantized HF form instead.
    """
    offline_defaults()  # before transformers is first imported: the Python API has no main()
    if backend not in BACKENDS:
        raise ModelError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file():
        if backend == "llama.cpp":
            raise ModelError(f"{spec} is a LoRA adapter; export it to GGUF first (distill4all export)")
        return TransformersEngine(path, name=path.name, n_ctx=n_ctx)
    if backend == "transformers":
        resolved = resolve_model(spec, want="hf")
        return TransformersEngine(resolved.path, name=resolved.name, n_ctx=n_ctx)
    resolved = resolve_model(spec, want="gguf" if backend == "llama.cpp" else "any")
    if resolved.format == "gguf":
        return LlamaCppEngine(resolved.path, name=resolved.name, n_ctx=n_ctx)
    return TransformersEngine(resolved.path, name=resolved.name, n_ctx=n_ctx)
