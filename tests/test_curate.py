"""The curate stage through the CLI: a pairs file with planted failures, duplicates and a P3-like
source; decisions, exports, the homogeneous flag, kill-and-rerun, the map in a real browser."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import REPO, chromium_page, cli_command, run_cli, write_config, write_jsonl

DEMO = REPO / "examples" / "data" / "demo"
LONG = (
    "Trim the stems at an angle every couple of days, change the water often, keep the vase out of direct "
    "sun, and remove leaves that sit below the waterline. Flower food from the shop helps too, and a drop of "
    "bleach keeps bacteria down. Tulips keep growing in the vase, so trim them shorter than the other stems."
)
CURATE = {"embed": {"model": "minilm", "max_chars": 300}, "map": {"max_points": 1000}}


def chip2_pairs() -> list[dict[str, Any]]:
    """A varied source: the demo's unified_chip2-style questions with their written answers."""
    rows = []
    for line in (DEMO / "chip2.jsonl").read_text().splitlines():
        human, bot = json.loads(line)["text"].split("\n<bot>: ", 1)
        rows.append({"prompt": human.removeprefix("<human>: "), "response": bot, "source": "chip2"})
    return rows


def p3_pairs() -> list[dict[str, Any]]:
    """A P3-like source: a few templates with slot-filled entities and one-word label answers."""
    rows = [json.loads(line) for line in (DEMO / "p3.jsonl").read_text().splitlines()]
    return [{"prompt": r["inputs"], "response": r["targets"], "source": "p3"} for r in rows]


PLANTED = {
    "refusal": {
        "prompt": "What is your favourite film?",
        "response": "As an AI language model, I do not have personal preferences.",
        "source": "chip2",
    },
    "failure.empty": {"prompt": "Write a haiku about snow.", "response": "", "source": "chip2"},
    "truncated.length": {
        "prompt": "Explain how tides work.",
        "response": "Tides are caused mainly by the Moon's gravity pulling on",
        "source": "chip2",
        "finish_reason": "length",
    },
    "malformed.echo": {
        "prompt": "Name a famous painting by Vermeer",
        "response": "Name a famous painting by Vermeer.",
        "source": "chip2",
    },
    "long": {"prompt": "How do I keep cut flowers fresh?", "response": LONG, "source": "chip2"},
    "dup.exact-pair": {"prompt": "How do I keep cut flowers fresh?", "response": LONG.upper(), "source": "chip2"},
    "dup.near-pair": {
        "prompt": "Please, how do I keep cut flowers fresh?",
        "response": LONG.replace("other stems.", "other flowers."),
        "source": "chip2",
    },
}


def pairs_rows() -> list[dict[str, Any]]:
    return chip2_pairs() + p3_pairs() + list(PLANTED.values())


