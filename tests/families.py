"""Tiny models of the families the exporter takes, built with transformers' own classes and a
tokenizer of the family's kind trained here on the demo data (nothing downloaded).

Weights are random but not tiny (initializer_range 0.1, five times the usual), so next-token distributions are peaked
enough that "the same top-1 at every position" tests the conversion, not floating-point luck.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from distill4all.export.gguf import _LLAMA3_REGEX, _QWEN2_REGEX

DEMO = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
MIXED = (
    "Grüße aus München! ¿Qué tal? Привет. 東京は日本の首都です。 안녕하세요 🚀\n"
    "def area(r: float) -> float:\n    return 3.14159 * r ** 2  # 12345 and 0.5%\n\n"
    "\t\tindented    with   runs of  spaces   \r\n"
    "SELECT id FROM t WHERE x >= 42;\n" + "The quick brown fox jumps over the lazy dog. " * 4
)
"""Multilingual prose, code, digits and whitespace runs: 128+ tokens with any of the tokenizers."""


def _corpus() -> str:
    return (DEMO / "chip2.jsonl").read_text() + (DEMO / "stackoverflow.csv").read_text() + MIXED


def byte_level_tokenizer(dest: Path, regex: str, *, bos: str | None, eos: str, extra: list[str]) -> Any:
    """A byte-level BPE of the Llama 3 / Qwen kind: a Split on the family's regex, then bytes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [t for t in (bos, eos, *extra) if t]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])  # fmt: skip
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tk.train_from_iterator([_corpus()], trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    tok.save_pretrained(dest)
    return tok


def llama3_tokenizer(dest: Path) -> Any:
    """A base Llama 3's: EOS `<|end_of_text|>`, while its chat template ends a turn in `<|eot_id|>`."""
    return byte_level_tokenizer(dest, _LLAMA3_REGEX, bos="<|begin_of_text|>", eos="<|end_of_text|>",
                                extra=["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"])  # fmt: skip


def qwen_tokenizer(dest: Path) -> Any:
    """A base Qwen's: EOS `<|endoftext|>`, turns in ChatML ending in `<|im_end|>`."""
    return byte_level_tokenizer(dest, _QWEN2_REGEX, bos=None, eos="<|endoftext|>",
                                extra=["<|im_start|>", "<|im_end|>"])  # fmt: skip


def sentencepiece_tokenizer(dest: Path, legacy: bool = True) -> Any:
    """LLaMA-1/2 and Mistral v0.1's kind: SentencePiece BPE with byte fallback, BOS added; `legacy`
    as their released tokenizers (`▁` in front of the text after every special token, as the
    original SentencePiece tokenizer and llama.cpp do)."""
    from transformers import AutoTokenizer

    from test_export import sentencepiece_llama_with_bos

    model_dir = sentencepiece_llama_with_bos(dest / "sp")
    tok = AutoTokenizer.from_pretrained(model_dir, legacy=legacy)
    tok.save_pretrained(dest)
    shutil.copy(model_dir / "tokenizer.model", dest / "tokenizer.model")
    return tok


def gemma_tokenizer(dest: Path) -> Any:
    """Gemma's kind: SentencePiece BPE with byte fallback and no `▁` in front of the text
    (Gemma's ids: pad 0, eos 1, bos 2, unk 3), BOS added."""
    import sentencepiece as spm
    from transformers import AutoTokenizer

    src = dest / "spm"
    src.mkdir(parents=True)
    corpus = src / "corpus.txt"
    corpus.write_text(_corpus())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(src / "sp"), vocab_size=700, model_type="bpe", byte_fallback=True,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, character_coverage=1.0, split_digits=True, num_threads=1,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, add_dummy_prefix=False,
    )  # fmt: skip
    (src / "sp.model").rename(src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True,
    }))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(src)
    tok.save_pretrained(dest)
    shutil.copy(src / "tokenizer.model", dest / "tokenizer.model")
    return tok


COMMON = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "max_position_embeddings": 512, "initializer_range": 0.1}  # fmt: skip

# Each family's chat template as its released models write turns (trimmed of system-prompt
# defaults and tool calls), with the special tokens it needs.
CHAT_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "llama3": (
        "{% for m in messages %}{% set content = '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' "
        "+ m['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
        "{% endif %}{{ content }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}",
        [],
    ),
    "chatml": (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
        [],
    ),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}{{ '[INST] ' + m['content'] + ' [/INST]' }}"
        "{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}",
        [],
    ),
    "phi3": (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
        ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    ),
    "gemma": (
        "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
        "{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}",
        ["<start_of_turn>", "<end_of_turn>"],
    ),
}
TURN_END = {
    "llama3": "<|eot_id|>",
    "chatml": "<|im_end|>",
    "mistral": "</s>",
    "phi3": "<|end|>",
    "gemma": "<end_of_turn>",
}
"""The token that ends an answer under each template: what training teaches and generation stops at."""


