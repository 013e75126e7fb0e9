"""Score several models on the same items, resumably, and compare them.

Per model, per-item results are appended to `perplexity-<label>.jsonl` as they are computed
(flushed every item), so a killed evaluation resumes at the first item without a result; a torn
last line is discarded on resume.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distill4all import atomic
from distill4all.evaluate.compare import Paired, Summary, paired, summarize
from distill4all.evaluate.data import Item
from distill4all.evaluate.figures import perplexity_figure
from distill4all.evaluate.perplexity import conditioned_perplexity, faithful_perplexity
from distill4all.layout import EvalLayout
from distill4all.models.chat_templates import layout_jinja

if TYPE_CHECKING:
    from distill4all.runtime.engine import Backend

METRICS = ("faithful", "conditioned")


@dataclass(frozen=True)
class ModelSpec:
    label: str  # in tables and plots
    spec: str  # a model name or path the runtime loads
    backend: Backend = "auto"  # the engine that scores it (auto: llama.cpp for a GGUF, else transformers)
    template: str = "own"  # the prompt layout it is scored in: its own chat template, or a named one


def safe_label(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label)


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    """Results already on disk; a torn last line (a kill mid-write) is cut off."""
    if not path.exists():
        return {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    done = {}
    for line in data[:end].decode("utf-8").split("\n")[:-1]:  # not splitlines: U+2028 and U+0085 are text
        row = json.loads(line)
        done[row["id"]] = row
    return done


def _float(x: Any) -> float:
    return math.nan if x is None else float(x)


def score_model(
    model: ModelSpec,
    items: list[Item],
    out: Path,
    *,
    metrics: tuple[str, ...],
    stride: int,
    on_item: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Per-item perplexities of one model (in `items` order), computing only what is missing."""
    from distill4all.runtime.engine import load_engine

    path = EvalLayout(out).items(safe_label(model.label))
    done = _read_done(path)
    todo = [it for it in items if it.id not in done]
    if todo:
        engine = load_engine(model.spec, model.backend)
        if model.template != "own":
            engine.use_chat_template(layout_jinja(model.template, engine.adds_bos))
        try:
            atomic.claim(path)
            with open(path, "a", encoding="utf-8") as f:
                for it in todo:
                    t0 = time.perf_counter()
                    row: dict[str, Any] = {"id": it.id, "model": model.label, "engine": engine.backend}
                    if "faithful" in metrics:
                        row["faithful"] = _json_float(faithful_perplexity(engine, it, stride))
                    if "conditioned" in metrics:
                        row["conditioned"] = _json_float(conditioned_perplexity(engine, it))
                    row["seconds"] = round(time.perf_counter() - t0, 4)
                    f.write(json.dumps(row) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                    done[it.id] = row
                    if on_item is not None:
                        on_item()
        finally:
            engine.close()
    return {m: [_float(done[it.id].get(m)) for it in items] for m in metrics}


def engines(out: Path, models: list[ModelSpec]) -> dict[str, str]:
    """The engine that scored each model, as its per-item rows record it."""
    found = {}
    for m in models:
        rows = _read_done(EvalLayout(out).items(safe_label(m.label)))
        names = sorted({str(r.get("engine")) for r in rows.values() if r.get("engine")})
        found[m.label] = ", ".join(names) or "unknown"
    return found


def _json_float(x: float) -> float | str | None:
    """JSON has no NaN/inf: NaN is null, inf is the string 'inf'."""
    if math.isnan(x):
        return None
    return "inf" if math.isinf(x) else x


@dataclass
class Comparison:
    summaries: dict[str, dict[str, Summary]]  # metric → model → summary
    paired: dict[str, list[Paired]]  # metric → each model vs the baseline
    figures: list[Path]

    def as_dict(self) -> dict[str, Any]:
        return {
            "summaries": {m: {k: s.as_dict() for k, s in v.items()} for m, v in self.summaries.items()},
            "paired": {m: [p.as_dict() for p in v] for m, v in self.paired.items()},
        }


def compare(
    results: dict[str, dict[str, list[float]]],
    *,
    baseline: str | None,
    metrics: tuple[str, ...],
    clip: float,
    out: Path,
) -> Comparison:
    """Summaries, paired tests vs the baseline, and the Figure-3 plot per metric."""
    summaries, tests, figures = {}, {}, []
    titles = {"faithful": "Ground-truth perplexity (the paper's computation)", "conditioned": "Conditioned perplexity"}
    for m in metrics:
        per_model = {label: r[m] for label, r in results.items()}
        summaries[m] = {label: summarize(v, clip) for label, v in per_model.items()}
        if baseline is not None and baseline in per_model:
            tests[m] = [
                paired(label, v, baseline, per_model[baseline], clip)
                for label, v in per_model.items()
                if label != baseline
            ]
        figures.append(perplexity_figure(per_model, EvalLayout(out).figure(m), title=titles[m], clip=clip))
    return Comparison(summaries, tests, figures)


def write_summary(comparison: Comparison, extra: dict[str, Any], path: Path) -> None:
    atomic.write_json(path, comparison.as_dict() | extra)
