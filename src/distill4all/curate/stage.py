"""Stage `curate`: decide every collected (or imported) pair, and write the curated data.

Reads the run store (after `collect`, or a pairs file named by `curate.input`, imported first),
writes one decision row per response and the outputs listed in outputs.py into `run_dir/curate/`.
A rerun after a kill recomputes the same decisions; finished embeddings and projections are reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from distill4all.config import RunConfig
from distill4all.curate import card, curation, pairs
from distill4all.errors import StageError
from distill4all.run import StageContext, StageResult
from distill4all.store import decisions

UPSTREAM: tuple[str, ...] = ("collect",)
READS: tuple[str, ...] = ()


def inputs(config: RunConfig) -> list[Path]:
    assert config.curate is not None
    return [config.curate.input] if config.curate.input is not None else []


def eval_data(config: RunConfig, console: Console) -> list[Path]:
    """The eval item files to keep out: curate.decontaminate.data, else the run's eval data (when
    the file is there); said aloud when there are none."""
    assert config.curate is not None
    dc = config.curate.decontaminate
    if not dc.enabled:
        return []
    if dc.data:
        missing = [p for p in dc.data if not p.is_file()]
        if missing:
            raise StageError(f"curate.decontaminate.data: {missing[0]} does not exist")
        return list(dc.data)
    if config.eval is not None and config.eval.data_path().is_file():
        return [config.eval.data_path()]
    console.print("[yellow]curate: no eval data to check for copies (set curate.decontaminate.data)[/yellow]")
    return []


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.config.curate
    assert cfg is not None
    if cfg.input is not None:
        pairs.import_pairs(ctx.store, cfg.input, cfg.import_teacher, malformed=cfg.malformed)
    result = curation.curate(
        ctx.store, cfg, ctx.dir, seed=ctx.config.seed, title=ctx.config.name, console=ctx.console, quiet=ctx.quiet,
        eval_data=eval_data(ctx.config, ctx.console),
    )  # fmt: skip
    kept = sum(result.kept)
    funnel = {f["step"]: f["remaining"] for f in result.funnel}
    counts = {
        "pairs": len(result.rows),
        "after_filters": funnel["failed or malformed answers"],
        "after_sources": funnel["excluded sources"],
        "kept": kept,
        "dropped": len(result.rows) - kept,
        "homogeneous_sources": sorted(s.source for s in result.sources if s.homogeneous),
        "excluded_sources": sorted(result.excluded),
        "eval_copies": len(result.eval_copies),
        "eval_items_checked": result.eval_items,
    }
    files = ctx.layout.curate
    # The card names the collect sources as configured: a change to them redoes collect, and so this stage.
    sources = {s.name: s for s in ctx.config.collect.sources} if ctx.config.collect is not None else {}
    dataset_card = card.dataset_card(
        json.loads(files.report_json.read_text(encoding="utf-8")), cfg, title=ctx.config.name,
        teachers=decisions.kept_by_model(ctx.store), sources=sources, has_map=files.map_html.is_file(),
    )  # fmt: skip
    artifacts = [files.train_pairs, files.report_json, card.write_dataset_card(files.card, dataset_card)]
    if files.map_html.is_file():
        artifacts.append(files.map_html)
    return StageResult(counts=counts, artifacts=artifacts)


def reset(ctx: StageContext) -> None:
    """Forget the decisions (and imported pairs); the embeddings cache stays. Its files are
    removed by the runner."""
    cfg = ctx.config.curate
    decisions.clear(ctx.store)
    if cfg is not None and cfg.input is not None:
        pairs.remove_import(ctx.store, cfg.import_teacher)
