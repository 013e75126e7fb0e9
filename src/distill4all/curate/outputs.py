"""The curation's outputs in the stage folder (each written atomically):

train.jsonl              every kept pair, GPT4All format {prompt, response, source}: what train reads
train.parquet            the same, Parquet
train.messages.jsonl     the same, OpenAI chat format {messages: [user, assistant]}
split/{train,validation}.{jsonl,parquet,messages.jsonl}
                         a seeded split (by prompt, so a prompt never straddles it)
README.md                the dataset card (card.py, written by the stage)
report.json / report.md  funnel, each rule's count and examples, sources, topics, step timings
map.html                 the interactive data map (self-contained)
map-source.png, map-topic.png   static maps like the paper's Figures 1–2
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distill4all import atomic
from distill4all.config import CurateConfig
from distill4all.curate import datamap
from distill4all.layout import CurateLayout

if TYPE_CHECKING:
    from distill4all.curate.curation import Curation

EXAMPLES_PER_RULE = 3


def in_validation(prompt: str, fraction: float, seed: int) -> bool:
    """A seeded, stable split: the same prompt lands on the same side in every run."""
    h = hashlib.blake2b(f"{seed}\0{prompt}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64 < fraction


def _write_formats(stem: Path, pairs: list[dict[str, str]]) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = stem.with_suffix(".jsonl")
    messages = stem.with_suffix(".messages.jsonl")
    parquet = stem.with_suffix(".parquet")
    _write_jsonl(jsonl, pairs)
    _write_jsonl(
        messages,
        (
            {"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": p["response"]}]}
            for p in pairs
        ),
    )
    fields = [("prompt", pa.string()), ("response", pa.string()), ("source", pa.string())]
    if any("reasoning" in p for p in pairs):
        fields.append(("reasoning", pa.string()))
    with atomic.output_file(parquet) as tmp:
        pq.write_table(pa.Table.from_pylist(pairs, schema=pa.schema(fields)), tmp)
    return [jsonl, parquet, messages]


def _write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    with atomic.output_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def training_pair(prompt: str, answer: str | None, source: str, reasoning: str | None, mode: str) -> dict[str, str]:
    """A kept pair as training reads it: its answer, or (mode with-reasoning) the reasoning in
    `<think>` tags before it, the layout of the reasoning models' chat templates (DeepSeek-R1,
    Qwen3); a reasoning teacher's reasoning is kept in its own field either way."""
    response = answer or ""
    if reasoning and mode == "with-reasoning":
        response = f"<think>\n{reasoning}\n</think>\n\n{response}"
    return {"prompt": prompt, "response": response, "source": source} | ({"reasoning": reasoning} if reasoning else {})


def write_outputs(out_dir: Path, c: Curation, cfg: CurateConfig, *, seed: int, title: str) -> list[Path]:
    rows = c.rows
    kept = [
        training_pair(rows.prompts[i], rows.responses[i], rows.sources[i], rows.reasonings[i], cfg.reasoning)
        for i in range(len(rows))
        if not c.rules[i]
    ]
    files = CurateLayout(out_dir)
    outputs = _write_formats(files.train_pairs.with_suffix(""), kept)
    valid = [p for p in kept if in_validation(p["prompt"], cfg.validation_fraction, seed)]
    train = [p for p in kept if not in_validation(p["prompt"], cfg.validation_fraction, seed)]
    outputs += _write_formats(out_dir / "split" / "train", train)
    outputs += _write_formats(out_dir / "split" / "validation", valid)
    if c.xy:
        outputs += _write_maps(out_dir, c, title)
    report = build_report(c, cfg, seed=seed, split=(len(train), len(valid)))
    reports = [files.report_json, files.report_md]
    report["outputs"] = [*sorted(str(p.relative_to(out_dir)) for p in outputs), *(p.name for p in reports)]
    atomic.write_json(files.report_json, report)
    atomic.write_text(files.report_md, report_markdown(report, title))
    return [*outputs, *reports]


