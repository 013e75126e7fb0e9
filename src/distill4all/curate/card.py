"""The curated data's dataset card (curate/README.md): Hugging Face front matter (licence, source
datasets, size category, task, language when the filters fixed it) and a body with the teachers and
their terms, the funnel and each rule's count, the rules' settings and a link to the data map.

Its `distill4all` key keeps the teacher model ids, which train reads into the model card.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.config import CurateConfig, SourceConfig
from distill4all.models.cards import UNKNOWN_LICENCE, card_with, teacher_terms, terms_line

# The hub's size categories (the `size_categories` values its dataset search filters on).
_SIZES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
          (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))  # fmt: skip


def size_category(n: int) -> str:
    return next((name for limit, name in _SIZES if n < limit), "n>1B")


def _languages(cfg: CurateConfig) -> list[str] | None:
    """The languages the filters kept, when a language rule ran; else not known."""
    disabled = set(cfg.filters.disable)
    return list(cfg.filters.languages) if cfg.filters.languages and "language" not in disabled else None


def _source_line(name: str, src: SourceConfig | None, counts: dict[str, Any]) -> str:
    kept = f"{counts.get('kept', 0):,} of {counts.get('total', 0):,} pairs kept"
    if src is None:
        return f"- `{name}`: imported pairs ({kept})"
    if src.format == "hf" and src.dataset:
        return f"- `{name}`: the hub dataset [{src.dataset}](https://huggingface.co/datasets/{src.dataset}) ({kept})"
    return f"- `{name}`: `{src.path.name if src.path else '?'}`, read as `{src.format}` ({kept})"


def dataset_card(
    report: dict[str, Any], cfg: CurateConfig, *, title: str, teachers: dict[str, int],
    sources: dict[str, SourceConfig], has_map: bool,
) -> Any:  # fmt: skip
    """The card of the curated data from the curation's report (report.json's dict)."""
    from huggingface_hub import DatasetCard, DatasetCardData

    hub_sources = sorted({s.dataset for s in sources.values() if s.format == "hf" and s.dataset})
    data = DatasetCardData(
        license=UNKNOWN_LICENCE,
        license_name="unknown",
        language=_languages(cfg),
        size_categories=[size_category(report["kept"])],
        source_datasets=hub_sources or ["original"],
        task_categories=["text-generation"],
        task_ids=["dialogue-modeling"],
        pretty_name=f"{title}: curated teacher answers",
        tags=["distill4all", "distillation"],
        distill4all={"teachers": list(teachers), "pairs": report["kept"]},  # OWN_KEY
    )
    body = [f"# {title}: curated teacher answers", "",
            f"{report['kept']:,} prompt–answer pairs kept of {report['pairs']:,}, in the GPT4All format "
            "(`train.jsonl`: prompt, response, source), Parquet and OpenAI messages; `split/` holds a "
            f"{report['split']['fraction']:.0%} validation split (seed {report['split']['seed']}).", ""]  # fmt: skip
    body += ["## Teachers", ""]
    body += [terms_line(teacher_terms(m)) + f": {n:,} kept answers" for m, n in teachers.items()] or ["- none"]
    body += ["", "## Licence", "",
             "Not known to distill4all (`license: other`): each prompt keeps its source's terms and each "
             "answer its teacher's terms (above). Check both before sharing the data.", ""]  # fmt: skip
    body += ["## Sources", ""]
    body += [_source_line(s["source"], sources.get(s["source"]), s) for s in report["sources"]]
    body += ["", "## Curation funnel", "", "| step | dropped | remaining |", "|---|---:|---:|"]
    body += [f"| {f['step']} | {f['dropped']:,} | {f['remaining']:,} |" for f in report["funnel"]]
    body += ["", "## Rules", "", "| rule | pairs it dropped |", "|---|---:|"]
    body += [f"| `{rule}` | {info['count']:,} |" for rule, info in report["rules"].items()] or ["| none | 0 |"]
    filters = ", ".join(f"`{k}: {v}`" for k, v in cfg.filters.model_dump(mode="json").items())
    excluded = ", ".join(f"`{s}` ({why})" for s, why in report["excluded_sources"].items()) or "none"
    body += ["", f"Settings: {filters}; dedup `{cfg.dedup.model_dump(mode='json')}`; excluded sources: {excluded}.", ""]
    if has_map:
        body += ["## Data map", "", "[map.html](map.html): every pair on a 2-D map, coloured by source, topic "
                 "and decision; `report.md` lists examples of each rule.", ""]  # fmt: skip
    return card_with(DatasetCard, data, "\n".join(body))


def write_dataset_card(path: Path, card: Any) -> Path:
    atomic.write_text(path, str(card))
    return path
