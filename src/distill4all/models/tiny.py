"""Offline stand-in models: a LLaMA-architecture checkpoint with random weights and a real
byte-level BPE tokenizer trained here, so that every stage can be tested with no hub and no GPU.

`tiny` (~1M parameters) is for unit tests; `small` (~95M, the layer shapes of a real small LLaMA)
is for benchmarks. Both are deterministic for a seed: same seed, same bytes.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as SmolLM2 and many instruct models use; `<|im_end|>` is the end-of-turn/EOS token."""

SPECIAL_TOKENS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>"]
PAD, BOS, EOS = "<pad>", "<s>", "<|im_end|>"


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    corpus_words: int


SPECS: dict[str, TinySpec] = {
    "tiny": TinySpec(1024, 128, 352, 4, 4, 2, corpus_words=40_000),
    "small": TinySpec(8192, 768, 2304, 12, 12, 4, corpus_words=400_000),
}

_TEXT = """\
The quick brown fox jumps over the lazy dog. A teacher model answers questions and a student
model learns from the answers. Write a short poem about the sea. Explain how a hash table works.
What is the capital of France? Paris is the capital of France. How do I reverse a list in Python?
Use my_list[::-1] or my_list.reverse(). def add(a, b):\n    return a + b\n
The mitochondria is the powerhouse of the cell. In 1969, people walked on the Moon for the first
time. Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14 2023. Translate "good morning" to Spanish:
buenos días. Schreibe einen kurzen Satz auf Deutsch. Le chat dort sur le canapé. 東京は日本の首都です。
SELECT name FROM users WHERE age > 30 ORDER BY name; {"key": "value", "list": [1, 2, 3]}
Summarize the following text in one sentence. Give three tips for staying healthy: eat well,
sleep enough, and move every day. I'm sorry, but I cannot help with that request.
"""

_SYLLABLES = [a + b for a in "bcdfghklmnprstvz" for b in ("a", "e", "i", "o", "u", "ai", "ou")]


def _corpus(words: int, seed: int) -> list[str]:
    """Real sentences plus deterministic pseudo-words, enough for the BPE trainer to fill the vocab."""
    rng = random.Random(seed)
    lines = _TEXT.splitlines() * 20
    vocab = ["".join(rng.choices(_SYLLABLES, k=rng.randint(1, 4))) for _ in range(4000)]
    line: list[str] = []
    for _ in range(words):
        line.append(rng.choice(vocab))
        if len(line) >= 12:
            lines.append(" ".join(line) + rng.choice([".", "?", "!", ",", ":"]))
            line = []
    return lines


def train_tokenizer(spec: TinySpec, seed: int) -> Any:  # a PreTrainedTokenizerFast
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # ByteLevel with the GPT-2 split regex: the pre-tokenizer llama.cpp calls `gpt-2`.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(spec.corpus_words, seed), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=2048,
        clean_up_tokenization_spaces=False,
    )
    return fast


def build_tiny_model(out: Path, size: Literal["tiny", "small"] = "tiny", seed: int = 0) -> Path:
    """Write a random-weight LLaMA checkpoint + tokenizer to `out` (a new folder)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from distill4all import atomic
    from distill4all.models.registry import quiet_hf

    spec = SPECS[size]
    tokenizer = train_tokenizer(spec, seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with atomic.output_dir(out) as tmp, quiet_hf():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out
