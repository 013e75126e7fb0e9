"""No secret reaches a file or the terminal: not the api_key a teacher echoes back in an error,
nor the password of a `user:password@` base_url, which is sent as HTTP Basic auth. Through the
real CLI, against a teacher on 127.0.0.1, reading every file the run wrote."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import CliResult, cli_command, count_responses, write_config, write_jsonl
from servers import Background, FaultProxy, StubTeacher

PASSWORD = "PW-s3cret-9"
KEY = "sk-live-Very-Secret-1"


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> CliResult:
    """The CLI in a subprocess, killed past `timeout`: a run that hangs fails the test, not CI."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    try:
        p = subprocess.run(cli_command(*args), capture_output=True, text=True, env=full_env, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"distill4all {' '.join(map(str, args))} still running after {timeout} s: {e.stderr!r}")
    return CliResult(p.returncode, p.stdout, p.stderr)


def config(tmp_path: Path, base_url: str, prompts: list[str], **teacher: Any) -> Path:
    write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in prompts])
    t = {"name": "api", "model": "m", "base_url": base_url, "max_tokens": 8, "concurrency": 4, "max_retries": 0}
    data = {
        "name": "s",
        "run_dir": "run",
        "collect": {"sources": [{"name": "qs", "path": "prompts.jsonl"}], "teachers": [t | teacher]},
    }
    return write_config(tmp_path / "run.yaml", data)


def leaks(secret: str, run_dir: Path, *outputs: CliResult) -> list[str]:
    """Every file of the run, and every output, that holds the secret."""
    found = [str(f) for f in run_dir.rglob("*") if f.is_file() and secret.encode() in f.read_bytes()]
    return found + [f"output {i}" for i, r in enumerate(outputs) if secret in r.output]


def one_error_line(r: CliResult) -> str:
    lines = r.stderr.strip().splitlines()
    assert r.code == 2 and lines and lines[-1].startswith("error: "), r.output
    assert [line for line in lines if line.startswith("error")] == [lines[-1]], r.output
    return lines[-1]


def status_outputs(run_dir: Path) -> list[CliResult]:
    return [cli("status", run_dir), cli("status", run_dir, "--json")]


@pytest.fixture
def basic_teacher() -> Iterator[tuple[Background, str]]:
    """A teacher that wants Basic `user:<PASSWORD>` and quotes whatever Authorization it gets."""
    server = Background(StubTeacher(basic=("user", PASSWORD), echo=True).handle)
    yield server, f"127.0.0.1:{server.port}"
    server.stop()


def test_a_url_password_is_masked_in_a_refusal(tmp_path: Path, basic_teacher: tuple[Background, str]) -> None:
    """A 401 for the wrong password: the error line, the store, the manifest and `status` name the
    URL as user:***@, and the Basic credentials the teacher quotes back are masked too."""
    _, host = basic_teacher
    wrong = PASSWORD + "-wrong"
    r = cli("collect", "run", config(tmp_path, f"http://user:{wrong}@{host}/v1", ["one?", "two?"]))
    line = one_error_line(r)
    assert "refused the request: HTTP 401: Incorrect API key provided" in line and f"http://***@{host}/v1" in line
    assert "(you sent 'Basic ***')" in line  # the teacher's echo of base64(user:password)
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "HTTP 401" in manifest["stages"]["collect"]["error"]
    assert leaks(wrong, run_dir, r, *status_outputs(run_dir)) == []


def test_a_url_password_is_basic_auth_and_masked_when_no_logprobs_come(
    tmp_path: Path, basic_teacher: tuple[Background, str]
) -> None:
    _, host = basic_teacher
    url = f"http://user:{PASSWORD}@{host}/v1"
    r = cli("collect", "run", config(tmp_path / "a", url, ["one?", "two?"], logprobs=5))
    line = one_error_line(r)
    assert "returned no logprobs" in line and f"http://***@{host}/v1" in line, line
    assert leaks(PASSWORD, tmp_path / "a" / "run", r, *status_outputs(tmp_path / "a" / "run")) == []

    r = cli("collect", "run", config(tmp_path / "b", url, [f"question {i}?" for i in range(6)]))
    assert r.code == 0, r.output  # the credentials authenticate every request
    assert count_responses(tmp_path / "b" / "run") == 6
    assert leaks(PASSWORD, tmp_path / "b" / "run", r) == []