def _write_maps(out_dir: Path, c: Curation, title: str) -> list[Path]:
    rows = c.rows
    idx = sorted(c.xy)
    xy = np.asarray([c.xy[i] for i in idx], dtype=np.float32)

    def decision(i: int) -> str:
        if not c.rules[i]:
            return "kept"
        first = c.rules[i][0]
        if first.startswith("dup."):
            return "dropped: duplicate"
        if first.startswith("source."):
            return "dropped: source"
        return "dropped: filters"

    sources = [rows.sources[i] for i in idx]
    topic_names = [t["id"] + ": " + t["label"] for t in c.topic_table]
    cats = {
        "source": datamap.categorical(sources),
        "topic": datamap.categorical([c.topic[i] or "" for i in idx], topic_names),
        "subtopic": datamap.categorical([c.subtopic[i] or "" for i in idx]),
        "decision": datamap.categorical(
            [decision(i) for i in idx], ["kept", "dropped: filters", "dropped: source", "dropped: duplicate"]
        ),
    }
    data = datamap.MapData(
        xy=xy,
        prompts=[rows.prompts[i] for i in idx],
        responses=[rows.responses[i] or "" for i in idx],
        kept=[not c.rules[i] for i in idx],
        rules=[", ".join(c.rules[i]) for i in idx],
        categories=cats,
    )
    kept = sum(data.kept)
    subtitle = f"{len(idx):,} pairs ({kept:,} kept) · {len(set(sources))} sources · {len(c.topic_table)} topics"
    files = CurateLayout(out_dir)
    paths = [files.map_html, files.map_png("source"), files.map_png("topic")]
    datamap.write_html(paths[0], data, title=f"{title}: data map", subtitle=subtitle)
    datamap.write_png(paths[1], xy, *cats["source"], title=f"{title}: pairs by source")
    datamap.write_png(paths[2], xy, *cats["topic"], title=f"{title}: pairs by topic")
    return paths


RULE_ABOUT: dict[str, str] = {
    "failure.api": "no answer, or the API said error / content_filter",
    "failure.empty": "an empty answer",
    "failure.malformed": "an imported row whose prompt or answer is not text",
    "refusal": "a refusal or AI disclaimer: a listed phrase anywhere, or a first-person refusal to do the task, "
    "a disclaimer with a refusal, or a short apology in the opening sentences",
    "truncated.length": "the teacher ran out of tokens (finish_reason length)",
    "truncated.mid-sentence": "prose that stops mid-sentence (structured answers are not judged unless cut by length)",
    "truncated.code-fence": "a code block opened and never closed",
    "truncated.reasoning": "a reasoning answer cut while still reasoning",
    "reasoning.no-answer": "reasoning and no answer after it",
    "malformed.fence": "a code fence opened inside an open block",
    "malformed.json": "JSON was asked for and none parses",
    "malformed.mojibake": "replacement characters or mis-decoded text",
    "malformed.echo": "the answer repeats the whole prompt",
    "malformed.repetition": "a repetition loop (repeated lines, one 2-gram, repeated 5-grams)",
    "length.short": "fewer words than min_response_words",
    "length.long": "an answer or prompt longer than the limits",
    "language": "prose in a language not listed",
    "source.excluded": "its source is in exclude_sources",
    "source.homogeneous": "its source was flagged homogeneous (auto_exclude_homogeneous)",
    "eval.copy": "holds an eval item: a shared 13-gram or an embedding as close as a copy's",
    "dup.exact-pair": "the same prompt and answer as a kept pair (case, punctuation, spacing ignored)",
    "dup.near-pair": "a near-duplicate of a kept pair (MinHash)",
    "dup.exact-prompt": "the same prompt as a kept pair, and an answer like its",
    "dup.near-prompt": "a near-duplicate prompt of a kept pair, and an answer like its",
    "dup.semantic": "an embedding as close as a duplicate's to a kept pair's",
}
"""What each rule that drops a pair means, one line each, for the report (docs/curate.md has more)."""


def build_report(c: Curation, cfg: CurateConfig, *, seed: int, split: tuple[int, int]) -> dict[str, Any]:
    rows = c.rows
    counts: Counter[str] = Counter()
    examples: dict[str, list[dict[str, Any]]] = {}
    for i, rules in enumerate(c.rules):
        for rule in rules:
            counts[rule] += 1
            ex = examples.setdefault(rule, [])
            if len(ex) < EXAMPLES_PER_RULE:
                ex.append({
                    "response_id": rows.ids[i],
                    "source": rows.sources[i],
                    "detail": c.details[i].get(rule, ""),
                    "prompt": rows.prompts[i][:300],
                    "response": (rows.responses[i] or "")[:500],
                })  # fmt: skip
    kept = sum(c.kept)
    by_source: Counter[str] = Counter(rows.sources)
    kept_by_source: Counter[str] = Counter(s for s, k in zip(rows.sources, c.kept, strict=True) if k)
    return {
        "pairs": len(rows),
        "kept": kept,
        "dropped": len(rows) - kept,
        "funnel": c.funnel,
        "rules": {
            r: {"count": counts[r], "about": RULE_ABOUT.get(r, ""), "examples": examples[r]}
            for r, _ in counts.most_common()
        },
        "sources": [
            s.as_dict()
            | {"total": by_source[s.source], "kept": kept_by_source[s.source], "excluded": c.excluded.get(s.source)}
            for s in c.sources
        ],
        "excluded_sources": c.excluded,
        "dedup": c.dedup_counts,
        "decontamination": {
            "eval_items": c.eval_items,
            "action": cfg.decontaminate.action,
            "pairs": len(c.eval_copies),
            "examples": [
                {"response_id": rows.ids[i], "detail": why, "prompt": rows.prompts[i][:300]}
                for i, why in list(c.eval_copies.items())[:EXAMPLES_PER_RULE]
            ],
        },
        "topics": c.topic_table,
        "embedding_model": c.embed_model,
        "split": {"train": split[0], "validation": split[1], "fraction": cfg.validation_fraction, "seed": seed},
        "steps": {s.name: s.as_dict() for s in c.steps.stats},
    }