def _build(
    dest: Path, tokenizer: Callable[[Path], Any], config_class: str, model_class: str, chat: str, **config: Any
) -> Path:
    import transformers
    from tokenizers import AddedToken

    dest.mkdir(parents=True, exist_ok=True)
    tok = tokenizer(dest)
    template, specials = CHAT_TEMPLATES[chat]
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials], special_tokens=True)
    tok.chat_template = template
    tok.save_pretrained(dest)
    cfg = getattr(transformers, config_class)(
        vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **{**COMMON, **config}
    )
    torch.manual_seed(0)
    getattr(transformers, model_class)(cfg).save_pretrained(dest)
    return dest


FAMILY_MODELS: dict[str, Callable[[Path], Path]] = {
    # Llama 3.x: llama3 RoPE over three frequency bands (original context 64 splits head_dim 16's
    # wavelengths across them), tied embeddings, GQA, a byte-level BPE with BOS.
    "llama3": lambda d: _build(d, llama3_tokenizer, "LlamaConfig", "LlamaForCausalLM", chat="llama3",
                               tie_word_embeddings=True,
                               rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                               "original_max_position_embeddings": 64}),
    "llama-linear": lambda d: _build(d, llama3_tokenizer, "LlamaConfig", "LlamaForCausalLM", chat="llama3",
                                     rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "llama-yarn": lambda d: _build(d, llama3_tokenizer, "LlamaConfig", "LlamaForCausalLM", chat="llama3",
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                 "original_max_position_embeddings": 128}),
    # Mistral v0.1: a sliding window (wider than the text: llama.cpp's llama arch attends fully),
    # SentencePiece with byte fallback.
    "mistral": lambda d: _build(d, sentencepiece_tokenizer, "MistralConfig", "MistralForCausalLM", chat="mistral",
                                sliding_window=4096),
    # Qwen2.5: q/k/v biases, tied embeddings, rope_theta 1e6.
    "qwen2": lambda d: _build(d, qwen_tokenizer, "Qwen2Config", "Qwen2ForCausalLM", chat="chatml",
                              tie_word_embeddings=True,
                              rope_theta=1000000.0),
    # Phi-3.5 / Phi-4-mini: fused qkv and gate_up, long-RoPE (long factors, as the context is
    # longer than the original), partial rotary (0.75), tied embeddings; SentencePiece.
    "phi3": lambda d: _build(d, sentencepiece_tokenizer, "Phi3Config", "Phi3ForCausalLM", chat="phi3",
                             tie_word_embeddings=True,
                             original_max_position_embeddings=256, pad_token_id=0,
                             rope_scaling={"rope_type": "longrope", "partial_rotary_factor": 0.75,
                                           "long_factor": [1.0 + 0.4 * i for i in range(6)],
                                           "short_factor": [1.0 + 0.1 * i for i in range(6)]}),
    # Gemma 2: norms as 1 + w, post-attention and pre/post-feed-forward norms, soft-capping at
    # 50 and 30 (the released values), alternating sliding/global layers (window wider than the
    # text), query_pre_attn_scalar = head_dim, tied embeddings scaled by sqrt(hidden). Smaller
    # weights: llama.cpp's CPU GELU reads a float16 table, off by ~1e-3 on activations this size.
    "gemma2": lambda d: _build(d, gemma_tokenizer, "Gemma2Config", "Gemma2ForCausalLM", chat="gemma", head_dim=16,
                               initializer_range=0.05,
                               query_pre_attn_scalar=16, sliding_window=4096, pad_token_id=0,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    # Gemma 3 (text): q/k norms with the offset, six layers (five sliding with RoPE base 1e4, one
    # global with 1e6), no attention soft-capping.
    "gemma3": lambda d: _build(d, gemma_tokenizer, "Gemma3TextConfig", "Gemma3ForCausalLM", chat="gemma", head_dim=16,
                               initializer_range=0.05, num_hidden_layers=6, query_pre_attn_scalar=16,
                               sliding_window=512, pad_token_id=0),
    # Qwen3: per-head q/k norms, head_dim (32) unlike hidden_size / heads (16).
    "qwen3": lambda d: _build(d, qwen_tokenizer, "Qwen3Config", "Qwen3ForCausalLM", chat="chatml", head_dim=32,
                              tie_word_embeddings=True, rope_theta=1000000.0),
}  # fmt: skip


def config_of(model_dir: Path) -> dict[str, Any]:
    return json.loads((model_dir / "config.json").read_text())  # type: ignore[no-any-return]


def chat_kind(model_dir: Path) -> str:
    """Which of CHAT_TEMPLATES the model's tokenizer carries."""
    template = json.loads((model_dir / "tokenizer_config.json").read_text()).get("chat_template")
    if template is None and (model_dir / "chat_template.jinja").is_file():
        template = (model_dir / "chat_template.jinja").read_text()
    return next(kind for kind, (jinja, _) in CHAT_TEMPLATES.items() if jinja == template)
