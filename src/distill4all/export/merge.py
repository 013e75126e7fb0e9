"""Fold a PEFT LoRA adapter into its base model: one plain HF checkpoint to convert and ship."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from distill4all import atomic
from distill4all.errors import ModelError
from distill4all.models.chat_templates import hf_stop_ids
from distill4all.models.compat import make_v4_readable
from distill4all.models.registry import quiet_hf
from distill4all.runtime.engine import adapter_base


def is_adapter(path: Path) -> bool:
    return path.is_dir() and (path / "adapter_config.json").is_file()


def merge_adapter(adapter_dir: Path, out: Path, card: Any = None) -> Path:
    """Write base + adapter, merged, as an HF checkpoint at `out` (with the adapter's tokenizer,
    whose chat template is the one the model was trained with, and `card`, a ModelCard, as its
    README), readable by transformers 4 as well as 5."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = adapter_base(adapter_dir)
    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
            has_tokenizer = (adapter_dir / "tokenizer_config.json").is_file()
            tokenizer = AutoTokenizer.from_pretrained(adapter_dir if has_tokenizer else base)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot merge the adapter in {adapter_dir} into {base}: {e}") from None
    # What the model stops at: EOS and the end-of-turn token of the template it was trained with.
    model.generation_config.eos_token_id = hf_stop_ids(tokenizer)
    with atomic.output_dir(out, replace=True) as tmp, quiet_hf():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        make_v4_readable(tmp)
        if card is not None:
            card.save(tmp / "README.md")
    return out