_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-!|~>])")


def _md(text: object) -> str:
    """Any text as plain Markdown on one line: HTML escaped, Markdown's own characters (and `|`,
    which splits table cells) backslashed, newlines made spaces."""
    return _MD_SPECIAL.sub(r"\\\1", html.escape(" ".join(str(text).split()), quote=False))


def _md_cell(text: str, n: int = 80) -> str:
    text = " ".join(str(text).split())
    return _md(text if len(text) <= n else text[: n - 1] + "…")


def report_markdown(r: dict[str, Any], title: str) -> str:
    out = [
        f"# Curation report: {_md(title)}",
        "",
        f"{r['pairs']:,} pairs → **{r['kept']:,} kept**, {r['dropped']:,} dropped.",
        "",
    ]
    out += ["## Funnel", "", "| step | dropped | remaining |", "|---|---:|---:|"]
    out += [f"| {f['step']} | {f['dropped']:,} | {f['remaining']:,} |" for f in r["funnel"]]
    out += ["", "## Rules", "", "| rule | pairs | fires on | example |", "|---|---:|---|---|"]
    for rule, info in r["rules"].items():
        ex = info["examples"][0]
        out.append(
            f"| `{rule}` | {info['count']:,} | {_md_cell(info['about'], 70)} "
            f"| {_md_cell(ex['detail'], 40)} — {_md_cell(ex['response'], 60)} |"
        )
    dc = r["decontamination"]
    out += ["", "## Eval-set copies", ""]
    if not dc["eval_items"]:
        out.append("Not checked: no eval data (curate.decontaminate).")
    else:
        verb = "dropped" if dc["action"] == "drop" else "flagged (kept)"
        out.append(f"{dc['pairs']:,} pairs hold one of {dc['eval_items']:,} eval items: {verb}.")
        out += [f"- {_md_cell(ex['detail'], 100)} — {_md_cell(ex['prompt'], 60)}" for ex in dc["examples"]]
    out += ["", "## Sources", ""]
    out += [
        "| source | pairs | kept | ≤3-token answers | distinct-2 | prompt gzip | templates | near-dup "
        "| neighbour dist.× | top-3 subtopics | homogeneous |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in r["sources"]:
        spread = "-" if s["relative_neighbour_distance"] is None else f"{s['relative_neighbour_distance']:.2f}"
        conc = "-" if s["cluster_concentration"] is None else f"{s['cluster_concentration']:.0%}"
        flag = "**yes**" if s["homogeneous"] else "no"
        if s["excluded"]:
            flag += f" (excluded: {_md(s['excluded'])})"
        out.append(
            f"| {_md(s['source'])} | {s['total']:,} | {s['kept']:,} | {s['short_answer_share']:.0%} "
            f"| {s['distinct_2']:.2f} "
            f"| {s['prompt_gzip_ratio']:.2f} | {s['template_share']:.0%} | {s['near_dup_rate']:.0%} | {spread} "
            f"| {conc} | {flag} |"
        )
    for s in r["sources"]:
        if s["reasons"]:
            out.append(f"\n- **{_md(s['source'])}**: " + "; ".join(_md(x) for x in s["reasons"]))
    out += ["", "## Topics", ""]
    for t in r["topics"][:15]:
        subs = ", ".join(f"{_md(x['label'])} ({x['size']})" for x in t["subtopics"][:5])
        out.append(f"- **{t['id']} {_md(t['label'])}** ({t['size']:,}): {subs}")
    sp = r["split"]
    out += ["", "## Outputs", "", f"Split: {sp['train']:,} train / {sp['validation']:,} validation "
            f"({sp['fraction']:.0%}, seed {sp['seed']}). Embeddings: `{r['embedding_model']}`.", ""]  # fmt: skip
    out += [f"- {_md(p)}" for p in r.get("outputs", [])]
    out += ["", "## Steps", "", "| step | rows | seconds | rows/s | peak RSS MB |", "|---|---:|---:|---:|---:|"]
    for name, s in r["steps"].items():
        rate = "-" if s["rows_per_s"] is None else f"{s['rows_per_s']:,.0f}"
        out.append(f"| {name} | {s['rows']:,} | {s['seconds']:.2f} | {rate} | {s['peak_rss_mb']:,.0f} |")
    return "\n".join(out) + "\n"
