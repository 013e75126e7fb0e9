"""The demo config end to end, smaller: SmolLM2 served locally answers 40 prompts of each demo
source, curation flags the templated P3-style source, the tiny model is LoRA-trained, exported to
Q4_0 and evaluated; the run is SIGKILLed inside each stage and rerun until it finishes. Then every
count must add up, nothing may be duplicated, and the report page must render in Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import EVAL_SET, REPO, chromium_page, cli_command, run_cli, store_query, write_config

pytestmark = pytest.mark.slow

PER_SOURCE = 40
EVAL_ITEMS = 8


def demo_config(tmp_path: Path, tiny_model: Path) -> Path:
    data: dict[str, Any] = yaml.safe_load((REPO / "examples" / "demo.yaml").read_text())
    data["run_dir"] = str(tmp_path / "run")
    for source in data["collect"]["sources"]:
        source["path"] = str(REPO / "examples" / source["path"])
        source["limit"] = PER_SOURCE
    data["collect"]["teachers"][0]["max_tokens"] = 24
    data["collect"]["batch_size"] = 4
    data["train"] |= {"base_model": str(tiny_model), "epochs": 1, "max_length": 128, "checkpoint_every": 2,
                      "eval_every": 2}  # fmt: skip
    # the tiny student cannot read SmolLM2's tokens: it distils from itself, a local teacher
    data["train"]["distill"]["source"] = "local"
    data["eval"]["data"] = [str(EVAL_SET), str(REPO / "examples" / "data" / "self_instruct_sample.jsonl")]
    data["eval"]["limit"] = EVAL_ITEMS
    return write_config(tmp_path / "demo.yaml", data)


def stage_running(run_dir: Path, stage: str) -> bool:
    return store_query(run_dir, f"SELECT status FROM stages WHERE name = '{stage}'") == [("running",)]


def run_and_kill(config: Path, when: Callable[[], bool], what: str) -> None:
    """Start the whole run; SIGKILL its main process as soon as `when()` holds."""
    p = subprocess.Popen(cli_command("--quiet", "run", config, "--no-report"), stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 600
        while not when():
            assert p.poll() is None, f"the run ended before {what}: {p.stderr.read().decode()[-2000:]}"  # type: ignore[union-attr]
            assert time.time() < deadline, f"timed out waiting for {what}"
            time.sleep(0.1)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        # The local teacher dies with its parent (PDEATHSIG); make sure of it before the next start.
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)


def test_demo_killed_in_every_stage_finishes_with_everything_counted(tmp_path: Path, tiny_model: Path) -> None:
    config = demo_config(tmp_path, tiny_model)
    run_dir = tmp_path / "run"
    n_prompts = 3 * PER_SOURCE

    run_and_kill(config, lambda: len(store_query(run_dir, "SELECT id FROM responses")) >= 30, "30 answers")
    run_and_kill(config, lambda: stage_running(run_dir, "curate"), "curate to start")
    run_and_kill(config, lambda: bool(list((run_dir / "train" / "checkpoints").glob("step-*"))), "a checkpoint")
    run_and_kill(config, lambda: stage_running(run_dir, "export"), "export to start")
    run_and_kill(config, lambda: any((run_dir / "eval").glob("perplexity-*.jsonl")), "eval to score")

    r = run_cli("run", config)
    assert r.code == 0, r.output
    assert "resumed" in r.stdout

    # collect: every prompt answered exactly once, nothing left in flight
    per_prompt = store_query(run_dir, "SELECT prompt_id, COUNT(*) FROM responses GROUP BY prompt_id")
    assert len(per_prompt) == n_prompts and all(c == 1 for _, c in per_prompt)
    assert store_query(run_dir, "SELECT COUNT(*) FROM tasks WHERE state != 'done'") == [(0,)]
    # curate: one decision per answer; the templated source flagged and dropped
    assert store_query(run_dir, "SELECT COUNT(*) FROM decisions") == [(n_prompts,)]
    report = json.loads((run_dir / "curate" / "report.json").read_text())
    flagged = {s["source"] for s in report["sources"] if s["homogeneous"]}
    assert flagged == {"p3"}
    kept = store_query(run_dir, "SELECT COUNT(*) FROM decisions WHERE kept = 1")[0][0]
    train_rows = [json.loads(line) for line in (run_dir / "curate" / "train.jsonl").read_text().splitlines()]
    assert 0 < len(train_rows) <= kept and all(row["source"] != "p3" for row in train_rows)
    # train: the adapter was saved, non-empty, after the steps one epoch takes
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stages = manifest["stages"]
    assert all(stages[s]["status"] == "done" for s in ("collect", "curate", "train", "export", "eval"))
    assert stages["collect"]["attempts"] == 2 and stages["eval"]["attempts"] == 2
    # train: the demo's student, pruned from the teacher and trained in full with KD
    weights = run_dir / "train" / "model" / "model.safetensors"
    assert weights.is_file() and weights.stat().st_size > 1000
    student = json.loads((run_dir / "train" / "student" / "prune.json").read_text())
    assert len(student["dropped"]) >= 1
    assert stages["train"]["counts"]["distill_top_k"] == 64 and stages["train"]["counts"]["distill_source"] == "local"
    assert stages["collect"]["counts"]["logprob_tokens"] > 0  # SmolLM2 returned its top-64 all the same
    steps = [json.loads(line)["step"] for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(line)]  # fmt: skip
    assert steps == sorted(set(steps)), "a resumed step was logged twice"
    # export: a Q4_0 file that chats
    q4 = run_dir / "export" / "model-q4_0.gguf"
    assert q4.is_file()
    chat = subprocess.run(cli_command("chat", q4, "--max-tokens", "4"), input="hi\n", capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert chat.returncode == 0, chat.stderr
    # eval: every item scored once for each model
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    assert summary["items"] == EVAL_ITEMS
    for path in (run_dir / "eval").glob("perplexity-*.jsonl"):
        ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
        assert len(ids) == len(set(ids)) == EVAL_ITEMS, path.name
    assert (run_dir / "eval" / "figure3-faithful.png").is_file()
    assert not list(run_dir.rglob("*.tmp-*"))
    check_report_page(run_dir / "report" / "index.html", tmp_path)


def check_report_page(page_path: Path, tmp_path: Path) -> None:
    """The report renders in headless Chromium with no console errors, every section present, the
    data map's frame loaded, and a screenshot that is not blank."""
    from PIL import Image, ImageStat

    with chromium_page(900, allowed=("file:", "data:")) as (page, errors):
        page.goto(page_path.as_uri())
        page.wait_for_load_state("load")
        for section in ("funnel", "data", "train", "export", "eval", "student", "chats"):
            assert page.locator(f"section#{section}").count() == 1, section
        student = page.locator("section#student").inner_text()
        assert "pruned from 4 to 3 layers" in student and "gap closed" in student, student
        assert "Decode speed" in student and "tokens/s" in student, student
        data = page.locator("section#data").inner_text()
        assert data.count("yes") >= 1  # the homogeneous flag
        assert "fires on" in data and "Eval-set copies" in data and "eval items" in data, data
        page.frame_locator("iframe").locator("canvas").first.wait_for(timeout=30_000)
        map_frame = next(f for f in page.frames if f.url.endswith("curate/map.html"))
        map_frame.wait_for_function("window.__datamap !== undefined")
        drawn = map_frame.evaluate("window.__datamap")
        assert drawn["drawn"] == drawn["points"] > 0
        images = page.locator("img")
        assert images.count() >= 2
        assert all(images.nth(i).evaluate("i => i.naturalWidth > 0") for i in range(images.count()))
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
    assert errors == []
    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10, "the screenshot is blank"
