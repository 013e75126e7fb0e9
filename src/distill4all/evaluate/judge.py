"""Pairwise LLM-judge win rate against a baseline, both orders, ties counted.

Everything goes through the shared teacher machinery on a store of its own (`eval/judge.sqlite`,
so nothing here mixes with the training data): each model answers the instructions as a "teacher"
(a local model is served on 127.0.0.1, a remote one is called), then the judge answers one prompt
per (item, order). The same client, limiter, retries, budget and exactly-once ledger as
collection: a killed judge run resumes without paying twice.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.config import JudgeConfig, Price, TeacherConfig
from distill4all.evaluate.data import Item
from distill4all.evaluate.runner import ModelSpec
from distill4all.layout import EvalLayout
from distill4all.store import Store, responses, tasks
from distill4all.store.prompts import Prompt, prompt_id
from distill4all.teacher.answers import answer_pending
from distill4all.teacher.connect import connect
from distill4all.teacher.cost import Budget

JUDGE_SYSTEM = (
    "You are an impartial judge. Compare two AI assistants' answers to the user's instruction. "
    "Judge helpfulness, correctness and relevance; do not let answer length, the assistants' order "
    "or their names sway you. After a short explanation, give your verdict on the last line as "
    "exactly one of: [[A]] if assistant A is better, [[B]] if assistant B is better, [[C]] for a tie."
)

JUDGE_PROMPT = """[Instruction]
{instruction}

[The start of assistant A's answer]
{a}
[The end of assistant A's answer]

[The start of assistant B's answer]
{b}
[The end of assistant B's answer]"""

_VERDICT = re.compile(r"\[\[\s*([ABC])\s*\]\]")


def parse_verdict(text: str) -> str:
    """'A', 'B', 'C' (tie) — the last [[X]] in the judge's answer — or '?' when there is none."""
    found = _VERDICT.findall(text or "")
    return found[-1] if found else "?"


def item_prompt(item: Item) -> str:
    return item.instruction if not item.input else f"{item.instruction}\n\n{item.input}"


@dataclass
class WinRate:
    model: str
    baseline: str
    n: int
    wins: int
    losses: int
    ties: int
    inconsistent: int  # the verdict flipped with the order: counted as a tie
    invalid: int  # no verdict in an answer: counted as a tie
    win_rate: float  # (wins + ties / 2) / n

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(
    store: Store, teacher: TeacherConfig, log_dir: Path, price: Price, budget: Budget, batch_size: int = 16
) -> None:
    async def go() -> None:
        with connect(teacher, log_dir) as (client, model_id):
            try:
                await answer_pending(store, teacher, client, price, budget, model=model_id, batch_size=batch_size)
            finally:
                await client.aclose()

    if tasks.count_pending(store, teacher.name):
        asyncio.run(go())


def generate_answers(
    store: Store, items: list[Item], answerer: TeacherConfig, log_dir: Path, budget: Budget
) -> dict[str, str]:
    """Each instruction answered once by `answerer`; item id → answer text."""
    prompts = [Prompt(prompt_id("eval", item_prompt(it)), "eval", item_prompt(it), {"item": it.id}) for it in items]
    tasks.add_prompts(store, prompts, [(answerer.name, 1)])
    tasks.requeue(store)
    _run(store, answerer, log_dir, Price(input=0, output=0), budget)
    return {meta["item"]: text or "" for meta, text in responses.texts_with_prompt_meta(store, answerer.name)}


def _pairs(items: list[Item], model: dict[str, str], base: dict[str, str]) -> Iterator[tuple[Item, str, str, str]]:
    for it in items:
        if it.id in model and it.id in base:
            yield it, "model-first", model[it.id], base[it.id]
            yield it, "baseline-first", base[it.id], model[it.id]


def judge(
    store: Store,
    items: list[Item],
    model: tuple[str, dict[str, str]],
    baseline: tuple[str, dict[str, str]],
    judge_teacher: TeacherConfig,
    price: Price,
    log_dir: Path,
    budget: Budget,
) -> WinRate:
    """Ask the judge about every item in both orders and count the outcomes for `model`."""
    (model_name, answers), (base_name, base_answers) = model, baseline
    prompts, meta = [], {}
    for it, order, a, b in _pairs(items, answers, base_answers):
        text = JUDGE_PROMPT.format(instruction=item_prompt(it), a=a, b=b)
        pid = prompt_id(f"judge:{model_name}:{base_name}", text)
        prompts.append(Prompt(pid, f"judge:{model_name}:{base_name}", text, {"item": it.id, "order": order}))
        meta[pid] = (it.id, order)
    tasks.add_prompts(store, prompts, [(judge_teacher.name, 1)])
    tasks.requeue(store)
    _run(store, judge_teacher, log_dir, price, budget)

    verdicts: dict[str, dict[str, str]] = {}
    for pid, reply in responses.texts(store, judge_teacher.name):
        if pid in meta:
            item_id, order = meta[pid]
            verdicts.setdefault(item_id, {})[order] = parse_verdict(reply or "")
    return count(model_name, base_name, verdicts)


def count(model: str, baseline: str, verdicts: dict[str, dict[str, str]]) -> WinRate:
    """Per item, the model's result over both orders: it wins when it is preferred in one order and
    not beaten in the other; a flip between orders (position bias) or a missing verdict is a tie."""
    wins = losses = ties = inconsistent = invalid = 0
    for v in verdicts.values():
        first, second = v.get("model-first", "?"), v.get("baseline-first", "?")
        if "?" in (first, second):
            invalid += 1
            ties += 1
            continue
        # in 'model-first' the model is A; in 'baseline-first' it is B
        score = {"A": 1, "B": -1, "C": 0}[first] + {"B": 1, "A": -1, "C": 0}[second]
        if score > 0:
            wins += 1
        elif score < 0:
            losses += 1
        else:
            ties += 1
            if first != "C" and second != "C":
                inconsistent += 1
    n = wins + losses + ties
    return WinRate(model, baseline, n, wins, losses, ties, inconsistent, invalid, (wins + ties / 2) / n if n else 0.0)


def win_rates(
    cfg: JudgeConfig,
    items: list[Item],
    models: list[ModelSpec],
    baseline: str,
    *,
    price: Price | None,
    folder: EvalLayout,
) -> tuple[list[dict[str, Any]], float]:
    """Every model's answers, then the judge's verdicts against `baseline`; the win rates and
    what the judge cost. The requests' ledger is `folder.judge_store`, so a killed run resumes."""
    for path in folder.judge_files:
        atomic.claim(path)
    store = Store(folder.judge_store)
    budget = Budget(cfg.max_cost_usd)
    try:
        answers = {}
        for m in models:
            answerer = TeacherConfig(
                name=f"answer-{m.label}", model=m.spec, max_tokens=cfg.answer_max_tokens, concurrency=1
            )
            answers[m.label] = generate_answers(store, items, answerer, folder.dir, budget)
        rates = [
            judge(
                store,
                items,
                (m.label, answers[m.label]),
                (baseline, answers[baseline]),
                cfg.judge,
                price or Price(input=0, output=0),
                folder.dir,
                budget,
            )
            for m in models
            if m.label != baseline
        ]
        return [r.as_dict() for r in rates], budget.spent_usd
    finally:
        store.close()
