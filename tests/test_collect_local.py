"""Collect with a real teacher: `distill4all serve` started by the stage itself (no base_url), on
the tiny random model and on the embedded SmolLM2. Real model, real HTTP, real store."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from conftest import run_cli, write_config, write_jsonl


def local_config(tmp_path: Path, model: str, prompts: list[str], **teacher: object) -> Path:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    data = {
        "name": "local",
        "run_dir": "run",
        "collect": {
            "sources": [{"name": "qs", "path": "prompts.jsonl"}],
            "teachers": [{"name": "local", "model": model, "max_tokens": 12, "temperature": 0.0, **teacher}],
        },
    }
    return write_config(tmp_path / "run.yaml", data)


def answers(run_dir: Path) -> list[tuple[str, str, str, int]]:
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        rows = db.execute(
            "SELECT p.text, r.text, r.finish_reason, r.completion_tokens FROM responses r "
            "JOIN prompts p ON p.id = r.prompt_id ORDER BY p.text"
        ).fetchall()
    finally:
        db.close()
    return [(str(a), str(b or ""), str(c), int(d or 0)) for a, b, c, d in rows]


def test_collect_from_a_served_tiny_model(tmp_path: Path, tiny_model: Path) -> None:
    prompts = [f"Tell me about item {i}." for i in range(6)]
    config = local_config(tmp_path, str(tiny_model), prompts, concurrency=2)
    r = run_cli("run", config, "--no-report")
    assert r.code == 0, r.output
    got = answers(tmp_path / "run")
    assert [g[0] for g in got] == sorted(prompts)  # each prompt answered exactly once
    assert all(g[2] in ("stop", "length") and 0 < g[3] <= 12 for g in got)
    # The server log is kept with the stage, and the rerun is a no-op that sends nothing.
    assert (tmp_path / "run" / "collect").is_dir()
    again = run_cli("run", config, "--no-report")
    assert again.code == 0 and "skip" in again.output.lower(), again.output
    assert answers(tmp_path / "run") == got


@pytest.mark.slow
def test_collect_from_the_real_smollm2_gives_what_the_model_gives(tmp_path: Path) -> None:
    """Through the stage, the local server and the HTTP client, each answer is exactly the model's
    own greedy answer to the same chat: nothing is lost or added on the way."""
    from distill4all.runtime.engine import SamplingParams, load_engine

    prompts = ["What is the capital of France?", "Name a primary colour."]
    config = local_config(tmp_path, "smollm2-135m-instruct", prompts, concurrency=1)
    r = run_cli("run", config, "--no-report")
    assert r.code == 0, r.output
    got = {p: text for p, text, _, _ in answers(tmp_path / "run")}
    engine = load_engine("smollm2-135m-instruct")
    try:
        for p in prompts:
            direct = engine.chat([{"role": "user", "content": p}], SamplingParams(max_tokens=12, temperature=0.0))
            assert got[p] == direct.text and len(direct.text.split()) >= 2
    finally:
        engine.close()
    out = tmp_path / "pairs.jsonl"
    assert run_cli("collect", "export", config, out).code == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(row["prompt"] for row in rows) == sorted(prompts) and {row["source"] for row in rows} == {"qs"}


def test_faults_in_front_of_a_served_tiny_model_are_survived_exactly_once(tmp_path: Path, tiny_model: Path) -> None:
    """The tiny model's own `serve`, behind the fault-injecting proxy: 429s with Retry-After, 5xx,
    answers slower than the timeout, dropped connections and malformed JSON, and still every
    prompt is answered exactly once, by the model."""
    from distill4all.teacher.local import local_teacher
    from servers import Background, FaultProxy

    prompts = [f"Say something about number {i}." for i in range(24)]
    with local_teacher(str(tiny_model), log_path=tmp_path / "serve.log") as (url, model_id):
        proxy = FaultProxy(url.removesuffix("/v1"), rate=0.4, seed=5, slow_s=3.0)
        front = Background(proxy.handle)
        try:
            config = local_config(tmp_path, model_id, prompts, base_url=front.url, concurrency=4,
                                  timeout_s=1.5, max_retries=20)  # fmt: skip
            r = run_cli("run", config, "--no-report")
        finally:
            front.stop()
    assert r.code == 0, r.output
    assert {"429", "500", "503", "drop", "malformed"} <= set(proxy.injected)
    got = answers(tmp_path / "run")
    assert [g[0] for g in got] == sorted(prompts)
    assert all(0 < g[3] <= 12 for g in got)
