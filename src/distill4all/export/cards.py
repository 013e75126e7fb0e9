"""The export's cards: the merged checkpoint's and the GGUF folder's, from the exported model's
provenance (its card, when train wrote one; its adapter's base; or the named model it is)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill4all.export.merge import is_adapter
from distill4all.models.cards import (
    EvalRow,
    Provenance,
    base_provenance,
    eval_rows,
    hub_url,
    model_card,
    model_provenance,
)
from distill4all.models.registry import builtin_of
from distill4all.runtime.engine import adapter_base

EVAL_LABELS = ("exported", "trained", "base", "pruned")


def source_provenance(spec: str) -> tuple[Provenance, str | None]:
    """(provenance, source URL) of the model to export. A model train made carries its card; an
    adapter of another origin has its base's; a named hub model converted as it is has its hub
    page as the GGUF's source."""
    path = Path(spec).expanduser()
    own = model_provenance(path) if path.is_dir() else None
    if own is not None:
        return own, None
    if is_adapter(path):
        return base_provenance(str(adapter_base(path))), None
    named = builtin_of(spec)
    return base_provenance(spec), hub_url(named.hub_id) if named is not None and named.hub_id else None


def merged_card(p: Provenance) -> Any:
    return model_card(
        p,
        title="Merged model",
        summary="A LoRA adapter merged into its base model by distill4all: a plain transformers checkpoint "
        "(readable by transformers 4 and 5), the one the GGUF files beside it were made from.",
        library="transformers",
        sections=[],
    )


def read_evals(summary: Path | None) -> list[EvalRow]:
    if summary is None or not summary.is_file():
        return []
    try:
        return eval_rows(json.loads(summary.read_text(encoding="utf-8")), EVAL_LABELS)
    except (OSError, ValueError):
        return []


def export_card(p: Provenance, ggufs: list[Path], *, evals: list[EvalRow], runtimes: bool) -> Any:
    files = ["## Files", "", "| file | size |", "|---|---:|"]
    files += [f"| `{g.name}` | {g.stat().st_size / 1e6:,.1f} MB |" for g in ggufs]
    files += ["", "Each GGUF carries the chat template, its licence and base model (`general.*` keys).", ""]
    if runtimes:
        name = ggufs[-1].name
        files += ["## Use", "", f"- distill4all: `distill4all chat {name}`",
                  f"- Ollama: `ollama create my-model -f {Path(name).with_suffix('.Modelfile')}`",
                  "- GPT4All: copy the GGUF into the app's model folder; `gpt4all.json` holds its model-list "
                  "entry with the prompt template (docs/export.md shows the Python bindings call)", ""]  # fmt: skip
    return model_card(
        p,
        title="GGUF export",
        summary="GGUF files for llama.cpp and the runtimes built on it (Ollama, GPT4All, LM Studio), written and "
        "quantized by distill4all.",
        library="gguf",
        sections=files,
        evals=tuple(evals),
        tags=("gguf",),
    )