def decisions(run_dir: Path) -> dict[str, dict[str, Any]]:
    """Response text + source → its decision, read from the run store."""
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        rows = db.execute(
            "SELECT r.id, r.text, p.source, d.kept, d.rules, d.cluster, d.topic, d.details FROM responses r"
            " JOIN prompts p ON p.id = r.prompt_id LEFT JOIN decisions d ON d.response_id = r.id"
        ).fetchall()
    finally:
        db.close()
    return {
        f"{source}\0{text}": {"id": rid, "kept": kept, "rules": json.loads(rules or "null"), "cluster": cluster,
                              "topic": topic, "details": json.loads(details or "{}")}
        for rid, text, source, kept, rules, cluster, topic, details in rows
    }  # fmt: skip


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One curation of the planted pairs file, shared by the checks below."""
    tmp = tmp_path_factory.mktemp("curate")
    write_jsonl(tmp / "pairs.jsonl", pairs_rows())
    write_config(tmp / "cfg.yaml", {"name": "x", "run_dir": "r", "curate": CURATE})
    r = run_cli("curate", tmp / "pairs.jsonl", "--out", tmp / "run", "--config", tmp / "cfg.yaml")
    assert r.code == 0, r.output
    assert "homogeneous source 'p3'" in r.stdout
    (tmp / "stdout.txt").write_text(r.stdout)
    return tmp / "run"


def test_every_pair_has_exactly_one_decision(curated: Path) -> None:
    db = sqlite3.connect(curated / "store.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == len(pairs_rows())
        missing = db.execute("SELECT COUNT(*) FROM responses WHERE id NOT IN (SELECT response_id FROM decisions)")
        assert missing.fetchone()[0] == 0
        assert db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == len(pairs_rows())
        bad = db.execute("SELECT COUNT(*) FROM decisions WHERE (kept = 1) != (rules = '[]')").fetchone()[0]
        assert bad == 0
    finally:
        db.close()


def test_planted_failures_and_duplicates_are_dropped_by_their_rule(curated: Path) -> None:
    d = decisions(curated)
    for rule, row in PLANTED.items():
        got = d[f"{row['source']}\0{row['response']}"]
        if rule == "long":
            assert got["kept"] == 1 and got["cluster"] is not None  # the representative of its cluster
            continue
        assert got["kept"] == 0 and rule in got["rules"], (rule, got)
        assert got["details"][rule]
    original = d[f"chip2\0{LONG}"]
    for rule in ("dup.exact-pair", "dup.near-pair"):
        dup = d[f"chip2\0{PLANTED[rule]['response']}"]
        assert dup["details"][rule] == f"duplicate of response {original['id']}"
        assert dup["cluster"].endswith(f":{original['id']}")
    kept_chip2 = [v for k, v in d.items() if k.startswith("chip2\0") and v["kept"]]
    assert len(kept_chip2) == 81  # the 80 written pairs and the planted original
    assert all(v["topic"] for v in kept_chip2)


def test_p3_like_source_is_flagged_and_the_varied_one_is_not(curated: Path) -> None:
    report = json.loads((curated / "curate" / "report.json").read_text())
    sources = {s["source"]: s for s in report["sources"]}
    assert sources["p3"]["homogeneous"] and len(sources["p3"]["reasons"]) >= 2
    assert sources["p3"]["excluded"] == "source.homogeneous"
    assert not sources["chip2"]["homogeneous"] and sources["chip2"]["excluded"] is None
    assert sources["p3"]["short_answer_share"] == 1.0
    assert sources["p3"]["template_share"] > sources["chip2"]["template_share"]
    d = decisions(curated)
    assert all(v["rules"] == ["source.homogeneous"] for k, v in d.items() if k.startswith("p3\0"))


def test_exports_and_report(curated: Path) -> None:
    import pyarrow.parquet as pq

    folder = curated / "curate"
    kept = sorted((k.split("\0", 1)[1]) for k, v in decisions(curated).items() if v["kept"])
    train = read_jsonl(folder / "train.jsonl")
    assert sorted(p["response"] for p in train) == kept
    assert all(set(p) == {"prompt", "response", "source"} for p in train)
    assert pq.read_table(folder / "train.parquet").to_pylist() == train
    messages = read_jsonl(folder / "train.messages.jsonl")
    assert [m["messages"][1]["content"] for m in messages] == [p["response"] for p in train]
    assert {m["messages"][0]["role"] for m in messages} == {"user"}
    split_train = read_jsonl(folder / "split" / "train.jsonl")
    split_valid = read_jsonl(folder / "split" / "validation.jsonl")
    assert len(split_train) + len(split_valid) == len(train) and 1 <= len(split_valid) <= 12
    assert not {p["prompt"] for p in split_valid} & {p["prompt"] for p in split_train}

    report = json.loads((folder / "report.json").read_text())
    assert report["pairs"] == len(pairs_rows()) and report["kept"] == len(train)
    assert report["funnel"][-1]["remaining"] == len(train)
    assert sum(f["dropped"] for f in report["funnel"]) == report["dropped"]
    assert report["rules"]["refusal"]["count"] == 1
    assert report["rules"]["refusal"]["examples"][0]["prompt"] == PLANTED["refusal"]["prompt"]
    assert report["rules"]["source.homogeneous"]["count"] == 80
    assert len(report["topics"]) >= 2 and all(t["subtopics"] for t in report["topics"])
    for step in ("filters + keys + minhash", "embed (minilm)", "project (tsne)"):
        assert report["steps"][step]["rows"] > 0
    md = (folder / "report.md").read_text()
    assert "## Funnel" in md and "source.homogeneous" in md
    for png in ("map-source.png", "map-topic.png"):
        assert (folder / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dataset_card_loads_with_huggingface_hub_and_tells_the_funnel(curated: Path) -> None:
    from huggingface_hub import DatasetCard

    report = json.loads((curated / "curate" / "report.json").read_text())
    card = DatasetCard.load(curated / "curate" / "README.md")
    data = card.data.to_dict()
    # Imported pairs: no known licence and no hub source, said so rather than invented.
    assert data["license"] == "other" and data["license_name"] == "unknown"
    assert data["source_datasets"] == ["original"] and data["task_categories"] == ["text-generation"]
    assert data["size_categories"] == ["n<1K"] and "language" not in data  # no language rule ran
    assert data["distill4all"] == {"teachers": ["import"], "pairs": report["kept"]}
    for f in report["funnel"]:
        assert f"| {f['step']} | {f['dropped']:,} | {f['remaining']:,} |" in card.text
    assert f"| `source.homogeneous` | {report['rules']['source.homogeneous']['count']} |" in card.text
    assert "unknown (imported pairs)" in card.text and "[map.html](map.html)" in card.text


def test_rerun_skips_and_changed_settings_need_force(curated: Path, tmp_path: Path) -> None:
    pairs = curated.parent / "pairs.jsonl"
    cfg = curated.parent / "cfg.yaml"
    r = run_cli("curate", pairs, "--out", curated, "--config", cfg)
    assert r.code == 0 and "curate: skipped" in r.stdout, r.output
    other = write_config(
        tmp_path / "other.yaml", {"name": "x", "run_dir": "r", "curate": {**CURATE, "exclude_sources": ["chip2"]}}
    )
    r = run_cli("curate", pairs, "--out", curated, "--config", other)
    assert r.code == 2 and "--force" in r.stderr


def test_bad_pairs_file_is_one_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": "d"}\n{not json\n')
    r = run_cli("curate", bad, "--out", tmp_path / "run")
    assert r.code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: {bad}:3: not valid JSON (Expecting property name enclosed in double quotes)"
    ]
    r = run_cli("curate", tmp_path / "missing.parquet", "--out", tmp_path / "run2")
    assert r.code == 2 and "pairs file not found" in r.stderr
    ok = '{"prompt": "a \\ud83d\\ude00", "response": "b"}\n'  # an escaped pair of surrogates is one emoji
    for name, second, message in [
        ("surrogate.jsonl", b'{"prompt": "c", "response": "d \\ud800"}\n', "a lone surrogate \\ud800 in a string"),
        ("latin1.jsonl", '{"prompt": "caf\u00e9", "response": "d"}\n'.encode("latin-1"), "not UTF-8 (byte 0xe9"),
    ]:
        (tmp_path / name).write_bytes(ok.encode() + second)
        r = run_cli("curate", tmp_path / name, "--out", tmp_path / f"run-{name}")
        assert r.code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}:2: {message}"), lines


def test_parquet_pairs_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = chip2_pairs()[:40]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "pairs.parquet")
    write_config(tmp_path / "cfg.yaml", {"name": "x", "run_dir": "r", "curate": {**CURATE, "map": {"enabled": False}}})
    r = run_cli("curate", tmp_path / "pairs.parquet", "--out", tmp_path / "run", "--config", tmp_path / "cfg.yaml")
    assert r.code == 0, r.output
    assert len(read_jsonl(tmp_path / "run" / "curate" / "train.jsonl")) == 40
    assert not (tmp_path / "run" / "curate" / "map.html").exists()


def _state(run_dir: Path) -> tuple[int, str | None]:
    try:
        db = sqlite3.connect(f"file:{run_dir / 'store.sqlite'}?mode=ro", uri=True, timeout=5)
        try:
            emb = db.execute("SELECT COUNT(*) FROM embeddings").fetchone()[0]
            row = db.execute("SELECT status FROM stages WHERE name = 'curate'").fetchone()
            return int(emb), row[0] if row else None
        finally:
            db.close()
    except sqlite3.OperationalError:
        return 0, None


def varied_pairs(n: int) -> list[dict[str, Any]]:
    """Many distinct pairs built from the demo's questions and answers, to make curation last."""
    base = chip2_pairs()
    rng = np.random.RandomState(0)
    out = []
    for i in range(n):
        a, b = base[rng.randint(len(base))], base[rng.randint(len(base))]
        out.append(
            {
                "prompt": f"{a['prompt']} Also, {b['prompt'].lower()}",
                "response": f"{a['response']} {b['response']}",
                "source": f"s{i % 3}",
            }
        )
    return out


