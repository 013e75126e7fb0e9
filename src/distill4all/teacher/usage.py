"""Token counts of an answer whose endpoint reported no `usage`, so that its cost is estimated and
marked so, never taken as $0.

With the teacher's tokenizer where one is known locally (the teacher's `tokenizer` setting, else
its `model` when that names a local model folder, a GGUF or a model of `distill4all models`), the
prompt is counted as its chat template renders it and the answer as its tokens; otherwise both
are estimated at ~4 characters a token (OpenAI's rule of thumb). Either way the answer is stored
with how it was counted, and every total that includes it says the cost is estimated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill4all.config import TeacherConfig
from distill4all.errors import ModelError
from distill4all.store.tasks import USAGE_REPORTED
from distill4all.teacher.client import (
    CHAT_OVERHEAD_TOKENS,
    REPLY_PRIMING_TOKENS,
    estimate_prompt_tokens,
    estimate_tokens,
)

ESTIMATE = "estimate (~4 characters a token)"


class TokenCounter:
    """Fills in the token counts an answer lacks; `how` says how (stored with the answer)."""

    def __init__(self, spec: str | None, *, explicit: bool) -> None:
        self.spec = spec
        self._tokenizer: Any = None
        self._loaded = False
        if explicit:  # a tokenizer that was asked for and cannot be loaded is an error, at once
            self._load(strict=True)

    @classmethod
    def for_teacher(cls, teacher: TeacherConfig) -> TokenCounter:
        if teacher.tokenizer is not None:
            return cls(teacher.tokenizer, explicit=True)
        return cls(teacher.model if names_local_model(teacher.model) else None, explicit=False)

    @property
    def how(self) -> str:
        self._load(strict=False)
        return f"tokenizer of {self.spec}" if self._tokenizer is not None else ESTIMATE

    def count(
        self, messages: list[dict[str, str]], text: str, prompt_tokens: int | None, completion_tokens: int | None
    ) -> tuple[int, int, str]:
        """(prompt tokens, completion tokens, how they were counted): the reported counts when both
        are there, else both counted here."""
        if prompt_tokens is not None and completion_tokens is not None:
            return prompt_tokens, completion_tokens, USAGE_REPORTED
        how = self.how
        if self._tokenizer is None:
            return estimate_prompt_tokens(messages), estimate_tokens(text), how
        return self._prompt_tokens(messages), len(self._ids(text)), how

    def _ids(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        tok = self._tokenizer
        if tok.chat_template:
            return len(self._ids(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
        # no template to render: each message's tokens plus the same per-message overhead as the estimate
        turns = sum(len(self._ids(m["content"])) + CHAT_OVERHEAD_TOKENS for m in messages)
        return turns + REPLY_PRIMING_TOKENS

    def _load(self, *, strict: bool) -> None:
        if self._loaded or self.spec is None:
            return
        self._loaded = True
        try:
            self._tokenizer = load_tokenizer(self.spec)
        except ModelError:
            if strict:
                raise
            # the model's name only suggested a local tokenizer; without one the estimate is stated


def names_local_model(spec: str) -> bool:
    from distill4all.models.registry import BUILTINS

    return spec in BUILTINS or Path(spec).expanduser().exists()


def load_tokenizer(spec: str) -> Any:
    """The tokenizer of a model folder, a GGUF file or a named model; ModelError when there is none."""
    from transformers import AutoTokenizer

    from distill4all.models.registry import quiet_hf, resolve_model

    model = resolve_model(spec)
    try:
        with quiet_hf():
            if model.format == "gguf":
                return AutoTokenizer.from_pretrained(model.path.parent, gguf_file=model.path.name)
            return AutoTokenizer.from_pretrained(model.path)
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(f"cannot load the tokenizer of {spec} to count the teacher's tokens: {e}") from None
