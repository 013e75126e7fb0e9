"""OpenAI Batch API files: pending requests out as JSONL, batch results back into the ledger.

Batch jobs cost half; they return within 24 h. Each request's `custom_id` is
`<prompt_id>:<teacher>:<sample>`, so results map back to their task, and ingesting a results
file twice stores nothing twice. A teacher with `logprobs` asks for them in each request, and its
results' logprobs are stored with their answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from distill4all import atomic
from distill4all.config import CollectConfig
from distill4all.errors import DataError
from distill4all.records import given_reasoning, split_reasoning
from distill4all.store import Store, prompts, tasks
from distill4all.teacher.answers import build_body, build_messages
from distill4all.teacher.client import message_text, parse_logprobs, reported_usage
from distill4all.teacher.cost import cost_usd
from distill4all.teacher.usage import TokenCounter

BATCH_DISCOUNT = 0.5


def export_requests(store: Store, cfg: CollectConfig, teacher_name: str, out: Path) -> int:
    """Write every pending task of a teacher as a Batch API request line; return how many."""
    teacher = next((t for t in cfg.teachers if t.name == teacher_name), None)
    if teacher is None:
        raise DataError(f"no teacher named {teacher_name!r}; teachers: {', '.join(t.name for t in cfg.teachers)}")
    todo = tasks.unanswered(store, teacher.name)
    with atomic.output_file(out) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for task in todo:
            line = {
                "custom_id": f"{task.prompt_id}:{teacher.name}:{task.sample}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": build_body(teacher, task),
            }
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return len(todo)


def ingest_results(store: Store, cfg: CollectConfig, results: Path) -> dict[str, int]:
    """Read a Batch results JSONL into the ledger; counts of stored, already-stored and failed."""
    if not results.is_file():
        raise DataError(f"batch results file not found: {results}")
    teachers = {t.name: t for t in cfg.teachers}
    counters: dict[str, TokenCounter] = {}
    answers: list[tasks.Answer] = []
    failures: list[tasks.Failure] = []
    with open(results, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{results}:{lineno}"
            try:
                item = json.loads(line)
                pid, teacher_name, sample = str(item["custom_id"]).rsplit(":", 2)
                teacher = teachers[teacher_name]
            except (ValueError, KeyError) as e:
                raise DataError(f"{where}: not a batch result for this run ({type(e).__name__}: {e})") from None
            text = prompts.text_of(store, pid)
            if text is None:
                raise DataError(f"{where}: custom_id {item['custom_id']!r} names no prompt of this run")
            task = tasks.Task(pid, teacher_name, int(sample), text)
            response = item.get("response") or {}
            body = response.get("body") or {}
            if item.get("error") or response.get("status_code") != 200 or body.get("error"):
                err = item.get("error") or body.get("error") or {"message": f"status {response.get('status_code')}"}
                message = err.get("message", err) if isinstance(err, dict) else err
                failures.append(tasks.Failure(task, f"batch: {message}", permanent=False))
                continue
            try:
                choice = body["choices"][0]
                text = message_text(choice["message"])
                answer, reasoning, finish = split_reasoning(
                    text, given_reasoning(choice["message"]), str(choice.get("finish_reason") or "unknown")
                )
                if teacher_name not in counters:
                    counters[teacher_name] = TokenCounter.for_teacher(teacher)
                pt, ct, usage = counters[teacher_name].count(
                    build_messages(teacher, task.text), text, **reported_usage(body.get("usage"))
                )
                token_logprobs = parse_logprobs(choice, teacher.logprobs, text) if teacher.logprobs else None
                if teacher.logprobs and token_logprobs is None and teacher.require_logprobs:
                    raise DataError(
                        f"{where}: no logprobs, which teacher {teacher_name}'s setting logprobs: {teacher.logprobs} "
                        "asks for (a results file of requests exported without them?); set require_logprobs: "
                        "false to store the answers without them"
                    )
                answers.append(
                    tasks.Answer(
                        task,
                        str(body.get("model") or teacher.model),
                        answer or "",
                        finish or "unknown",
                        pt,
                        ct,
                        0.0,
                        cost_usd(cfg.price_of(teacher), pt, ct, discount=BATCH_DISCOUNT),
                        {"batch": True, "batch_request_id": item.get("id")}
                        | ({"logprobs": True, "top_logprobs": teacher.logprobs} if teacher.logprobs else {}),
                        token_logprobs,
                        usage,
                        reasoning,
                    )
                )
            except (KeyError, IndexError, TypeError, ValueError) as e:
                raise DataError(f"{where}: malformed response body ({type(e).__name__}: {e})") from None
    stored = tasks.record(store, answers, failures)
    return {"stored": stored, "already_stored": len(answers) - stored, "failed": len(failures)}