def test_credentials_in_the_url_beside_an_api_key_are_refused_before_anything_is_sent(
    tmp_path: Path, basic_teacher: tuple[Background, str]
) -> None:
    """Two Authorizations cannot go in one request: refused at config check, not a run that fails
    every request (or, at 40 prompts and concurrency 4, never ends)."""
    upstream, _ = basic_teacher
    proxy = FaultProxy(upstream.url.removesuffix("/v1"), rate=0.0)  # counts what arrives
    server = Background(proxy.handle)
    try:
        cfg = config(tmp_path, f"http://user:{PASSWORD}@127.0.0.1:{server.port}/v1",
                     [f"question {i}?" for i in range(40)], api_key="${D4A_KEY}")  # fmt: skip
        checked = cli("config", "check", cfg, env={"D4A_KEY": KEY})
        ran = cli("run", cfg, env={"D4A_KEY": KEY}, timeout=60)
    finally:
        server.stop()
    for r in (checked, ran):
        line = one_error_line(r)
        assert "base_url carries user:password@" in line and "api_key is set" in line, line
        assert PASSWORD not in r.output and KEY not in r.output
    assert proxy.arrivals == []


def test_a_key_the_teacher_echoes_is_masked_everywhere(tmp_path: Path) -> None:
    """A 400, a 500 and a 401 that quote the key sent: the terminal, tasks.last_error, the stage's
    error in the store and the manifest, and `status` (table and JSON) show *** instead."""
    server = Background(StubTeacher(api_key=KEY, echo=True).handle)
    try:
        cfg = config(tmp_path, server.url, ["ECHO-400 one", "ECHO-500 two", "fine three"], api_key="${D4A_KEY}")
        r = cli("collect", "run", cfg, env={"D4A_KEY": KEY})
        line = one_error_line(r)
        assert "1 answers failed for reasons that may pass" in line and "(you sent 'Bearer ***')" in line, line
        db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
        errors = sorted(e for (e,) in db.execute("SELECT last_error FROM tasks WHERE last_error IS NOT NULL"))
        db.close()
        assert errors == [
            "HTTP 400: this prompt is rejected (you sent 'Bearer ***')",
            "gave up after 1 attempts: HTTP 500: this prompt is rejected (you sent 'Bearer ***')",
        ]
        outputs = [r, *status_outputs(tmp_path / "run")]
        wrong = "sk-wrong-Very-Secret-2"
        refused = cli("collect", "run", cfg, env={"D4A_KEY": wrong})
        traced = cli("--debug", "collect", "run", cfg, env={"D4A_KEY": wrong})  # the traceback is masked too
    finally:
        server.stop()
    assert "HTTP 401: Incorrect API key provided (you sent 'Bearer ***')" in one_error_line(refused)
    assert traced.code == 2 and "Traceback" in traced.stderr and "TeacherRefused" in traced.stderr
    outputs += [refused, traced, *status_outputs(tmp_path / "run")]
    assert leaks(KEY, tmp_path / "run", *outputs) == [] and leaks(wrong, tmp_path / "run", *outputs) == []


def test_every_teachers_secrets_are_known_to_redaction_once_the_config_loads(tmp_path: Path) -> None:
    """The judge's api_key and a URL's password (as written, percent-encoded, and as the Basic
    credentials made of it) are masked in any error text once the config that holds them loads."""
    from distill4all.config import load_config
    from distill4all.redact import redact

    def load(judge: dict[str, Any], env: dict[str, str]) -> None:
        data = {"name": "j", "run_dir": "run", "eval": {"data": ["items.jsonl"], "include": [],
                "judge": {"judge": {"name": "judge", "model": "j"} | judge}}}  # fmt: skip
        load_config(write_config(tmp_path / "run.yaml", data), env=env)

    load({"base_url": "https://judge.example/v1", "api_key": "${JUDGE}"}, {"JUDGE": "jk-Judge-Secret-7"})
    assert redact("HTTP 401: bad key jk-Judge-Secret-7.") == "HTTP 401: bad key ***."
    load({"base_url": "https://judge:p%40ss-Judge-8@judge.example/v1"}, {})
    basic = "anVkZ2U6cEBzcy1KdWRnZS04"  # base64 of judge:p@ss-Judge-8
    said = (
        f"no access for p%40ss-Judge-8 (p@ss-Judge-8, Basic {basic}) at https://judge:p%40ss-Judge-8@judge.example/v1"
    )
    assert redact(said) == "no access for *** (***, Basic ***) at https://***@judge.example/v1"
