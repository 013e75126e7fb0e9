"""Every configured source read into the run store, with a line per source on what was kept."""

from __future__ import annotations

from rich.console import Console

from distill4all.collect.sources import SourceStats, read_source
from distill4all.config import CollectConfig
from distill4all.store import Store, tasks


def load_sources(store: Store, cfg: CollectConfig, seed: int, console: Console) -> dict[str, SourceStats]:
    """Read every source into the store (idempotent: prompts already there are kept)."""
    stats: dict[str, SourceStats] = {}
    teachers = [(t.name, t.samples) for t in cfg.teachers]

    def warn(message: str) -> None:
        console.print(message, style="yellow", markup=False)

    for source in cfg.sources:
        stats[source.name] = st = SourceStats()
        prompts = read_source(source, run_seed=seed, stats=st, warn=warn)
        tasks.add_prompts(store, prompts, teachers)
        console.print(
            f"source {source.name}: {st.kept} prompts from {st.rows} rows"
            + "".join(
                f", {n} {label}"
                for n, label in (
                    (st.duplicates, "duplicates"),
                    (st.too_short, "too short"),
                    (st.too_long, "too long"),
                    (st.sampled_out, "not sampled"),
                    (st.bad_rows, "bad rows skipped"),
                )
                if n
            )
        )
    return stats
