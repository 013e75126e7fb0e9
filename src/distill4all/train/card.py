"""The trained model's card (train/model/README.md), in place of PEFT's blank template: the base
model as a hub id when known, the training data and its dataset card's teachers, the licence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.models.cards import CARD, base_provenance, dataset_provenance, model_card


def _shown(path: Path, root: Path) -> str:
    """A path as the card shows it: relative to the run directory when inside it (cards stay the same
    when a run is reproduced elsewhere)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def write_model_card(
    model_dir: Path, cfg: TrainConfig, data: Path, *, run_dir: Path, n_layers: int | None = None
) -> Path:
    """Write the card of the model train saved in `model_dir`, trained on `data`."""
    data_card = data.parent / CARD
    teachers, datasets = dataset_provenance(data_card)
    notes = (f"Depth-pruned to {n_layers} decoder layers before training (train.prune).",) if cfg.prune else ()
    p = replace(
        base_provenance(cfg.base_model), teachers=teachers, datasets=datasets, data=_shown(data, run_dir),
        data_card=_shown(data_card, run_dir) if data_card.is_file() else None, notes=notes,
    )  # fmt: skip
    what = "a LoRA adapter" if cfg.method in ("lora", "qlora") else "a fully fine-tuned model"
    card = model_card(
        p,
        title="Trained model",
        summary=f"{what[0].upper()}{what[1:]} trained by distill4all on teacher answers (template `{cfg.template}`, "
        f"{cfg.epochs:g} epochs, learning rate {cfg.learning_rate:g}).",
        library="peft" if cfg.method in ("lora", "qlora") else "transformers",
        sections=[],
    )
    path = model_dir / CARD
    atomic.write_text(path, str(card))
    return path
