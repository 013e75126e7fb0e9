"""Build `report/index.html` for a run directory from its documented files only (docs/architecture.md):
manifest.json, curate/report.json + map.html, train/metrics.jsonl + loss.png, export/quant_report.json,
eval/summary.json + figure3-*.png. Images are embedded, so the page is one file; the data map (a page
of its own, often large) is linked and shown in a frame. Sections whose stage did not run are left out.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import time
from importlib import resources
from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.config import STAGE_ORDER
from distill4all.layout import RunLayout

CHAT_QUESTIONS = [
    "Give three tips for staying healthy.",
    "Write a Python function that reverses a string.",
    "What is the capital of France?",
]


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _png(path: Path) -> str | None:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def chat_model(layout: RunLayout) -> Path | None:
    """The model a user would chat with: the smallest exported quantization, else the trained model."""
    ggufs = sorted((p for p in layout.export.ggufs() if p.name.startswith("model-q")), key=lambda p: p.stat().st_size)
    if ggufs:
        return ggufs[0]
    trained = layout.train.model
    return trained if trained.is_dir() else None


def sample_chats(layout: RunLayout, max_tokens: int = 96) -> list[dict[str, str]]:
    """A few answers of the run's model, cached in report/chats.json until the model changes."""
    model = chat_model(layout)
    if model is None:
        return []
    cache = layout.report_chats
    cached = _json(cache)
    stamp = model.stat().st_mtime
    if isinstance(cached, dict) and cached.get("model") == str(model) and cached.get("mtime") == stamp:
        return list(cached["chats"])
    from distill4all.runtime.engine import SamplingParams, load_engine

    engine = load_engine(str(model))
    try:
        chats = []
        for q in CHAT_QUESTIONS:
            c = engine.chat([{"role": "user", "content": q}], SamplingParams(max_tokens=max_tokens))
            chats.append({"user": q, "assistant": c.text, "tokens_per_s": f"{c.tokens_per_second:.0f}"})
    finally:
        engine.close()
    atomic.write_json(cache, {"model": str(model), "mtime": stamp, "chats": chats})
    return chats


def gather(layout: RunLayout, *, chats: bool = True) -> dict[str, Any]:
    manifest = _json(layout.manifest) or {}
    stages = manifest.get("stages", {})
    metrics = []
    mpath = layout.train.metrics
    if mpath.is_file():
        for line in mpath.read_text(encoding="utf-8").split("\n"):  # JSONL: U+2028 and U+0085 are text
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    val = [m for m in metrics if "val_loss" in m]
    ctx: dict[str, Any] = {
        "run": manifest.get("run", layout.root.name),
        "built_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "manifest": manifest,
        "stages": [(name, stages[name]) for name in STAGE_ORDER if name in stages],
        "total_seconds": sum(s.get("seconds", 0) for s in stages.values()),
        "costs": manifest.get("costs", {}),
        "packages": manifest.get("environment", {}).get("packages", {}),
        "collect": stages.get("collect", {}).get("counts"),
        "curate": _json(layout.curate.report_json),
        "map": layout.curate.map_html.is_file(),
        "train": stages.get("train", {}).get("counts"),
        "val_losses": [(m["step"], m["val_loss"]) for m in val],
        "loss_png": _png(layout.train.loss_png),
        "quant": _json(layout.export.quant_report),
        "eval": _json(layout.eval.summary),
        "figures": [(m, src) for m in ("faithful", "conditioned") if (src := _png(layout.eval.figure(m))) is not None],
        "chats": sample_chats(layout) if chats else [],
        "chat_model": str(chat_model(layout) or ""),
    }
    ctx["funnel"] = funnel(ctx)
    ctx["student"] = student_vs_teacher(layout, ctx["eval"], measure=chats)
    return ctx


