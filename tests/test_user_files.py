"""A run touches only the files it wrote: temp sweeps spare a user's files whatever their names,
`--force` removes exactly what the stage recorded, and no stage overwrites a file it did not write
(a user's README.md in export's folder, a file at one of the runner's names)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from conftest import run_cli, write_config, write_jsonl
from distill4all import atomic

PAIRS = [{"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}, since {i} + {i} = {2 * i}."}
         for i in range(24)]  # fmt: skip


def _pipeline(tmp_path: Path, **export: Any) -> Path:
    """curate (a pairs file) → train the tiny model a few steps → export Q8_0: every kind of stage
    folder (one the runner makes, and export's own out_dir) in under a minute."""
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    data = {
        "name": "files",
        "run_dir": str(tmp_path / "run"),
        "curate": {"input": str(pairs), "map": {"enabled": False}},
        "train": {
            "base_model": "tiny",
            "template": "paper",
            "max_steps": 2,
            "max_length": 64,
            "global_batch_size": 4,
            "micro_batch_size": 4,
            "val_fraction": 0.1,
        },
        "export": {"quantizations": ["q8_0"], "report": False, **export},
    }
    return write_config(tmp_path / "run.yaml", data)


def _plant(path: Path, text: str = "mine") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _ledger(run_dir: Path, stage: str) -> set[str]:
    db = sqlite3.connect(f"file:{run_dir / 'store.sqlite'}?mode=ro", uri=True)
    try:
        return {r[0] for r in db.execute("SELECT path FROM outputs WHERE stage = ?", (stage,))}
    finally:
        db.close()


def test_temp_sweep_removes_only_names_of_the_tools_own_shape(tmp_path: Path) -> None:
    users = [_plant(tmp_path / n) for n in ("notes/draft.tmp-2024.txt", "data.tmp-backup.json",
                                            ".hidden.d4a-tmp-", "x.d4a-tmp-1-abcd", "keep.d4a-tmp-1-ab")]  # fmt: skip
    ours = atomic.temp_path(tmp_path / "model.gguf")
    ours.write_bytes(b"half")
    scratch = atomic.temp_path(tmp_path / "deep" / "merged")
    scratch.mkdir(parents=True)
    _plant(scratch / "inside.bin")
    link_target = _plant(tmp_path / "elsewhere" / atomic.temp_path(Path("victim")).name)
    (tmp_path / "link").symlink_to(link_target.parent, target_is_directory=True)
    removed = atomic.clean_temp(tmp_path)
    assert sorted(removed) == sorted([ours, scratch, link_target])  # the link's target is only reached directly
    assert all(p.read_text() == "mine" for p in users)
    assert not ours.exists() and not scratch.exists()


def test_a_run_spares_user_files_and_force_removes_exactly_what_a_stage_wrote(tmp_path: Path) -> None:
    config = _pipeline(tmp_path, out_dir=str(tmp_path / "shipped"))
    run_dir, shipped = tmp_path / "run", tmp_path / "shipped"
    # Files a user keeps beside a run's: names that look like temp files, and in the stage folders.
    planted = [_plant(run_dir / "notes" / "draft.tmp-2024.txt"), _plant(run_dir / "data.tmp-backup.json"),
               _plant(run_dir / "train" / "my_dataset.csv"), _plant(shipped / "old.tmp-keep.txt"),
               _plant(shipped / "model-llama-7b.gguf"), _plant(run_dir / "curate" / "notes.md")]  # fmt: skip
    r = run_cli("--quiet", "run", config, "--no-report")
    assert r.code == 0, r.output
    assert (shipped / "model-q8_0.gguf").is_file() and (run_dir / "train" / "model").is_dir()
    written = _ledger(run_dir, "train")
    assert {"train/model", "train/summary.json", "train/metrics.jsonl", "train/data"} <= written
    assert not any("my_dataset" in p for p in written)
    first = (run_dir / "train" / "summary.json").stat().st_mtime_ns

    r = run_cli("--quiet", "run", config, "--no-report", "--from", "train", "--force")
    assert r.code == 0, r.output
    assert all(p.read_text() == "mine" for p in planted), [p for p in planted if not p.exists()]
    # The stage was really redone from nothing (a new summary), not skipped on its old files.
    assert (run_dir / "train" / "summary.json").stat().st_mtime_ns != first
    assert (shipped / "model-q8_0.gguf").is_file()
    assert {p.name for p in shipped.iterdir() if p.name.startswith("model-")} == {
        "model-f16.gguf", "model-q8_0.gguf", "model-f16.Modelfile", "model-q8_0.Modelfile", "model-llama-7b.gguf"
    }  # fmt: skip


def test_export_refuses_a_user_readme_before_it_writes_anything(tmp_path: Path) -> None:
    shipped = tmp_path / "shipped"
    readme = _plant(shipped / "README.md", "# my own notes\n")
    config = _pipeline(tmp_path, out_dir=str(shipped))
    r = run_cli("--quiet", "run", config, "--no-report")
    assert r.code == 2, r.output
    assert "README.md exists and this run did not write it" in r.stderr and "Traceback" not in r.stderr
    assert readme.read_text() == "# my own notes\n"
    assert not any(shipped.glob("*.gguf"))  # refused before the conversion, not after
    readme.rename(shipped / "NOTES.md")
    r = run_cli("--quiet", "run", config, "--no-report")
    assert r.code == 0, r.output
    assert (shipped / "README.md").read_text() != "# my own notes\n" and (shipped / "NOTES.md").is_file()


def test_a_file_at_a_stage_output_name_is_refused_not_replaced(tmp_path: Path) -> None:
    config = _pipeline(tmp_path)
    mine = _plant(tmp_path / "run" / "train" / "summary.json", '{"mine": true}')
    r = run_cli("--quiet", "run", config, "--no-report")
    assert r.code == 2 and "summary.json exists and this run did not write it" in r.stderr, r.output
    assert mine.read_text() == '{"mine": true}'
    assert (tmp_path / "run" / "curate" / "train.jsonl").is_file()  # what came before is kept


@pytest.mark.parametrize("name", ["manifest.json", "report", ".lock"])
def test_a_new_run_in_a_folder_holding_the_runners_names_is_refused(tmp_path: Path, name: str) -> None:
    config = _pipeline(tmp_path)
    target = tmp_path / "run" / name
    if name == "report":
        _plant(target / "index.html")
    else:
        _plant(target)
    r = run_cli("--quiet", "run", config, "--no-report")
    assert r.code == 2 and "is not a run directory" in r.stderr, r.output
    assert not (tmp_path / "run" / "store.sqlite").exists()
    assert (target / "index.html" if name == "report" else target).read_text() == "mine"


def test_a_store_from_before_the_ledger_adopts_its_files(tmp_path: Path) -> None:
    """An older run directory reruns: its stages' files are the run's own, not foreign."""
    config = _pipeline(tmp_path)
    run_dir = tmp_path / "run"
    assert run_cli("--quiet", "run", config, "--no-report", "--until", "curate").code == 0
    db = sqlite3.connect(run_dir / "store.sqlite")
    db.executescript("DROP TABLE outputs; PRAGMA user_version = 5;")
    db.close()
    r = run_cli("--quiet", "run", config, "--no-report", "--from", "curate", "--until", "curate", "--force")
    assert r.code == 0, r.output
    assert "curate/train.jsonl" in _ledger(run_dir, "curate")
    assert os.path.isfile(run_dir / "curate" / "train.jsonl")


def test_claims_from_another_thread_are_recorded_and_refused_alike(tmp_path: Path) -> None:
    """An atomic write in a worker thread claims through a connection of its own."""
    from concurrent.futures import ThreadPoolExecutor

    from distill4all.errors import ForeignFileError
    from distill4all.store import Store, outputs

    store = Store(tmp_path / "store.sqlite")
    ledger = outputs.Ledger(store, tmp_path, "curate")
    mine = _plant(tmp_path / "curate" / "report.md")
    with ThreadPoolExecutor(1) as pool:
        pool.submit(ledger.claim, tmp_path / "curate" / "train.jsonl").result()
        with pytest.raises(ForeignFileError, match=r"report\.md exists and this run did not write it"):
            pool.submit(ledger.claim, mine).result()
    ledger.claim(tmp_path / "curate" / "train.jsonl")  # claimed already: no error, one row
    assert outputs.owned(store, tmp_path, "curate") == [tmp_path / "curate" / "train.jsonl"]
    (tmp_path / "curate" / "train.jsonl").write_text("x")
    assert outputs.remove(store, tmp_path, "curate") == [tmp_path / "curate" / "train.jsonl"]
    assert mine.read_text() == "mine" and outputs.owned(store, tmp_path, "curate") == []
    store.close()
