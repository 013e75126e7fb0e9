"""The trained model's card (train/model/README.md), in place of PEFT's blank template: the base
model as a hub id when known, the training data and its dataset card's teachers, the licence."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from distill4all import atomic
from distill4all.config import TrainConfig
from distill4all.models.cards import CARD, base_provenance, dataset_provenance, model_card


def write_model_card(model_dir: Path, cfg: TrainConfig, data: Path, *, n_layers: int | None = None) -> Path:
    """Write the card of the model train saved in `model_dir`, trained on `data`."""
    teachers, datasets = dataset_provenance(data.parent / CARD)
    notes = (f"Depth-pruned to {n_layers} decoder layers before training (train.prune).",) if cfg.prune else ()
    p = replace(base_provenance(cfg.base_model), teachers=teachers, datasets=datasets, data=str(data), notes=notes)
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
