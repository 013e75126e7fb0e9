"""reproduce reruns a recorded run into a new directory; diff shows what differs between runs."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from conftest import run_cli


def test_reproduce_gives_the_same_artifacts_and_diff_finds_changes(
    make_run: Callable[..., Path], tmp_path: Path
) -> None:
    config = make_run(n=4)
    assert run_cli("run", config).code == 0
    run_a, run_b = tmp_path / "run", tmp_path / "again"

    r = run_cli("reproduce", run_a / "manifest.json", "--run-dir", run_b)
    assert r.code == 0, r.output
    a = json.loads((run_a / "manifest.json").read_text())
    b = json.loads((run_b / "manifest.json").read_text())
    assert a["stages"]["collect"]["artifacts"] == b["stages"]["collect"]["artifacts"]  # same bytes
    assert a["config_hash"] != b["config_hash"]  # only the run directory differs

    r = run_cli("diff", run_a, run_b)
    assert r.code == 0, r.output
    assert "config.run_dir" in r.stdout and "artifacts" not in r.stdout and "counts" not in r.stdout

    # a change in the inputs shows, and blocks a faithful reproduction
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "something else"}\n')
    r = run_cli("reproduce", run_a, "--run-dir", tmp_path / "third")
    assert r.code == 2 and "has changed" in r.stderr
    r = run_cli("reproduce", run_a, "--run-dir", run_b)
    assert r.code == 2 and "not empty" in r.stderr
    r = run_cli("diff", run_a, tmp_path / "nowhere")
    assert r.code == 2 and "no manifest" in r.stderr
