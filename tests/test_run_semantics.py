"""One way to run a stage: fingerprints that cover every config value a stage reads, single-stage
commands through the runner, and stage failures that are not the user's (exit 1)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_command, run_cli, write_config, write_jsonl
from distill4all.config import LoadedConfig, RunConfig
from distill4all.run import load_stage

ITEMS = [
    {"id": "a", "instruction": "Say hello.", "input": "", "output": "Hello there, how are you?"},
    {"id": "b", "instruction": "Name a colour.", "input": "", "output": "Blue is a colour."},
]


def _loaded(data: dict[str, Any], tmp_path: Path) -> LoadedConfig:
    return LoadedConfig(RunConfig.model_validate(data), tmp_path / "run.yaml")


def _config(tmp_path: Path) -> dict[str, Any]:
    return {
        "name": "r",
        "run_dir": str(tmp_path / "run"),
        "collect": {
            "sources": [{"name": "qs", "path": str(tmp_path / "q.jsonl")}],
            "teachers": [{"name": "t", "model": "m", "base_url": "http://127.0.0.1:9/v1"}],
            "prices": {"m": {"input": 1.0, "output": 2.0}},
        },
        "curate": {},
        "train": {"base_model": "tiny", "template": "paper"},
        "export": {"quantizations": ["q4_0"]},
        "eval": {"data": str(tmp_path / "items.jsonl"), "judge": {"judge": {"model": "m", "base_url": "http://x/v1"}}},
    }


@pytest.mark.parametrize(
    ("stage", "key", "value", "stale"),
    [
        ("eval", ("collect", "prices"), {"m": {"input": 5.0, "output": 2.0}}, True),  # the judge's price
        ("eval", ("train", "template"), "chatml", True),
        ("export", ("train", "template"), "chatml", True),  # the chat template written into the GGUF
        ("eval", ("export", "quantizations"), ["q8_0"], True),  # which files it scores
        ("eval", ("curate", "validation_fraction"), 0.1, False),  # eval never reads it
        ("train", ("collect", "prices"), {"m": {"input": 5.0, "output": 2.0}}, False),
    ],
)
def test_a_stage_fingerprint_covers_what_it_reads_in_other_sections(
    tmp_path: Path, stage: str, key: tuple[str, str], value: Any, stale: bool
) -> None:
    before = _config(tmp_path)
    after = json.loads(json.dumps(before))
    after[key[0]][key[1]] = value
    reads = load_stage(stage).READS
    h0 = _loaded(before, tmp_path).stage_hash(stage, reads)
    h1 = _loaded(after, tmp_path).stage_hash(stage, reads)
    assert (h0 != h1) is stale


def test_changed_collect_prices_make_eval_stale_through_the_cli(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "items.jsonl", ITEMS)
    write_jsonl(tmp_path / "q.jsonl", [{"prompt": "hi"}])
    data = _config(tmp_path)
    data["run_dir"] = "run"
    del data["curate"], data["train"], data["export"]
    data["eval"] = {"data": "items.jsonl", "include": [], "models": [{"name": "tiny", "model": "tiny"}],
                    "baseline": None, "metrics": ["conditioned"]}  # fmt: skip
    config = write_config(tmp_path / "run.yaml", data)
    r = run_cli("run", config, "--from", "eval", "--no-report")
    assert r.code == 0, r.output
    assert run_cli("run", config, "--from", "eval", "--no-report").code == 0  # unchanged: skipped
    data["collect"]["prices"]["m"]["input"] = 3.0
    write_config(config, data)
    r = run_cli("run", config, "--from", "eval", "--no-report")
    assert r.code == 2 and "stage 'eval' finished with other settings" in r.stderr, r.output
    r = run_cli("run", config, "--from", "eval", "--no-report", "--force")
    assert r.code == 0, r.output


def test_single_stage_export_goes_through_the_runner(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("--quiet", "export", "tiny", "-o", out, "--quant", "q8_0", "--no-report")
    assert r.code == 0, r.output
    assert str(out / "model-q8_0.gguf") in r.stdout
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["export"]["status"] == "done"
    assert set(manifest["stages"]["export"]["artifacts"]) == {
        "model-f16.gguf", "model-q8_0.gguf", "model-f16.Modelfile", "model-q8_0.Modelfile", "gpt4all.json", "README.md",
    }  # fmt: skip
    assert (out / "export.yaml").is_file() and not (out / "export.json").exists()
    r = run_cli("export", "tiny", "-o", out, "--quant", "q8_0", "--no-report")
    assert r.code == 0 and "export: done, skipped" in r.stderr
    r = run_cli("export", "tiny", "-o", out, "--quant", "q4_0", "--no-report")
    assert r.code == 2 and "rerun with --force to redo it" in r.stderr and "--from" not in r.stderr
    r = run_cli("status", out)
    assert r.code == 0 and "done" in r.stdout
    # Files a user put there themselves are never overwritten.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model-f16.gguf").write_bytes(b"mine")
    r = run_cli("export", "tiny", "-o", foreign, "--no-report")
    assert r.code == 2 and "already holds GGUF files" in r.stderr
    assert (foreign / "model-f16.gguf").read_bytes() == b"mine"


def test_collect_run_is_the_collect_stage_through_the_runner(make_run: Any, tmp_path: Path) -> None:
    config = make_run(n=3)
    r = run_cli("collect", "run", config)
    assert r.code == 0, r.output
    assert (
        "collect: ran, prompts 3" in r.stdout and f"pairs: {tmp_path / 'run' / 'collect' / 'pairs.jsonl'}" in r.stdout
    )
    assert run_cli("collect", "run", config).stdout.startswith("collect: skipped")
    r = run_cli("collect", "run", config, "--max-cost", "0.5")  # a per-invocation budget, not a setting
    assert r.code == 0 and "collect: skipped" in r.stdout


def test_reproducing_a_one_stage_export_writes_into_the_new_run_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("--quiet", "export", "tiny", "-o", out, "--quant", "q8_0", "--no-report").code == 0
    mtime = (out / "model-q8_0.gguf").stat().st_mtime_ns
    again = tmp_path / "again"
    r = run_cli("--quiet", "reproduce", out, "--run-dir", again)
    assert r.code == 0, r.output
    assert (again / "model-q8_0.gguf").is_file() and (again / "manifest.json").is_file()
    assert (out / "model-q8_0.gguf").stat().st_mtime_ns == mtime  # the recorded run is left alone
    r = run_cli("diff", out, again)
    assert r.code == 0 and "artifacts" not in r.stdout, r.stdout  # the same files, byte for byte


def _worker_pids(marker: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"distill4all.train.worker" in cmdline and marker.encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.slow
def test_a_crashed_train_worker_is_an_internal_error_and_the_stage_failed(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"q{i}?", "response": f"answer {i}."} for i in range(40)])
    out = tmp_path / "run"
    job = str(out / "train" / "job.json")
    cmd = cli_command("train", "--base-model", "tiny", "--data", pairs, "--out", out, "--launcher", "accelerate",
                      "--epochs", "50")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (pids := _worker_pids(job)):
            assert proc.poll() is None and time.monotonic() < deadline, "the training worker never started"
            time.sleep(0.2)
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("internal error: WorkerCrashed: the training processes failed"), last
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["train"]["status"] == "failed"
    assert "WorkerCrashed" in manifest["stages"]["train"]["error"]


def test_an_out_folder_that_is_a_file_is_a_user_error(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "response": "b"}\n')
    (tmp_path / "taken").write_text("a file the user keeps\n")
    for out, message in ((tmp_path / "taken", "a file is there, where a folder must be"),
                         (tmp_path / "taken" / "run", "a file is in its path, where a folder must be")):  # fmt: skip
        r = run_cli("curate", pairs, "--out", out)
        assert r.code == 2, r.output
        assert r.stderr.strip().splitlines() == [f"error: cannot write {out}: {message}"]
    assert (tmp_path / "taken").read_text() == "a file the user keeps\n"


def test_a_read_only_run_directory_is_a_user_error(tmp_path: Path) -> None:
    """Exit 2 naming the file that could not be written. Root may write anywhere, so as root the
    folder is made immutable (chattr +i) instead of read-only."""
    import shutil

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a?", "response": "b."}\n')
    out = tmp_path / "run"
    out.mkdir()
    as_root = os.geteuid() == 0
    if as_root:
        if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(out)]).returncode != 0:
            pytest.skip("running as root on a file system without immutable folders")
    else:
        out.chmod(0o555)
    try:
        r = run_cli("curate", pairs, "--out", out)
    finally:
        if as_root:
            subprocess.run(["chattr", "-i", str(out)], check=True)
        else:
            out.chmod(0o755)
    assert r.code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: cannot write {out}/"), r.stderr
    assert ("Operation not permitted" if as_root else "Permission denied") in lines[0]
    assert list(out.iterdir()) == []