def student_vs_teacher(layout: RunLayout, summary: Any, *, measure: bool = True) -> dict[str, Any] | None:
    """A pruned student against its teacher: layers, parameters, its GGUF files, and per metric the
    medians of the teacher (eval's "base"), the student before and after training, with the share of
    the log-perplexity gap the training closed."""
    prune = _json(layout.train.student / "prune.json")
    if not isinstance(prune, dict):
        return None
    gaps = []
    for metric, per_model in ((summary or {}).get("summaries") or {}).items():
        # unclipped: a pruned student's median is often past the figure's clip at 100
        medians = {
            label: per_model[label].get("median_unclipped", per_model[label]["median"])
            for label in ("base", "pruned", "trained")
            if label in per_model
        }
        if len(medians) < 3 or not all(isinstance(v, float | int) and v > 0 for v in medians.values()):
            continue
        teacher, start, trained = (math.log(medians[k]) for k in ("base", "pruned", "trained"))
        closed = (start - trained) / (start - teacher) if start > teacher else None
        tests = ((summary or {}).get("paired") or {}).get(metric) or []
        vs_start: dict[str, Any] = next(
            (t for t in tests if t.get("model") == "trained" and t.get("baseline") == "pruned"), {}
        )
        gaps.append({"metric": metric, **medians, "closed": closed, "lower": vs_start.get("share_lower_unclipped"),
                     "p": vs_start.get("p_lower_unclipped")})  # fmt: skip
    files = [(p.name, p.stat().st_size) for p in layout.export.ggufs()]
    return {"prune": prune, "gaps": gaps, "files": files, "speed": decode_speeds(layout, prune) if measure else []}


def decode_speeds(layout: RunLayout, prune: dict[str, Any]) -> list[tuple[str, float]]:
    """Greedy decode tokens/s on llama.cpp of the student's smallest GGUF and of the teacher's GGUF
    (when the teacher has one), cached in report/speed.json until either file changes."""
    from distill4all.errors import UserError
    from distill4all.models import resolve_model
    from distill4all.runtime.engine import decode_speed

    ggufs = sorted(layout.export.ggufs(), key=lambda p: p.stat().st_size)
    models = [("student", ggufs[0])] if ggufs else []
    with contextlib.suppress(UserError):  # a teacher without a GGUF: the student's speed alone
        models.append(("teacher", resolve_model(str(prune.get("source", "")), want="gguf").path))
    if not models:
        return []
    stamp = [[str(p), p.stat().st_mtime] for _, p in models]
    cache = layout.report_speed
    cached = _json(cache)
    if isinstance(cached, dict) and cached.get("models") == stamp:
        return [(str(name), float(tps)) for name, tps in cached["speed"]]
    speed = [(f"{who} ({path.name})", decode_speed(path)) for who, path in models]
    atomic.write_json(cache, {"models": stamp, "speed": speed})
    return speed


def funnel(ctx: dict[str, Any]) -> list[tuple[str, int]]:
    """Counts from prompts to the training set, as the paper reports them (~1M → 806,199 → 437,605)."""
    steps: list[tuple[str, int]] = []
    c = ctx.get("collect") or {}
    if "prompts" in c:
        steps.append(("prompts gathered", int(c["prompts"])))
    if "answered" in c:
        steps.append(("answers collected", int(c["answered"])))
    cur = ctx.get("curate") or {}
    for f in cur.get("funnel", []):
        if f["step"] == "pairs":  # curate's starting count: the answers above
            continue
        steps.append((f"after {f['step']}", int(f["remaining"])))
    t = ctx.get("train") or {}
    if "train_examples" in t:
        steps.append(("training examples", int(t["train_examples"])))
    return steps


def build_report(run_dir: Path, *, chats: bool = True) -> Path:
    from jinja2 import Environment, select_autoescape

    env = Environment(autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True)
    env.filters["num"] = lambda v, d=3: (
        f"{v:,.{d}f}" if isinstance(v, float) else (f"{v:,}" if isinstance(v, int) else v)
    )
    env.globals["pct"] = lambda v: f"{v:.1%}" if isinstance(v, (int, float)) else "-"
    template = env.from_string(resources.files("distill4all.report").joinpath("template.html").read_text())
    layout = RunLayout.read(run_dir)  # the manifest tells where moved stage folders are
    html = template.render(**gather(layout, chats=chats))
    out = layout.report_page
    atomic.write_text(out, html)
    return out
