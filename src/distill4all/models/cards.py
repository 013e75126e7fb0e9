"""Model cards and where a model comes from: its base model (a Hugging Face hub id when known),
the licence it inherits, the teachers whose answers trained it and their terms of use.

Provenance travels with the files, as cards (README.md with YAML front matter, written with
huggingface_hub's card classes): curate writes a dataset card beside train.jsonl, train reads it
and writes the model card into train/model/, export reads that card for the merged folder's card,
the export folder's card and the GGUF's `general.*` metadata. A model that arrives with no card of
ours is looked up among the named models (models/registry.py); what is not known is written as
`other` / unknown, never guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distill4all.models.registry import builtin_of

UNKNOWN_LICENCE = "other"
HUB = "https://huggingface.co"
CARD = "README.md"
OWN_KEY = "distill4all"  # the card key holding what the next stage reads back (teachers, data)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Terms:
    model: str
    terms: str  # in words
    link: str | None = None


# Providers whose terms govern the use of their models' outputs, by model-id pattern. Anything
# else is reported as unknown: the user knows where their teacher came from, we do not.
_PROVIDER_TERMS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"^(gpt-|o[1-9](-|$)|chatgpt|text-davinci)"), "OpenAI's terms of use",
     "https://openai.com/policies/terms-of-use"),
    (re.compile(r"^claude"), "Anthropic's commercial terms", "https://www.anthropic.com/legal/commercial-terms"),
    (re.compile(r"^(models/)?gemini"), "the Gemini API terms", "https://ai.google.dev/gemini-api/terms"),
)  # fmt: skip


def is_hub_id(text: str | None) -> bool:
    """`owner/name` that is not also a local path."""
    return bool(text) and bool(_HUB_ID.match(str(text))) and not Path(str(text)).expanduser().exists()


def hub_url(hub_id: str) -> str:
    return f"{HUB}/{hub_id}"


def teacher_terms(model: str) -> Terms:
    """The terms that govern a teacher model's answers, where known."""
    if (b := builtin_of(model)) is not None:
        where = b.hub_id or b.name
        return Terms(model, f"{b.licence} (the licence of {where})", hub_url(b.hub_id) if b.hub_id else None)
    for pattern, words, link in _PROVIDER_TERMS:
        if pattern.match(model.lower()):
            return Terms(model, words, link)
    if model == "import":
        return Terms("unknown (imported pairs)", "unknown: the answers were imported from a file")
    return Terms(model, "unknown: check the terms of the provider that served this model")


@dataclass(frozen=True)
class Provenance:
    """What a model card says about where a model comes from."""

    base_model: str | None  # hub id of the model it was trained from (None: not known or none)
    base_name: str  # how text names that model
    license: str  # an HF licence id inherited from the base, or `other`
    teachers: tuple[str, ...] = ()  # teacher model ids of its training data
    data: str | None = None  # its training data, as a path (relative to the run directory inside one)
    data_card: str | None = None  # that data's dataset card, likewise
    datasets: tuple[str, ...] = ()  # hub ids of the training data's source datasets
    notes: tuple[str, ...] = field(default=())  # e.g. "depth-pruned to 20 of 30 layers"

    def own(self) -> dict[str, Any]:
        """What the card's `distill4all` key keeps for the next stage."""
        return {"base_name": self.base_name, "teachers": list(self.teachers), "data": self.data,
                "data_card": self.data_card}  # fmt: skip


def base_provenance(spec: str | Path) -> Provenance:
    """A model as a base: a named model (its hub id and licence), a folder with a hub card (its
    licence), or unknown."""
    if (b := builtin_of(spec)) is not None:
        return Provenance(b.hub_id, b.hub_id or b.name, b.licence.lower())
    path = Path(spec).expanduser()
    card = read_model_card(path)
    if card is not None and card.data.license:
        return Provenance(None, path.name, str(card.data.license))
    name = str(spec) if is_hub_id(str(spec)) else path.name
    return Provenance(str(spec) if is_hub_id(str(spec)) else None, name, UNKNOWN_LICENCE)


def read_model_card(folder: Path) -> Any:
    """The ModelCard in `folder`, or None (no card, or one that does not parse)."""
    from huggingface_hub import ModelCard

    path = folder / CARD
    if not path.is_file():
        return None
    try:
        return ModelCard.load(path)
    except (ValueError, OSError):
        return None