@pytest.mark.slow
def test_sigkill_mid_curation_then_rerun_gives_the_same_result(tmp_path: Path) -> None:
    rows = varied_pairs(250) + p3_pairs() + list(PLANTED.values())
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = {
        **CURATE,
        "embed": {"model": "minilm", "max_chars": 300, "batch_size": 4},
        "dedup": {"semantic": True},
        "auto_exclude_homogeneous": False,  # the recombined sources are homogeneous; keep them to dedup
    }
    write_config(tmp_path / "cfg.yaml", {"name": "x", "run_dir": "r", "curate": cfg})
    args = ["curate", tmp_path / "pairs.jsonl", "--config", tmp_path / "cfg.yaml", "--out"]

    clean = tmp_path / "clean"
    assert run_cli(*args, clean).code == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli_command(*args, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if _state(killed)[0] > 0:  # embeddings are being written: mid-curation
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    embedded, status = _state(killed)
    assert status == "running" and 0 < embedded < len(rows)
    assert not (killed / "curate" / "train.jsonl").exists()

    r = run_cli(*args, killed)
    assert r.code == 0 and "curate: resumed" in r.stdout, r.output
    assert len(read_jsonl(clean / "curate" / "train.jsonl")) > 200
    assert decisions(killed) == decisions(clean)
    for name in ("train.jsonl", "train.parquet", "split/validation.jsonl"):
        assert (killed / "curate" / name).read_bytes() == (clean / "curate" / name).read_bytes()
    a = json.loads((killed / "curate" / "report.json").read_text())
    b = json.loads((clean / "curate" / "report.json").read_text())
    assert (a["funnel"], a["rules"], a["sources"], a["topics"]) == (b["funnel"], b["rules"], b["sources"], b["topics"])


def test_run_collect_then_curate(make_run: Callable[..., Path], tmp_path: Path) -> None:
    config = make_run(n=8, curate={**CURATE, "auto_exclude_homogeneous": False})
    r = run_cli("run", config)
    assert r.code == 0, r.output
    run_dir = tmp_path / "run"
    manifest = json.loads((run_dir / "manifest.json").read_text())
    stage = manifest["stages"]["curate"]
    assert stage["status"] == "done" and stage["upstream"] == {"collect": manifest["stages"]["collect"]["run_id"]}
    assert stage["counts"]["pairs"] == 8 and "curate/train.jsonl" in stage["artifacts"]
    db = sqlite3.connect(run_dir / "store.sqlite")
    try:
        assert db.execute("SELECT COUNT(*) FROM decisions").fetchone()[0] == 8
        assert (
            db.execute("SELECT COUNT(*) FROM responses WHERE id NOT IN (SELECT response_id FROM decisions)").fetchone()[
                0
            ]
            == 0
        )
    finally:
        db.close()
    assert len(read_jsonl(run_dir / "curate" / "train.jsonl")) == stage["counts"]["kept"]
    from huggingface_hub import DatasetCard

    card = DatasetCard.load(run_dir / "curate" / "README.md")  # the collected teacher, with its terms
    teachers = card.data.to_dict()["distill4all"]["teachers"]
    assert len(teachers) == 1 and f"`{teachers[0]}`: unknown: check the terms" in card.text
    r = run_cli("curate", config)  # the curate stage alone, from the run's config
    assert r.code == 0 and "curate: skipped" in r.stdout, r.output
    # redoing collect makes curate stale: the runner refuses until it is redone too
    assert run_cli("run", config, "--force", "--until", "collect").code == 0
    r = run_cli("run", config)
    assert r.code == 2 and "stage collect was redone" in r.stderr


def test_map_in_headless_chromium(curated: Path, tmp_path: Path) -> None:
    from PIL import Image

    html = curated / "curate" / "map.html"
    with_text = sum(1 for r in pairs_rows() if r["response"].strip())
    with chromium_page(800) as (page, errors):
        page.goto(html.as_uri())
        page.wait_for_function("window.__datamap !== undefined")
        state = page.evaluate("window.__datamap")
        assert state["points"] == with_text and state["shown"] == with_text and state["drawn"] == with_text
        shot = tmp_path / "map.png"
        page.screenshot(path=str(shot))
        # colour by decision, hide the dropped ones: only kept pairs are drawn
        page.select_option("#colorby", "decision")
        page.uncheck("#show-dropped")
        kept = sum(1 for v in decisions(curated).values() if v["kept"])
        assert page.evaluate("window.__datamap")["shown"] == kept
        page.check("#show-dropped")
        page.fill("#search", "vermeer")
        assert page.evaluate("window.__datamap")["matched"] == 1
        # hovering a point shows its pair
        page.fill("#search", "")
        box = page.locator("#map").bounding_box()
        assert box is not None
        shown = False
        for fx in np.linspace(0.1, 0.9, 15):
            for fy in np.linspace(0.1, 0.9, 15):
                page.mouse.move(box["x"] + fx * box["width"], box["y"] + fy * box["height"])
                if page.locator("#tip").is_visible():
                    shown = True
                    break
            if shown:
                break
        assert shown and "prompt" in page.locator("#tip").inner_text()
    assert errors == []
    img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    coloured = (np.abs(img - img[..., :1]).sum(axis=2) > 60).mean()  # saturated pixels: points, not grey UI
    assert coloured > 0.002, coloured


@pytest.mark.slow
def test_static_embedder_is_distilled_once_and_cached(model_cache: Path) -> None:
    from distill4all.curate import embed

    e = embed.load_embedder("minilm-static")
    folder = model_cache / "models" / "minilm-static-256"
    assert (folder / "config.json").is_file()
    mtime = (folder / "model.safetensors").stat().st_mtime_ns
    v = e.encode(["a cat sat on the mat", "a kitten sat on a rug", "stock markets fell sharply"])
    assert v.shape == (3, 256) and np.allclose(np.linalg.norm(v, axis=1), 1, atol=1e-4)
    assert v[0] @ v[1] > v[0] @ v[2]
    again = embed.load_embedder("minilm-static")
    assert again.key == e.key and (folder / "model.safetensors").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_static_embeddings_are_model2vecs_own(model_cache: Path) -> None:
    """The chunk-at-a-time encoder gives model2vec's vectors: accents, CJK, controls BERT deletes,
    words too long for WordPiece, texts past the 512-token cut, empty texts, repeated calls."""
    from model2vec import StaticModel

    from distill4all.curate import embed

    e = embed.load_embedder("minilm-static")
    texts = ["a cat sat on the mat.", "Café naïve — résumé “quoted”", "日本語のテキスト。これは文章", "ab\x1ccd ef\x01gh",
             "x" * 300 + " tail", " ".join(f"word{k}, and more" for k in range(600)), "", "   ", "emoji 😀!",
             "def f(x):\n\treturn x**2  # code_with_underscores", "a cat sat on the mat."]  # fmt: skip
    m2v = StaticModel.from_pretrained(str(embed.static_minilm_path()))
    want = np.asarray(m2v.encode(texts), dtype=np.float32)
    for _ in range(2):  # the second call reads every chunk from what the first remembered
        got = e.encode(texts)
        for g, w in zip(got, want, strict=True):
            if not np.any(w):
                assert not np.any(g)
            else:
                assert g @ w / np.linalg.norm(w) > 0.9999


HOSTILE = ["<!--<script>", "</script><script>document.body.innerHTML=''</script>", "$x^$", "$\\frac{x}{$",
           "line\u2028sep\u2029para", "a & b > c <b>bold</b>", "\ud800 lone", "qqdocsepqq", "\x00nul"]  # fmt: skip


def test_no_text_changes_how_the_map_parses_or_draws(tmp_path: Path) -> None:
    """Texts and source names that once blanked the page (`<!--<script>`) or crashed the static
    map (matplotlib's mathtext on `$x^$`): every point and legend entry is drawn, names as written."""
    from distill4all.curate.datamap import MapData, write_html, write_png

    n = len(HOSTILE)
    xy = np.random.default_rng(0).normal(size=(n, 2)).astype(np.float32)
    data = MapData(xy, HOSTILE, HOSTILE[::-1], [True] * n, [""] * n, {"source": (HOSTILE, list(range(n)))})
    write_html(tmp_path / "map.html", data, title="<!--<script>", subtitle="$x^$")
    write_png(tmp_path / "map.png", xy, HOSTILE, list(range(n)), title="$\\frac{x}{$")
    assert (tmp_path / "map.png").stat().st_size > 1000
    with chromium_page(800) as (page, errors):
        page.goto((tmp_path / "map.html").as_uri())
        page.wait_for_function("window.__datamap !== undefined")
        state = page.evaluate("window.__datamap")
        assert state["points"] == state["drawn"] == n
        legend = page.locator("#legend").inner_text()
        assert all(name in legend for name in ("<!--<script>", "$x^$", "a & b > c <b>bold</b>")), legend
        assert page.locator("h1").inner_text() == "<!--<script>"
    assert errors == []


def test_report_md_writes_any_name_as_plain_text(curated: Path) -> None:
    """Source names, reasons, topic labels and rule examples as written: no HTML passes through and
    no `|` or newline breaks a table (rendered by markdown-it, as GitHub renders CommonMark)."""
    from markdown_it import MarkdownIt

    from distill4all.curate.outputs import report_markdown

    report = json.loads((curated / "curate" / "report.json").read_text())
    hostile = "<script>alert(1)</script> a|b\nc *x* [l](u) `c`"
    for s in report["sources"]:
        s["source"], s["reasons"] = hostile, [hostile]
    for t in report["topics"]:
        t["label"] = hostile
        for sub in t["subtopics"]:
            sub["label"] = hostile
    for info in report["rules"].values():
        info["examples"][0] |= {"detail": hostile, "response": hostile}
    page = MarkdownIt("commonmark").enable("table").render(report_markdown(report, hostile))
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; a|b c *x* [l](u) `c`" in page
    for table in page.split("<table>")[1:]:
        rows = table.split("</table>")[0].split("<tr>")[1:]
        widths = {row.count("<td") + row.count("<th") for row in rows}
        assert len(widths) == 1, widths  # every row as wide as its header


def test_the_paper_config_curates_by_the_papers_rules_only(tmp_path: Path) -> None:
    """examples/gpt4all-paper.yaml's curate section: failures, values that are not text and P3 go
    (clean.py, then P3); refusals, duplicates and every other answer stay, as in the report."""
    import yaml

    paper = yaml.safe_load((REPO / "examples" / "gpt4all-paper.yaml").read_text())["curate"]
    chip2 = chip2_pairs()[:12]
    refusal = {"prompt": "Tell me a secret.", "response": "As an AI language model, I cannot share secrets.",
               "source": "chip2"}  # fmt: skip
    failures = [{"prompt": "Empty?", "response": "", "source": "chip2"},
                {"prompt": "Null?", "response": None, "source": "chip2"}]  # fmt: skip
    malformed = [{"prompt": "A number?", "response": 42, "source": "chip2"},
                 {"prompt": {"text": "no value"}, "response": "x", "source": "chip2"},
                 {"prompt": "   ", "response": "blank prompt", "source": "chip2"}]  # fmt: skip
    unwrapped = {
        "prompt": {"value": "Wrapped prompt?"},
        "response": {"description": "A wrapped answer."},
        "source": "chip2",
    }  # fmt: skip — clean.py read these as their text
    rows = [*chip2, chip2[0], refusal, *failures, *malformed, unwrapped, *p3_pairs()[:10]]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    cfg = {**paper, "embed": {"model": "minilm", "max_chars": 300}, "map": {"max_points": 1000}}
    write_config(tmp_path / "cfg.yaml", {"name": "x", "run_dir": "r", "curate": cfg})
    r = run_cli("curate", tmp_path / "pairs.jsonl", "--out", tmp_path / "run", "--config", tmp_path / "cfg.yaml")
    assert r.code == 0, r.output
    db = sqlite3.connect(tmp_path / "run" / "store.sqlite")
    rows_ = db.execute(
        "SELECT p.source, r.text, d.kept, d.rules FROM decisions d JOIN responses r ON r.id = d.response_id"
        " JOIN prompts p ON p.id = r.prompt_id"
    ).fetchall()
    db.close()
    dropped = sorted((source, json.loads(rules)[0]) for source, _, kept, rules in rows_ if not kept)
    assert dropped == [("chip2", "failure.api"), ("chip2", "failure.empty")] + [("chip2", "failure.malformed")] * 3 + [
        ("p3", "source.excluded")] * 10  # fmt: skip
    kept = [text for _, text, k, _ in rows_ if k]
    assert len(kept) == 12 + 1 + 1 + 1  # every chip2 answer and its duplicate, the refusal, the unwrapped one
    assert refusal["response"] in kept and "A wrapped answer." in kept and kept.count(chip2[0]["response"]) == 2
    report = json.loads((tmp_path / "run" / "curate" / "report.json").read_text())
    assert [f["remaining"] for f in report["funnel"]] == [len(rows), len(rows) - 5, len(rows) - 15, len(rows) - 15]
    assert report["decontamination"]["eval_items"] == 0  # the paper checked for none
