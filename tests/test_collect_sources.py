"""Prompt sources: each format on small written files, malformed rows, sampling, limits, dedup."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli, store_query, write_config
from distill4all.collect.sources import SourceStats, read_source
from distill4all.config import SourceConfig
from distill4all.errors import DataError
from distill4all.store.prompts import prompt_id


def src(**kw: Any) -> SourceConfig:
    return SourceConfig.model_validate({"name": "s", **kw})


def lines(path: Path, *rows: Any) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def test_oig_chip2_takes_the_first_human_turn_and_keeps_the_answer(tmp_path: Path) -> None:
    f = lines(
        tmp_path / "chip2.jsonl",
        {"text": "<human>: What is 2+2?\n<bot>: 4.", "metadata": {"source": "unified_chip2"}},
        {"text": "<human>: Tell me a joke\n<bot>: Why did the chicken...\n<human>: Another\n<bot>: No."},
        {"text": "<bot>: I start the conversation"},
        "not json at all",
    )
    stats = SourceStats()
    got = list(read_source(src(format="oig_chip2", path=f, on_error="skip"), stats=stats))
    assert [p.text for p in got] == ["What is 2+2?", "Tell me a joke"]
    assert got[0].meta["original_response"] == "4."
    assert got[0].meta["metadata"] == {"source": "unified_chip2"}
    assert got[1].meta["turns"] == 4 and got[1].meta["original_response"] == "Why did the chicken..."
    assert stats.bad_rows == 2 and stats.kept == 2
    assert stats.bad_examples[0] == f"{f}:3: no <human>: turn at the start"
    assert stats.bad_examples[1].startswith(f"{f}:4: not valid JSON")


def test_a_bad_row_fails_the_run_with_its_place_by_default(tmp_path: Path) -> None:
    f = lines(tmp_path / "p.jsonl", {"prompt": "fine"}, {"prompt": 42})
    with pytest.raises(DataError, match=rf"{f}:2: no text field 'prompt' \(set on_error: skip"):
        list(read_source(src(path=f)))


def test_stackoverflow_csv_turns_html_into_markdown_and_keeps_tags(tmp_path: Path) -> None:
    f = tmp_path / "so.csv"
    with open(f, "w", newline="", encoding="utf-8") as h:
        w = csv.writer(h)
        w.writerow(["Id", "Title", "Body", "Tags"])
        w.writerow(
            [
                "1",
                "Sort a list?",
                "<p>How do I <b>sort</b>?</p><pre><code>x = [3, 1]\nx.sort()\n</code></pre>",
                "<python><list>",
            ]
        )
        w.writerow(["2", "Only a title", "", "c"])
        h.write('3,"broken row with too few fields"\n')
    stats = SourceStats()
    got = list(read_source(src(format="stackoverflow", path=f, on_error="skip"), stats=stats))
    assert got[0].text == "Sort a list?\n\nHow do I **sort**?\n\n```\nx = [3, 1]\nx.sort()\n```"
    assert got[0].meta["tags"] == ["python", "list"] and got[0].meta["id"] == "1"
    assert got[1].text == "Only a title" and got[1].meta["tags"] == ["c"]
    assert stats.bad_rows == 1 and f"{f}:6:" in stats.bad_examples[0]  # the row its record ends on


def test_stackoverflow_parquet_and_p3_jsonl_and_parquet(tmp_path: Path) -> None:
    so = tmp_path / "so.parquet"
    pq.write_table(pa.Table.from_pylist([{"title": "Q?", "body": "<p>body</p>", "tags": "python"}]), so)
    assert [p.text for p in read_source(src(format="stackoverflow", path=so))] == ["Q?\n\nbody"]

    p3 = lines(
        tmp_path / "p3.jsonl",
        {"inputs": "Is this review positive? Great film!", "targets": "yes"},
        {"inputs_pretokenized": "Topic of: stocks fell", "targets_pretokenized": "business"},
    )
    got = list(read_source(src(format="p3", path=p3)))
    assert [(p.text, p.meta["targets"]) for p in got] == [
        ("Is this review positive? Great film!", "yes"),
        ("Topic of: stocks fell", "business"),
    ]
    p3pq = tmp_path / "p3.parquet"
    pq.write_table(pa.Table.from_pylist([{"inputs": "A?", "targets": "b"}, {"inputs": None, "targets": "c"}]), p3pq)
    stats = SourceStats()
    assert [p.text for p in read_source(src(format="p3", path=p3pq, on_error="skip"), stats=stats)] == ["A?"]
    assert stats.bad_examples == [f"{p3pq}:row 1: no text field 'inputs' or 'inputs_pretokenized'"]


def test_generic_formats_with_a_field_mapping(tmp_path: Path) -> None:
    rows = [{"question": "one?", "id": 1}, {"question": "two?", "id": 2}]
    j = tmp_path / "a.json"
    j.write_text(json.dumps({"data": rows}))
    c = tmp_path / "a.csv"
    c.write_text("question,id\none?,1\ntwo?,2\n")
    pqf = tmp_path / "a.parquet"
    pq.write_table(pa.Table.from_pylist(rows), pqf)
    jl = lines(tmp_path / "a.jsonl", *rows)
    for fmt, path in (("json", j), ("csv", c), ("parquet", pqf), ("jsonl", jl)):
        got = list(read_source(src(format=fmt, path=path, field="question")))
        assert [p.text for p in got] == ["one?", "two?"], fmt
        assert str(got[0].meta["id"]) == "1"
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [{"question": "one?"},\n{"question": "two?"')  # cut off
    with pytest.raises(DataError, match=rf"{bad}:2: not valid JSON"):
        list(read_source(src(format="json", path=bad, field="question")))
    with pytest.raises(DataError, match="not a readable Parquet file"):
        list(read_source(src(format="parquet", path=c)))


def test_normalization_length_limits_and_exact_dedup(tmp_path: Path) -> None:
    f = lines(
        tmp_path / "p.jsonl",
        {"prompt": "  Cafe\u0301 ok?\r\n"},  # NFD é, CRLF, spaces
        {"prompt": "Café ok?"},  # the same after normalization
        {"prompt": "x"},
        {"prompt": "y" * 500},
        {"prompt": "Just right"},
    )
    stats = SourceStats()
    got = list(read_source(src(path=f, min_chars=3, max_chars=100), stats=stats))
    assert [p.text for p in got] == ["Café ok?", "Just right"]
    assert (stats.duplicates, stats.too_short, stats.too_long, stats.kept) == (1, 1, 1, 2)
    assert got[0].id == prompt_id("s", "Café ok?")


def test_sampling_is_seeded_stable_and_independent_of_row_order(tmp_path: Path) -> None:
    rows = [{"prompt": f"prompt {i}"} for i in range(200)]
    a = lines(tmp_path / "a.jsonl", *rows)
    b = lines(tmp_path / "b.jsonl", *reversed(rows))
    pick = lambda path, **kw: {p.text for p in read_source(src(path=path, **kw))}  # noqa: E731
    first = pick(a, limit=20, seed=1)
    assert len(first) == 20
    assert pick(b, limit=20, seed=1) == first  # same prompts, whatever the order
    assert pick(a, limit=20, seed=2) != first
    frac = pick(a, fraction=0.25, seed=1)
    assert 30 <= len(frac) <= 70 and pick(b, fraction=0.25, seed=1) == frac
    assert pick(a, fraction=0.25, limit=10, seed=1) <= frac  # fraction first, then the count
    order = [p.text for p in read_source(src(path=a, limit=20, seed=1))]
    assert order == sorted(order, key=lambda t: int(t.split()[1]))  # file order kept among the chosen


def test_missing_files_and_offline_hub_are_clear_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(DataError, match="file not found"):
        list(read_source(src(path=tmp_path / "nope.jsonl")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="needs the hub, and distill4all is offline"):
        list(read_source(src(format="hf", dataset="laion/OIG")))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: fails fast, no hang
    with pytest.raises(DataError, match="unreachable"):
        list(read_source(src(format="hf", dataset="laion/OIG")))


def test_source_config_requires_where_to_read() -> None:
    with pytest.raises(ValueError, match="needs `path`"):
        SourceConfig.model_validate({"name": "s", "format": "csv"})
    with pytest.raises(ValueError, match="needs `dataset`"):
        SourceConfig.model_validate({"name": "s", "format": "hf"})


# --- rows that are not text, through the CLI --------------------------------------------------

DEEP = b"[" * 100_000 + b"]" * 100_000  # past any parser's recursion: the row's error, not the run's


def hostile_sources(folder: Path) -> dict[str, tuple[str, Path, list[tuple[int | str, str]]]]:
    """One file per format the sources read, each with good rows and rows that are not text:
    name -> (format, path, [(line or row of a bad row, what the error says)])."""
    jsonl = folder / "p.jsonl"
    jsonl.write_bytes(
        b'{"prompt": "jsonl one"}\n'
        b'{"prompt": "not utf-8 \xff here"}\n'
        b'{"prompt": "a lone \\ud800 surrogate"}\n'
        b'{"prompt": "deep metadata", "meta": ' + DEEP + b"}\n"
        b'{"prompt": "a huge number", "n": ' + b"9" * 5000 + b"}\n"
        b'{"prompt": "jsonl two", "meta": {"ok": [1, [2]]}}\n'
    )
    csv_file = folder / "p.csv"
    csv_file.write_bytes(b"prompt,x\ncsv one,1\nnot utf-8 \xfe here,2\ncsv two,3\n")
    json_file = folder / "p.json"
    json_file.write_bytes(
        b'{"data": [{"prompt": "json one"},\n'
        b'{"prompt": "not utf-8 \xc3\x28"},\n'
        b'{"prompt": "lone \\udfff"},\n'
        b'{"prompt": "deep", "m": ' + DEEP + b"},\n"
        b'{"prompt": "json two"}]}\n'
    )
    parquet = folder / "p.parquet"
    texts = pa.array([b"parquet one", b"not utf-8 \xff", b"parquet two"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": texts}), parquet)
    so = folder / "so.csv"
    with open(so, "w", newline="", encoding="utf-8") as h:
        w = csv.writer(h)
        w.writerows([["Title", "Body"], ["so one", ""], ["deep html", "<div>" * 100_000],
                     ["so two", ""]])  # fmt: skip
    return {
        "jsonl": ("jsonl", jsonl, [(2, "not UTF-8 (byte 0xff at column 23)"),
                                   (3, "a lone surrogate \\ud800 in a string (not text)"),
                                   (4, "nests deeper than 100 levels"), (5, "not valid JSON (Exceeds the limit")]),
        "csv": ("csv", csv_file, [(3, "not UTF-8 (byte 0xfe)")]),
        "json": ("json", json_file, [("2 (element 1)", "not UTF-8 (byte 0xc3)"),
                                     ("3 (element 2)", "a lone surrogate \\udfff in a string (not text)"),
                                     ("4 (element 3)", "nests deeper than 100 levels")]),
        "parquet": ("parquet", parquet, [("row 1", "not UTF-8 (byte 0xff in a string column)")]),
        "so": ("stackoverflow", so, [(3, "nests too deep to read")]),
    }  # fmt: skip


def collect_config(tmp_path: Path, url: str, sources: list[dict[str, Any]], run_dir: str = "run") -> Path:
    teacher = {"name": "stub", "model": "stub", "base_url": url, "max_tokens": 8}
    data = {"name": "t", "run_dir": run_dir, "collect": {"sources": sources, "teachers": [teacher]}}
    return write_config(tmp_path / f"{run_dir}.yaml", data)


def test_rows_that_are_not_text_are_skipped_and_counted_in_every_format(tmp_path: Path, stub_teacher: str) -> None:
    files = hostile_sources(tmp_path)
    sources = [{"name": name, "format": fmt, "path": str(path), "on_error": "skip"}
               for name, (fmt, path, _) in files.items()]  # fmt: skip
    r = run_cli("collect", "run", collect_config(tmp_path, stub_teacher, sources))
    assert r.code == 0, r.output
    for name, (_, path, bad) in files.items():
        for where, why in bad:
            assert f"skipped {path}:{where}: {why}" in r.stderr, (name, where, r.stderr)
        assert f"source {name}: 2 prompts from {2 + len(bad)} rows, {len(bad)} bad rows skipped" in r.stderr
    stored = store_query(
        tmp_path / "run", "SELECT p.source, p.text FROM prompts p JOIN responses r ON r.prompt_id = p.id"
    )
    assert sorted(stored) == sorted((name, f"{text} {n}") for name, text in
                                    [("jsonl", "jsonl"), ("csv", "csv"), ("json", "json"), ("parquet", "parquet"),
                                     ("so", "so")] for n in ("one", "two"))  # fmt: skip


def test_a_row_that_is_not_text_fails_collect_with_its_file_and_line(tmp_path: Path, stub_teacher: str) -> None:
    for name, (fmt, path, bad) in hostile_sources(tmp_path).items():
        config = collect_config(tmp_path, stub_teacher, [{"name": name, "format": fmt, "path": str(path)}], name)
        r = run_cli("collect", "run", config)
        where, why = bad[0]
        assert r.code == 2, (name, r.output)
        assert r.stderr.splitlines()[-1].startswith(f"error: {path}:{where}: {why}"), (name, r.stderr)
        assert "internal error" not in r.output and "Traceback" not in r.output
        assert store_query(tmp_path / name, "SELECT COUNT(*) FROM prompts") == [(0,)]


def test_a_hub_dataset_that_cannot_be_read_is_one_error_naming_its_row(tmp_path: Path, stub_teacher: str) -> None:
    """An `hf` dataset from a local folder (the datasets library reads it; the hub check is served
    by the stub): a row it cannot decode ends the source with the dataset, split and row."""
    folder = tmp_path / "ds"
    folder.mkdir()
    texts = pa.array([b"hub one", b"not utf-8 \xff", b"hub two"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": texts}), folder / "train.parquet")
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": stub_teacher, "HF_HOME": str(tmp_path / "hf")}
    for on_error in ("fail", "skip"):  # the library cannot go on past it, so skip cannot either
        source = {"name": "hub", "format": "hf", "dataset": str(folder), "on_error": on_error}
        r = run_cli("collect", "run", collect_config(tmp_path, stub_teacher, [source], f"run-{on_error}"), env=env)
        assert r.code == 2, r.output
        line = r.stderr.splitlines()[-1]
        assert line.startswith(f"error: {folder}:train:1: the dataset cannot be read past this row"), line


def hf_env(tmp_path: Path, stub_teacher: str) -> dict[str, str]:
    """The hub check answered by the stub; the library's cache kept inside the test."""
    return {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": stub_teacher, "HF_HOME": str(tmp_path / "hf")}


def test_a_local_hf_folder_with_json_nested_100000_deep_is_a_bad_row_not_a_crash(
    tmp_path: Path, stub_teacher: str
) -> None:
    """pyarrow's JSON reader inside the datasets library overflows the stack on such a row
    (SIGSEGV, exit 139): the folder's JSON is scanned before the library reads it, and the row is
    a bad row with its file:line in JSON Lines, a JSON list and a gzip-compressed file alike."""
    folder = tmp_path / "ds"
    folder.mkdir()
    lines(folder / "train-0.jsonl", {"prompt": "jsonl one"}, '{"prompt": "deep", "m": ' + DEEP.decode() + "}",
          {"prompt": "jsonl two"})  # fmt: skip
    (folder / "train-1.json").write_bytes(b'[{"prompt": "json one"},\n{"m": ' + DEEP + b'},\n{"prompt": "json two"}]\n')
    (folder / "train-2.jsonl.gz").write_bytes(gzip.compress(b'{"m": ' + DEEP + b'}\n{"prompt": "gz one"}\n'))
    bad = [
        (folder / "train-0.jsonl", "2"),
        (folder / "train-1.json", "2 (element 1)"),
        (folder / "train-2.jsonl.gz", "1"),
    ]
    env = hf_env(tmp_path, stub_teacher)
    source = {"name": "hub", "format": "hf", "dataset": str(folder)}
    r = run_cli("collect", "run", collect_config(tmp_path, stub_teacher, [source], "run-fail"), env=env)
    assert r.code == 2, r.output  # not 139
    assert r.stderr.splitlines()[-1].startswith(f"error: {bad[0][0]}:2: nests deeper than 100 levels"), r.stderr
    assert "Traceback" not in r.output and store_query(tmp_path / "run-fail", "SELECT COUNT(*) FROM prompts") == [(0,)]
    source["on_error"] = "skip"
    r = run_cli("collect", "run", collect_config(tmp_path, stub_teacher, [source], "run-skip"), env=env)
    assert r.code == 0, r.output
    for path, where in bad:
        assert f"skipped {path}:{where}: nests deeper than 100 levels" in r.stderr, r.stderr
    assert "source hub: 5 prompts from 8 rows, 3 bad rows skipped" in r.stderr, r.stderr
    stored = store_query(tmp_path / "run-skip", "SELECT text FROM prompts")
    assert sorted(t for (t,) in stored) == ["gz one", "json one", "json two", "jsonl one", "jsonl two"]


def test_a_normal_local_hf_folder_reads_its_split_whatever_the_others_hold(tmp_path: Path, stub_teacher: str) -> None:
    folder = tmp_path / "ds"
    folder.mkdir()
    lines(folder / "train.jsonl", *({"prompt": f"question {i}?", "meta": {"n": [i, [i]]}} for i in range(4)))
    lines(folder / "test.jsonl", '{"m": ' + DEEP.decode() + "}")  # not the split asked for: not read
    source = {"name": "hub", "format": "hf", "dataset": str(folder)}
    r = run_cli("collect", "run", collect_config(tmp_path, stub_teacher, [source]), env=hf_env(tmp_path, stub_teacher))
    assert r.code == 0, r.output
    assert "source hub: 4 prompts from 4 rows" in r.stderr, r.stderr
    stored = store_query(tmp_path / "run", "SELECT text FROM prompts")
    assert sorted(t for (t,) in stored) == [f"question {i}?" for i in range(4)]


def test_pairs_files_rows_that_are_not_text_fail_curate_with_file_and_line(tmp_path: Path) -> None:
    good = b'{"prompt": "Why?", "response": "Because."}\n'
    cases = {
        "deep.jsonl": (good + b'{"prompt": "a", "response": "b", "m": ' + DEEP + b"}\n", "2: nests deeper than 100 levels"),
        "number.jsonl": (good + b'{"prompt": "a", "response": ' + b"1" * 5000 + b"}\n", "2: not valid JSON (Exceeds"),
        "bytes.jsonl": (good + b'{"prompt": "a\xff", "response": "b"}\n', "2: not UTF-8 (byte 0xff at column 14)"),
    }  # fmt: skip
    for name, (content, _) in cases.items():
        (tmp_path / name).write_bytes(content)
    texts = pa.array([b"Why?", b"not \xff text"], pa.binary()).view(pa.string())
    pq.write_table(pa.table({"prompt": texts, "response": ["Because.", "b"]}), tmp_path / "bytes.parquet")
    cases["bytes.parquet"] = (b"", "row 1: not UTF-8 (byte 0xff in a string column)")
    for name, (_, where_why) in cases.items():
        r = run_cli("curate", tmp_path / name, "--out", tmp_path / f"run-{name}")
        assert r.code == 2, (name, r.output)
        assert r.stderr.splitlines()[-1].startswith(f"error: {tmp_path / name}:{where_why}"), (name, r.stderr)
