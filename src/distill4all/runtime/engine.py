"""Local inference behind one interface.

`load_engine(spec)` resolves a model name or path and returns an engine that tokenizes, applies
the model's own chat template and generates with sampling parameters.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from distill4all.errors import ModelError
from distill4all.models import resolve_model
from distill4all.models.registry import quiet_hf

Message = dict[str, str]


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 → greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 → off
    repeat_penalty: float = 1.0
    seed: int | None = 0
    stop: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (EOS or a stop string) | "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds > 0 else 0.0


class Engine(Protocol):
    name: str

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...
    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str: ...
    def generate(self, prompt: str, params: SamplingParams) -> Completion: ...

    def chat(self, messages: list[Message], params: SamplingParams) -> Completion: ...


class TransformersEngine:
    """An HF checkpoint run by transformers on the CPU (or the GPU when there is one)."""

    def __init__(self, path: str, name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or path
        try:
            with quiet_hf():
                self.tokenizer = AutoTokenizer.from_pretrained(path)
                self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise ModelError(f"cannot load {path}: {e}") from None
        self.model.eval()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model.to(self.device)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids: list[int] = [eos] if isinstance(eos, int) else list(eos or [])
        if self.tokenizer.eos_token_id is not None and self.tokenizer.eos_token_id not in self.eos_ids:
            self.eos_ids.append(self.tokenizer.eos_token_id)

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str:
        if not self.tokenizer.chat_template:
            raise ModelError(f"{self.name} has no chat template")
        return str(
            self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        )

    def generate(self, prompt: str, params: SamplingParams) -> Completion:
        return self.generate_ids(self.tokenize(prompt), params)

    def chat(self, messages: list[Message], params: SamplingParams) -> Completion:
        # A rendered chat template holds every special token it wants (as apply_chat_template's
        # own tokenize=True path assumes), so nothing is added.
        return self.generate_ids(self.tokenize(self.render_chat(messages), add_special=False), params)

    def generate_ids(self, ids: list[int], params: SamplingParams) -> Completion:
        import torch

        input_ids = torch.tensor([ids], device=self.device)
        kwargs: dict[str, Any] = {
            "max_new_tokens": params.max_tokens,
            "eos_token_id": self.eos_ids,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_ids[0],
            "repetition_penalty": params.repeat_penalty,
        }
        if params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p)
            if params.top_k:
                kwargs["top_k"] = params.top_k
            if params.seed is not None:
                torch.manual_seed(params.seed)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(input_ids, attention_mask=torch.ones_like(input_ids), **kwargs)
        seconds = time.perf_counter() - t0
        new = out[0, len(ids) :].tolist()
        generated = len(new)
        finish = "length"
        if new and new[-1] in self.eos_ids:
            new, finish = new[:-1], "stop"
        text = self.tokenizer.decode(new, skip_special_tokens=True)
        for s in params.stop:
            if s and s in text:
                text, finish = text[: text.index(s)], "stop"
        return Completion(text, finish, len(ids), generated, seconds)


def load_engine(spec: str) -> Engine:
    """Load a model by name or path. HF checkpoints run with transformers."""
    resolved = resolve_model(spec, want="hf")
    return TransformersEngine(str(resolved.path), name=resolved.name)
