"""The stage runner: run, skip, resume after SIGKILL, --force, staleness, locking, status."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from conftest import cli_command, count_responses, kill_at_answer_counts, run_cli


def test_run_then_skip_then_force(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=5)
    r = run_cli("run", config)
    assert r.code == 0, r.output
    run_dir = tmp_path / "run"
    assert "run directory: " + str(run_dir) in r.stdout
    pairs = [json.loads(line) for line in (run_dir / "collect" / "pairs.jsonl").read_text().splitlines()]
    assert sorted(p["prompt"] for p in pairs) == sorted(f"question number {i}?" for i in range(5))
    assert all(p["source"] == "qs" for p in pairs)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["collect"]
    assert stage["status"] == "done" and stage["counts"]["answered"] == 5 and stage["attempts"] == 1
    assert "collect/pairs.jsonl" in stage["artifacts"]
    assert str(tmp_path / "prompts.jsonl") in manifest["inputs"]
    assert manifest["environment"]["packages"]["torch"].startswith("2.")
    first_run_id = stage["run_id"]
    mtime = (run_dir / "collect" / "pairs.jsonl").stat().st_mtime_ns

    r = run_cli("run", config)
    assert r.code == 0 and "skipped" in r.stdout
    assert (run_dir / "collect" / "pairs.jsonl").stat().st_mtime_ns == mtime  # not rewritten

    r = run_cli("run", config, "--force")
    assert r.code == 0, r.output
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["stages"]["collect"]["run_id"] != first_run_id
    assert manifest["stages"]["collect"]["counts"]["answered"] == 5
    assert count_responses(run_dir) == 5  # redone, not duplicated


def test_changed_config_or_input_needs_force(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=3)
    assert run_cli("run", config).code == 0
    data = yaml.safe_load(config.read_text())
    data["collect"]["teachers"][0]["max_tokens"] = 5
    config.write_text(yaml.safe_dump(data))
    r = run_cli("run", config)
    assert r.code == 2 and "finished with other settings" in r.stderr and "--force" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    data["collect"]["teachers"][0]["max_tokens"] = 8
    config.write_text(yaml.safe_dump(data))
    assert run_cli("run", config).code == 0  # back to the settings it finished with: skipped
    with open(tmp_path / "prompts.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "a new one"}) + "\n")
    r = run_cli("run", config)
    assert r.code == 2 and "input files changed" in r.stderr
    assert count_responses(tmp_path / "run") == 3  # nothing lost


def test_sigkill_mid_stage_then_rerun_resumes_exactly_once(make_run: Callable[..., Path], tmp_path: Path) -> None:
    n = 60
    config = make_run(n=n, delay=0.05, batch_size=2)
    run_dir = tmp_path / "run"
    kills = kill_at_answer_counts(cli_command("--quiet", "run", config), run_dir, (6, 20), poll=0.05)
    assert kills == 2, "the stage finished before it could be killed; make it slower"
    assert 0 < count_responses(run_dir) < n

    r = run_cli("status", run_dir)
    assert r.code == 0 and "interrupted" in r.stdout

    r = run_cli("run", config)
    assert r.code == 0, r.output
    assert "resumed" in r.stdout
    db = sqlite3.connect(run_dir / "store.sqlite")
    per_prompt = db.execute("SELECT prompt_id, COUNT(*) FROM responses GROUP BY prompt_id").fetchall()
    assert len(per_prompt) == n and all(c == 1 for _, c in per_prompt)  # each answered exactly once
    assert db.execute("SELECT COUNT(*) FROM tasks WHERE state != 'done'").fetchone()[0] == 0
    attempts = db.execute("SELECT attempts FROM stages WHERE name = 'collect'").fetchone()[0]
    assert attempts == 3
    assert len((run_dir / "collect" / "pairs.jsonl").read_text().splitlines()) == n
    assert not list(run_dir.rglob("*.tmp-*"))


def test_secrets_never_reach_manifest_store_or_output(make_run: Callable[..., Path], tmp_path: Path) -> None:
    secret = "sk-live-DO-NOT-LEAK-42"
    config = make_run(n=2)
    data = yaml.safe_load(config.read_text())
    data["collect"]["teachers"][0]["api_key"] = "${D4A_SECRET}"  # sent to the stub teacher as its bearer key
    config.write_text(yaml.safe_dump(data))
    r = run_cli("run", config, env={"D4A_SECRET": secret})
    assert r.code == 0, r.output
    assert secret not in r.output
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert secret.encode() not in f.read_bytes(), f
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["config"]["collect"]["teachers"][0]["api_key"] == "${D4A_SECRET}"


def test_cli_errors_for_stages_and_run_dirs(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=2)
    r = run_cli("run", config, "--from", "distil")
    assert r.code == 2 and r.stderr.strip() == (
        "error: unknown stage 'distil'; stages are: collect, curate, train, export, eval"
    )
    r = run_cli("run", config, "--from", "train")
    assert r.code == 2 and "no configured stage" in r.stderr
    r = run_cli("status", tmp_path / "missing")
    assert r.code == 2 and r.stderr.strip() == f"error: run directory not found: {tmp_path / 'missing'}"
    (tmp_path / "not-a-run").mkdir()
    r = run_cli("status", tmp_path / "not-a-run")
    assert r.code == 2 and "not a run directory" in r.stderr
    bad_source = make_run(n=2)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    r = run_cli("run", bad_source)
    assert r.code == 2 and f"{tmp_path / 'prompts.jsonl'}:2: not valid JSON" in r.stderr


def test_one_runner_per_run_dir(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=40, delay=0.1)
    run_dir = tmp_path / "run"
    p = subprocess.Popen(cli_command("--quiet", "run", config), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while count_responses(run_dir) < 1 and time.time() < deadline:
            time.sleep(0.05)
        r = run_cli("run", config)
        assert r.code == 2 and "in use by pid" in r.stderr
        r = run_cli("status", run_dir)  # reading is fine while it runs
        assert r.code == 0 and "running" in r.stdout
    finally:
        p.kill()
        p.wait()


def test_a_run_dir_belongs_to_one_run(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=1)
    assert run_cli("run", config).code == 0
    data = yaml.safe_load(config.read_text())
    data["name"] = "other"
    config.write_text(yaml.safe_dump(data))
    r = run_cli("run", config)
    assert r.code == 2 and "belongs to run 't'" in r.stderr
