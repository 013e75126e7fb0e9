"""`--dry-run`: what collecting would cost, before anything is spent or written."""

from __future__ import annotations

from dataclasses import dataclass

from distill4all.collect.sources import read_source
from distill4all.config import CollectConfig
from distill4all.store import Store, responses
from distill4all.teacher.answers import build_messages
from distill4all.teacher.client import estimate_prompt_tokens
from distill4all.teacher.cost import cost_usd


@dataclass
class TeacherEstimate:
    teacher: str
    model: str
    requests: int
    prompt_tokens: int
    max_completion_tokens: int
    prompt_usd: float
    worst_usd: float  # every answer as long as max_tokens
    expected_usd: float  # answers as long as the ones already collected (else half of max_tokens)


def estimate(cfg: CollectConfig, run_seed: int, store: Store | None) -> list[TeacherEstimate]:
    prompts = [p for s in cfg.sources for p in read_source(s, run_seed=run_seed)]
    out = []
    for t in cfg.teachers:
        done: set[tuple[str, int]] = set()
        mean_completion = t.max_tokens / 2
        if store is not None:
            done = responses.answered(store, t.name)
            mean = responses.mean_completion_tokens(store, t.name)
            if mean is not None:
                mean_completion = mean
        todo = [(p, s) for p in prompts for s in range(t.samples) if (p.id, s) not in done]
        prompt_tokens = sum(estimate_prompt_tokens(build_messages(t, p.text)) for p, _ in todo)
        price = cfg.price_of(t)
        max_completion = len(todo) * t.max_tokens
        out.append(
            TeacherEstimate(
                teacher=t.name,
                model=t.model,
                requests=len(todo),
                prompt_tokens=prompt_tokens,
                max_completion_tokens=max_completion,
                prompt_usd=cost_usd(price, prompt_tokens, 0),
                worst_usd=cost_usd(price, prompt_tokens, max_completion),
                expected_usd=cost_usd(price, prompt_tokens, int(len(todo) * mean_completion)),
            )
        )
    return out
