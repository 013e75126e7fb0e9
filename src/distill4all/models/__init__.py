"""Model names, the model cache, and the offline models that ship with distill4all."""

from distill4all.models.registry import (
    BUILTINS,
    ResolvedModel,
    cache_dir,
    list_models,
    resolve_model,
)

__all__ = ["BUILTINS", "ResolvedModel", "cache_dir", "list_models", "resolve_model"]
