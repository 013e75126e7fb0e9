"""The exact bytes of an HF tokenizer's tokens: what an OpenAI-compatible endpoint returns as a
token's `bytes`, so that a teacher's logprobs can be matched to a student's token ids.

tokenizers has no public "bytes of token i" (`decode` of one token gives text, where a token that
holds part of a character becomes U+FFFD, and SentencePiece drops a leading space), so the three
vocabulary kinds are read here: GPT-2's byte-level BPE (each character of a token stands for one
byte), SentencePiece (▁ for a space, <0xNN> byte-fallback tokens), and special or added tokens
(their text).
"""

from __future__ import annotations

import functools
import re
from typing import Any

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode: the byte each printable character stands for."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def is_byte_level(tokenizer: Any) -> bool:
    """GPT-2's byte-level BPE (LLaMA 3, Qwen, SmolLM, the tiny models)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def token_bytes(
    tokenizer: Any, token: int, *, byte_level: bool | None = None, special: frozenset[int] = frozenset()
) -> bytes:
    """The bytes of one token (`special`: ids written as their text; `byte_level`: the vocabulary's
    kind, found from the tokenizer when not given)."""
    piece = tokenizer.convert_ids_to_tokens(int(token))
    if isinstance(piece, str) and token not in special:
        if byte_level if byte_level is not None else is_byte_level(tokenizer):
            decoder = _byte_level_decoder()
            if all(c in decoder for c in piece):  # else an added token, written as itself
                return bytes(decoder[c] for c in piece)
        elif m := _BYTE_FALLBACK.fullmatch(piece):
            return bytes([int(m[1], 16)])
        elif "\u2581" in piece:  # SentencePiece writes a space as ▁ (decode may drop it)
            return piece.replace("\u2581", " ").encode()
    return str(tokenizer.decode([int(token)], skip_special_tokens=False)).encode()


def byte_table(tokenizer: Any) -> list[bytes]:
    """Every token id's bytes, in id order."""
    byte_level = is_byte_level(tokenizer)
    special = frozenset(tokenizer.all_special_ids)
    return [token_bytes(tokenizer, i, byte_level=byte_level, special=special) for i in range(len(tokenizer))]