def model_provenance(folder: Path) -> Provenance | None:
    """What a card we wrote says of the model in `folder` (None for a card that is not ours)."""
    card = read_model_card(folder)
    if card is None:
        return None
    data = card.data.to_dict()
    own = data.get(OWN_KEY)
    if not isinstance(own, dict):
        return None
    base = data.get("base_model")
    datasets = data.get("datasets") or []
    return Provenance(
        base_model=base if isinstance(base, str) else None,
        base_name=str(own.get("base_name") or base or "unknown"),
        license=str(data.get("license") or UNKNOWN_LICENCE),
        teachers=tuple(str(t) for t in own.get("teachers") or []),
        data=own.get("data"),
        data_card=own.get("data_card"),
        datasets=tuple(str(d) for d in (datasets if isinstance(datasets, list) else [datasets])),
    )


def dataset_provenance(card_path: Path) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(teacher model ids, source dataset hub ids) from a dataset card curate wrote; empty where absent."""
    from huggingface_hub import DatasetCard

    if not card_path.is_file():
        return (), ()
    try:
        data = DatasetCard.load(card_path).data.to_dict()
    except (ValueError, OSError):
        return (), ()
    own = data.get(OWN_KEY) if isinstance(data.get(OWN_KEY), dict) else {}
    sources = [s for s in data.get("source_datasets") or [] if is_hub_id(s)]
    return tuple(str(t) for t in own.get("teachers") or []), tuple(sources)


@dataclass(frozen=True)
class EvalRow:
    metric: str  # faithful / conditioned
    model: str  # the eval label (trained, exported, base, …)
    median: float
    n: int


def eval_rows(summary: dict[str, Any], labels: tuple[str, ...]) -> list[EvalRow]:
    """The perplexity medians of `labels` (and the baseline's, for comparison) from eval/summary.json."""
    rows = []
    for metric, by_model in (summary.get("summaries") or {}).items():
        for label, s in by_model.items():
            if label in labels and isinstance(s, dict) and s.get("median") is not None:
                rows.append(EvalRow(metric, label, float(s["median"]), int(s.get("n", 0))))
    return rows


def licence_section(p: Provenance) -> list[str]:
    lines = ["## Licence", ""]
    if p.license == UNKNOWN_LICENCE:
        lines.append(f"The licence of the base model ({p.base_name}) is not known here: `license: other`. "
                     "Check its terms before you share this model.")  # fmt: skip
    else:
        lines.append(f"`{p.license}`, inherited from the base model ({p.base_name}).")
    if p.teachers:
        lines += ["", "The training data's answers were written by teacher models whose terms may restrict "
                  "how their outputs are used:", ""]  # fmt: skip
        lines += [terms_line(teacher_terms(t)) for t in p.teachers]
    return [*lines, ""]


def terms_line(t: Terms) -> str:
    return f"- `{t.model}`: {t.terms}" + (f" ({t.link})" if t.link else "")


def model_card(
    p: Provenance,
    *,
    title: str,
    summary: str,
    library: str,
    sections: list[str],
    evals: tuple[EvalRow, ...] = (),
    tags: tuple[str, ...] = (),
) -> Any:
    """A ModelCard: front matter from `p` (base model, licence, datasets, eval results), then the
    title, `summary`, the caller's `sections` (Markdown lines), the data, licence and evaluation."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    results = [
        EvalResult(task_type="text-generation", dataset_type="self-instruct",
                   dataset_name="Self-Instruct user-oriented", metric_type="perplexity",
                   metric_name=f"{r.metric} perplexity of {r.model} (median, clipped at 100)",
                   metric_value=round(r.median, 4))
        for r in evals
    ]  # fmt: skip
    data = ModelCardData(
        base_model=p.base_model,
        license=p.license,
        license_name="unknown" if p.license == UNKNOWN_LICENCE else None,
        datasets=list(p.datasets) or None,
        library_name=library,
        pipeline_tag="text-generation",
        tags=["distill4all", *tags],
        model_name=title,
        eval_results=results or None,
        distill4all=p.own(),  # OWN_KEY
    )
    body = [f"# {title}", "", summary, "", *sections]
    body += ["## Base model", "", f"[{p.base_model}]({hub_url(p.base_model)})" if p.base_model else p.base_name]
    body += [*(["", *p.notes] if p.notes else []), ""]
    body += ["## Training data", "", f"`{p.data}`" if p.data else "not recorded", ""]
    if p.data_card:
        body += [f"Its dataset card: `{p.data_card}`.", ""]
    body += licence_section(p)
    if evals:
        body += ["## Evaluation", "", "| metric | model | median perplexity | items |", "|---|---|---:|---:|"]
        body += [f"| {r.metric} | {r.model} | {r.median:.2f} | {r.n} |" for r in evals]
        body.append("")
    return card_with(ModelCard, data, "\n".join(body))


def card_with(card_class: Any, data: Any, text: str) -> Any:
    """A card of `card_class` with `data` as its front matter and `text` as its body."""
    card = card_class("---\n\n---\n")
    card.data = data
    card.text = "\n" + text.rstrip("\n") + "\n"
    return card
