"""The model families the exporter writes, and what each needs in GGUF beyond the shared layout.

llama.cpp's converter (`convert_hf_to_gguf.py`, one class per architecture) is the reference: the
GGUF keys, tensor names and transforms below are the ones it writes and llama.cpp's loader reads
(`gguf`'s own MODEL_ARCH and tensor-name tables do the naming). What differs between families is
small and listed per family in FAMILIES:

- llama / mistral (arch `llama`): q and k rows permuted from HF's rotate-half order to llama.cpp's
  interleaved one; RoPE variants linear, yarn and llama3 (a `rope_freqs` tensor of per-frequency
  divisors, computed as transformers computes the frequencies, from the `rope_scaling` block);
  Mistral's sliding window is not a llama.cpp setting for this arch (full attention: the same
  logits while the context is within the window).
- qwen2: q/k/v biases, no permutation (llama.cpp applies NEOX-style RoPE for it).
- qwen3: per-head q/k RMS norms; an explicit head_dim.
- phi3 (Phi-3, 3.5, 4-mini): fused qkv and gate_up projections kept fused (llama.cpp's phi3 arch
  reads them so); partial rotary dimensions; long-RoPE as `rope_factors_long/short` tensors and
  an attention factor, the original context length as the switch between them; llama.cpp runs
  Phi-3's sliding window as full attention (the same logits while the context fits the window).

- gemma2: RMS norm weights stored as transformers' `1 + w` (every `*norm.weight`); the
  post-attention and pre/post-feed-forward norms; attention and final logit soft-capping; the
  sliding window; the embedding scale is llama.cpp's own; no output tensor (always tied).
  llama.cpp scales attention by 1/sqrt(head_dim), so `query_pre_attn_scalar` must equal head_dim.

- gemma3 (text): as gemma2, plus per-head q/k norms (with the offset too), no attention
  soft-capping, and two RoPE bases: the global layers' and the sliding ones' (`freq_base_swa`).
  llama.cpp fixes the layer pattern (five sliding layers, then a global one), so a config whose
  `layer_types` differ is refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distill4all.errors import ExportError


@dataclass(frozen=True)
class Family:
    name: str  # as the docs' support table names it
    arch: str  # llama.cpp's architecture (gguf.MODEL_ARCH_NAMES)
    permute_qk: bool  # llama.cpp's `llama` arch wants interleaved RoPE rows
    rope_dim_key: bool  # write rope.dimension_count and vocab_size (as the converter does for llama)
    norm_offset: bool = False  # RMS norms hold w where transformers multiplies by 1 + w (Gemma)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "llama", permute_qk=True, rope_dim_key=True),
    "mistral": Family("mistral", "llama", permute_qk=True, rope_dim_key=True),
    "qwen2": Family("qwen2", "qwen2", permute_qk=False, rope_dim_key=False),
    "qwen3": Family("qwen3", "qwen3", permute_qk=False, rope_dim_key=False),
    "phi3": Family("phi3", "phi3", permute_qk=False, rope_dim_key=False),
    "gemma2": Family("gemma2", "gemma2", permute_qk=False, rope_dim_key=False, norm_offset=True),
    "gemma3_text": Family("gemma3", "gemma3", permute_qk=False, rope_dim_key=False, norm_offset=True),
}

NEAREST: dict[str, str] = {
    # model_type → the supported family it is closest to (for the error message)
    "gemma": "gemma2", "gemma3": "gemma3_text (its text model)",
    "phi": "llama", "phimoe": "llama", "mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3",
    "olmo": "llama", "olmo2": "llama", "granite": "llama", "cohere": "llama", "stablelm": "llama",
    "gpt2": "llama", "gpt_neox": "llama", "falcon": "llama", "starcoder2": "qwen2", "deepseek_v2": "llama",
}  # fmt: skip

ROPE_TYPES = ("default", "linear", "yarn", "llama3", "longrope")


@dataclass(frozen=True)
class Hparams:
    family: Family
    n_vocab: int
    n_ctx: int
    n_embd: int
    n_ff: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_theta: float
    rope: dict[str, Any] = field(default_factory=dict)  # the rope_scaling block, type in "rope_type"
    tied: bool = False
    name: str = "model"
    rope_dim: int = 0  # rotary dimensions per head (head_dim unless partial_rotary_factor < 1)
    n_ctx_orig: int = 0  # original_max_position_embeddings (long-RoPE's switch), else n_ctx
    sliding_window: int = 0
    softcap: tuple[float, float] | None = None  # Gemma: attention and final logit soft-capping (0: none)
    rope_theta_swa: float = 0.0  # Gemma 3: the sliding layers' RoPE base

    @classmethod
    def from_config(cls, hf_dir: Path) -> Hparams:
        try:
            c = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ExportError(f"cannot read {hf_dir / 'config.json'}: {e}") from None
        model_type = str(c.get("model_type"))
        family = FAMILIES.get(model_type)
        if family is None:
            nearest = NEAREST.get(model_type, "llama")
            raise ExportError(
                f"{hf_dir}: model_type {model_type!r} cannot be exported yet; supported: "
                f"{', '.join(FAMILIES)} (the nearest is {nearest})"
            )
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        local = dict(rope.get("sliding_attention") or {})
        if "full_attention" in rope:  # transformers 5's per-layer-type RoPE (Gemma 3)
            rope = dict(rope["full_attention"])
        rope_type = rope.get("rope_type") or rope.get("type") or "default"
        if rope_type not in ROPE_TYPES:
            raise ExportError(
                f"{hf_dir}: rope scaling {rope_type!r} cannot be exported for {model_type}; "
                f"supported: {', '.join(ROPE_TYPES)}"
            )
        rope["rope_type"] = rope_type
        if rope_type == "longrope" and family.name != "phi3":
            raise ExportError(f"{hf_dir}: rope scaling 'longrope' is exported for phi3 only, not {model_type}")
        n_head = int(c["num_attention_heads"])
        head_dim = int(c.get("head_dim") or c["hidden_size"] // n_head)
        partial = float(rope.get("partial_rotary_factor") or c.get("partial_rotary_factor") or 1.0)
        if partial != 1.0 and family.name != "phi3":
            raise ExportError(f"{hf_dir}: partial rotary embeddings cannot be exported for {model_type}")
        n_ctx = int(c.get("max_position_embeddings", 2048))
        if family.name == "gemma3":
            pattern = [
                "full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(c["num_hidden_layers"])
            ]
            if c.get("layer_types", pattern) != pattern:
                raise ExportError(f"{hf_dir}: llama.cpp runs Gemma 3 with five sliding layers to each global one, "
                                  "and this config's layer_types differ")  # fmt: skip
            if c.get("attn_logit_softcapping"):
                raise ExportError(f"{hf_dir}: Gemma 3 with attention soft-capping cannot be exported")
        if family.norm_offset and float(c.get("query_pre_attn_scalar") or head_dim) != head_dim:
            raise ExportError(
                f"{hf_dir}: query_pre_attn_scalar {c.get('query_pre_attn_scalar')} differs from head_dim {head_dim}; "
                "llama.cpp scales Gemma's attention by 1/sqrt(head_dim)"
            )
        n_ctx_orig = rope.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
        return cls(
            family=family,
            n_vocab=int(c["vocab_size"]),
            n_ctx=n_ctx,
            n_embd=int(c["hidden_size"]),
            n_ff=int(c["intermediate_size"]),
            n_layer=int(c["num_hidden_layers"]),
            n_head=n_head,
            n_head_kv=int(c.get("num_key_value_heads") or n_head),
            head_dim=head_dim,
            rms_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta") or c.get("rope_theta", 10000.0)),
            rope=rope,
            tied=bool(c.get("tie_word_embeddings", False)),
            name=str(c.get("_name_or_path") or c.get("_model_name_or_path") or hf_dir.name),
            rope_dim=int(partial * c["hidden_size"]) // n_head if family.name == "phi3" else head_dim,
            n_ctx_orig=int(n_ctx_orig or n_ctx),
            sliding_window=int(c.get("sliding_window") or 0),
            softcap=(float(c.get("attn_logit_softcapping") or 0.0), float(c.get("final_logit_softcapping") or 0.0))
            if family.norm_offset
            else None,
            rope_theta_swa=float(local.get("rope_theta") or c.get("rope_local_base_freq") or 10000.0),
        )

    @property
    def model_name(self) -> str:
        """general.name: the checkpoint's own name, else its folder's."""
        return Path(self.name).name or "model"

    @property
    def rope_type(self) -> str:
        return str(self.rope["rope_type"])


def add_hparams(writer: Any, hp: Hparams, file_type: int) -> None:
    """The family's hyperparameter keys, as llama.cpp's converter writes them (general.name and the
    other provenance keys are written apart: gguf.py's provenance_metadata)."""
    import gguf

    if hp.family.rope_dim_key:
        writer.add_vocab_size(hp.n_vocab)
    writer.add_context_length(hp.n_ctx)
    writer.add_embedding_length(hp.n_embd)
    writer.add_feed_forward_length(hp.n_ff)
    writer.add_block_count(hp.n_layer)
    writer.add_head_count(hp.n_head)
    writer.add_head_count_kv(hp.n_head_kv)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_rope_freq_base(hp.rope_theta)
    if hp.family.rope_dim_key or hp.family.name == "phi3":
        writer.add_rope_dimension_count(hp.rope_dim)
    if hp.family.name == "phi3":
        writer.add_rope_scaling_orig_ctx_len(hp.n_ctx_orig)
        writer.add_sliding_window(hp.sliding_window)
        if hp.rope_type == "longrope":
            writer.add_rope_scaling_attn_factors(longrope_attention_factor(hp))
    elif hp.family.norm_offset:  # Gemma 2 and 3
        assert hp.softcap is not None
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
        if hp.softcap[0]:
            writer.add_attn_logit_softcapping(hp.softcap[0])
        if hp.softcap[1]:
            writer.add_final_logit_softcapping(hp.softcap[1])
        writer.add_sliding_window(hp.sliding_window)
        if hp.family.name == "gemma3":
            writer.add_rope_freq_base_swa(hp.rope_theta_swa)
    elif hp.head_dim != hp.n_embd // hp.n_head or hp.family.name == "qwen3":
        writer.add_key_length(hp.head_dim)
        writer.add_value_length(hp.head_dim)
    if hp.rope_type == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
    elif hp.rope_type == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(hp.rope["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(hp.rope.get("original_max_position_embeddings") or hp.n_ctx))
    writer.add_file_type(file_type)


def extra_tensors(hp: Hparams) -> dict[str, np.ndarray]:
    """Tensors llama.cpp needs that the checkpoint does not hold: Llama 3's RoPE frequency
    divisors, Phi-3's long-RoPE factors."""
    if hp.rope_type == "llama3":
        return {"rope_freqs.weight": llama3_rope_divisors(hp.rope_theta, hp.head_dim, hp.rope, hp.n_ctx)}
    if hp.rope_type == "longrope":
        long, short = (np.asarray(hp.rope[k], dtype=np.float32) for k in ("long_factor", "short_factor"))
        if not len(long) == len(short) == hp.rope_dim // 2:
            raise ExportError(f"long-RoPE factors must have {hp.rope_dim // 2} entries, not {len(long)}/{len(short)}")
        return {"rope_factors_long.weight": long, "rope_factors_short.weight": short}
    return {}


def longrope_attention_factor(hp: Hparams) -> float:
    """transformers' long-RoPE attention scaling (its `attention_factor` when the config has none)."""
    if (given := hp.rope.get("attention_factor")) is not None:
        return float(given)
    scale = hp.n_ctx / hp.n_ctx_orig
    return math.sqrt(1 + math.log(scale) / math.log(hp.n_ctx_orig)) if scale > 1.0 else 1.0


def llama3_rope_divisors(theta: float, dim: int, rope: dict[str, Any], n_ctx: int) -> np.ndarray:
    """What llama.cpp divides each RoPE frequency by so that it equals transformers' llama3 one.

    transformers (modeling_rope_utils._compute_llama3_parameters) scales the low frequencies down
    by `factor`, keeps the high ones, and blends in between; llama.cpp takes the ratio. The
    original context length is read from the rope block, as transformers reads it."""
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings") or n_ctx)
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) & ~(wavelen > old_ctx / low)
    final = np.where(medium, blended, scaled)
    return (inv_freq / final).astype(np.float32)


def permute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores q/k rows for rotate-half RoPE; GGUF `llama` wants llama.cpp's interleaved order
    (the same permutation as llama.cpp's converter, LlamaModel.permute; biases too)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def transform(name: str, data: np.ndarray, hp: Hparams) -> np.ndarray:
    """A checkpoint tensor as the family's GGUF holds it."""
    if hp.family.norm_offset and name.endswith("norm.weight"):
        return data + 1  # as llama.cpp's converter: transformers' Gemma norms compute x * (1 + w)
    if hp.family.permute_qk:
        if ".q_proj." in name:
            return permute_rope(data, hp.n_head)
        if ".k_proj." in name:
            return permute_rope(data, hp.n_head_kv)
    return data
