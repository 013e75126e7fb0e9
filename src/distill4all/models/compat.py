"""Checkpoints that transformers 4.x reads as transformers 5 does.

transformers 5 keeps RoPE settings in `rope_parameters` (`rope_theta` inside it); transformers 4
reads a top-level `rope_theta` (falling back to 10000, silently wrong for a base of 1e5 or 5e5) and
a `rope_scaling` block, and Gemma 3's sliding layers' base from `rope_local_base_freq`. Its
tokenizer class `TokenizersBackend` does not exist in transformers 4; `PreTrainedTokenizerFast`
reads the same tokenizer.json in both. So vLLM or SGLang on an older stack load the model right.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distill4all import atomic

V4_TOKENIZER_CLASS = "PreTrainedTokenizerFast"
V5_ONLY_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PythonBackend", "SentencePieceBackend"})


def v4_rope_keys(config: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys transformers 4 reads RoPE from, for a config with `rope_parameters`."""
    rope = config.get("rope_parameters")
    if not isinstance(rope, dict):
        return {}
    keys: dict[str, Any] = {}
    if isinstance(rope.get("full_attention"), dict):  # per layer type (Gemma 3)
        sliding = rope.get("sliding_attention") or {}
        if "rope_theta" in sliding:
            keys["rope_local_base_freq"] = sliding["rope_theta"]
        rope = rope["full_attention"]
    if "rope_theta" in rope:
        keys["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        keys["partial_rotary_factor"] = rope["partial_rotary_factor"]
    rope_type = rope.get("rope_type", "default")
    if rope_type == "longrope":  # transformers 4's Phi-3 takes exactly these three keys
        keys["rope_scaling"] = {"type": "longrope", "long_factor": rope["long_factor"],
                                "short_factor": rope["short_factor"]}  # fmt: skip
    elif rope_type != "default":  # both spellings of the type, as transformers 4 accepted either
        skip = ("rope_theta", "partial_rotary_factor")
        keys["rope_scaling"] = {k: v for k, v in rope.items() if k not in skip} | {"type": rope_type}
    return keys


def make_v4_readable(folder: Path) -> None:
    """Add what transformers 4 reads to a checkpoint transformers 5 saved (keys it already has stay)."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    missing = {k: v for k, v in v4_rope_keys(config).items() if config.get(k) is None}
    if missing:
        atomic.write_json(config_file, config | missing)
    tok_file = folder / "tokenizer_config.json"
    if tok_file.is_file() and (folder / "tokenizer.json").is_file():
        tok = json.loads(tok_file.read_text(encoding="utf-8"))
        if tok.get("tokenizer_class") in V5_ONLY_TOKENIZER_CLASSES:
            atomic.write_json(tok_file, tok | {"tokenizer_class": V4_TOKENIZER_CLASS})
