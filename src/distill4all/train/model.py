"""The model being trained: base weights, LoRA/QLoRA/full, pad token, and the loss module.

`CausalLMLoss` wraps the model together with its loss, so that DDP/FSDP/DeepSpeed wrap one module
whose forward returns (summed loss, target count). It computes logits only where a target exists
(prompt tokens carry no loss, so their vocabulary projection is skipped): for a 135M model with a
49k vocabulary that projection is a fifth of the forward cost.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from distill4all.config import DistillConfig, TrainConfig
from distill4all.errors import ConfigError, ModelError
from distill4all.models.registry import quiet_hf
from distill4all.train.distill import kd_loss
from distill4all.train.templates import IGNORE

# Architectures whose causal-LM head is exactly `lm_head(decoder(x))`, with no scaling or soft-capping
# of the logits afterwards; others go through the model's own forward (all logits, then select).
PLAIN_HEAD = frozenset(
    {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo", "olmo2",
     "smollm3", "gpt_neox", "starcoder2", "stablelm", "gemma"}
)  # fmt: skip


def cpu_has_bf16() -> bool:
    """bf16 matmuls run natively (AVX512-BF16 or AMX); without them bf16 is emulated and slower."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def mixed_precision(precision: str) -> str:
    """The config's precision as accelerate's mixed_precision ("no", "bf16", "fp16")."""
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if cuda:
            return "bf16" if torch.cuda.is_bf16_supported() else "no"
        return "bf16" if cpu_has_bf16() else "no"
    if precision == "fp16" and not cuda:
        raise ConfigError("train.precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return {"fp32": "no"}.get(precision, precision)


def load_tokenizer(path: Path | str) -> Any:
    from transformers import AutoTokenizer

    try:
        with quiet_hf():
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the tokenizer of {path}: {e}") from None
    tok.truncation_side = "right"  # the paper's truncation: keep the start, cut the end
    return tok


def set_pad_token(tokenizer: Any, pad_token: str | None) -> bool:
    """Give the tokenizer a pad token; True when a new token was added (embeddings must grow).

    Padding never decides what is masked here (attention masks and labels do), so reusing EOS as
    pad, as SmolLM2 ships, is safe: EOS stays a trained target.
    """
    if pad_token is None:
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        return False
    added = tokenizer.add_special_tokens({"pad_token": pad_token})
    return bool(added)


def load_model(cfg: TrainConfig, base: Path, tokenizer: Any, precision: str) -> Any:
    """The base model with LoRA/QLoRA adapters attached, or whole for full fine-tuning."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if cfg.method == "qlora":
        if not torch.cuda.is_available():
            raise ConfigError("train.method qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora on the CPU")
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ConfigError("train.method qlora needs bitsandbytes: pip install 'distill4all[gpu]'") from None
        compute = torch.bfloat16 if precision == "bf16" else torch.float16
        kwargs = {
            "dtype": compute,
            "quantization_config": BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                bnb_4bit_use_double_quant=True,
            ),
            "device_map": {"": int(os.environ.get("LOCAL_RANK", "0"))},
        }  # fmt: skip
    elif cfg.method == "lora" and precision in ("bf16", "fp16"):
        # Frozen base weights are only ever used in the autocast dtype: keep them in it (half the
        # memory, no per-step cast). Adapters stay fp32 (peft upcasts them), so updates are exact.
        kwargs["dtype"] = torch.bfloat16 if precision == "bf16" else torch.float16
    try:
        with quiet_hf():
            model = AutoModelForCausalLM.from_pretrained(str(base), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load {base} as a causal language model: {e}") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "full":
        return model
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    modules = list(cfg.lora.target_modules)
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        # peft's own shorthand for every linear layer but the output head (fused ones included)
        target_modules="all-linear" if modules == ["all-linear"] else modules,
        task_type="CAUSAL_LM",
    )
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question; not ours to fix
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, lora)
    except ValueError as e:  # e.g. target modules that the architecture does not have (Phi-3's are fused)
        linear = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} - {"lm_head"}
        )
        raise ConfigError(
            f"train.lora: {e}; this model's linear layers are {', '.join(linear)} (or use all-linear)"
        ) from None


def base_of(model: Any) -> Any:
    """The transformers model inside a PEFT wrapper (adapters injected), or the model itself."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def plain_head(model: Any) -> bool:
    """Whether the model's logits are exactly `lm_head(decoder(x))` (see PLAIN_HEAD)."""
    base = base_of(model)
    return base.config.model_type in PLAIN_HEAD and hasattr(base, "get_decoder")


def target_logits(model: Any, keep: torch.Tensor, inputs: dict[str, Any], *, selective: bool) -> torch.Tensor:
    """The logits at the positions `keep` only: with a plain head (`selective`), the vocabulary
    projection runs on those positions alone; otherwise the model's own forward, then select."""
    if selective:
        base = base_of(model)
        hidden = base.get_decoder()(**inputs, use_cache=False).last_hidden_state
        return base.get_output_embeddings()(hidden[keep])
    return model(**inputs, use_cache=False).logits[keep]


class CausalLMLoss(torch.nn.Module):  # type: ignore[misc]
    """forward(input_ids, targets, ...) → (summed loss over targets, number of targets, the summed
    parts [cross-entropy, KD]).

    Without `distill` (or without teacher rows in the batch) the loss is the cross-entropy; with
    it, (1 − weight) × cross-entropy + weight × KD to the teacher's top-k at the same positions
    (train/distill.py).
    """

    def __init__(self, model: Any, distill: DistillConfig | None = None) -> None:
        super().__init__()
        self.model = model
        self.distill = distill
        base = base_of(model)
        self.selective = plain_head(model)
        # FSDP's transformer auto-wrap reads the layer classes to shard by from the root module.
        self._no_split_modules = getattr(base, "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        teacher_ids: torch.Tensor | None = None,
        teacher_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        keep = targets != IGNORE
        inputs = {"input_ids": input_ids, "position_ids": position_ids, "attention_mask": attention_mask}
        logits = target_logits(self.model, keep, inputs, selective=self.selective)
        ce = F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        if self.distill is None or teacher_ids is None or teacher_logprobs is None:
            return ce, keep.sum(), torch.stack([ce.detach(), torch.zeros_like(ce)])
        kd = kd_loss(logits, teacher_ids, teacher_logprobs, self.distill)
        w = self.distill.weight
        return (1 - w) * ce + w * kd, keep.sum(), torch.stack([ce.detach(), kd.detach()])
