"""Which models an evaluation compares: the run's own (base, trained, its quantized exports, in
`eval.include` order), then the configured ones."""

from __future__ import annotations

from distill4all.config import RunConfig
from distill4all.errors import StageError
from distill4all.evaluate.runner import ModelSpec
from distill4all.layout import RunLayout

BASE_QUANTS = ("f32", "f16")


def models_to_compare(config: RunConfig) -> list[ModelSpec]:
    """The run's own models, in `include` order, then the configured ones."""
    cfg = config.eval
    assert cfg is not None
    specs: list[ModelSpec] = []
    layout = RunLayout.of(config)
    trained = config.train is not None
    for kind in cfg.include:
        if kind == "base":
            base = config.train.base_model if config.train else (config.export.model if config.export else None)
            if base:
                specs.append(ModelSpec("base", base))
        elif kind == "pruned" and config.train is not None and config.train.prune is not None:
            specs.append(ModelSpec("pruned", str(layout.train.student)))
        elif kind == "trained" and trained:
            specs.append(ModelSpec("trained", str(layout.train.model)))
        elif kind == "exported" and config.export is not None:
            for q in config.export.quantizations:
                if q not in BASE_QUANTS:
                    label = f"trained-{q}" if trained else f"{q}"
                    specs.append(ModelSpec(label, str(layout.export.gguf(q))))
    # One engine for the unquantized models of a comparison: with a checkpoint scored on
    # transformers (the pruned or trained model), the base is scored there too (a GGUF base in its
    # dequantized HF form), so that no difference between engines sits inside the comparison.
    if any(s.label in ("pruned", "trained") for s in specs):
        specs = [ModelSpec(s.label, s.spec, "transformers") if s.label == "base" else s for s in specs]
    specs += [ModelSpec(m.name, m.model, template=m.template) for m in cfg.models]
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise StageError(f"eval: model labels must be unique: {', '.join(labels)}")
    if not specs:
        raise StageError("eval: no model to evaluate (set eval.include or eval.models)")
    return specs
