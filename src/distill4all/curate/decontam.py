"""Decontamination: pairs that hold evaluation items, so a model is not trained on what it is
tested on.

Word n-gram overlap as GPT-3 and lm-evaluation-harness check it (13 words by default), on the
normalized text (curate/dedup.normalize: case, punctuation and spacing ignored): an eval item's
instruction with its input, and its output, are each cut into n-grams; a pair whose prompt or
answer holds one of them matches that item. An eval text shorter than n words (but at least
`min_words`) matches when it appears whole. Where the map's embeddings exist, a pair whose
embedding is within `semantic_threshold` cosine of an item's (written as a pair is) matches too:
a paraphrased copy.

No library indexes n-grams this way (datasketch's LSH answers "similar", not "contains a shared
13-gram"), so the index is a set of joined n-grams. Every match begins with one of the eval
texts' first-k-word windows (k the shortest length matched), so curation first looks the hashes of
each text's k-word windows up in a bitmap of those (`may_match`, vectorized over the word hashes
MinHash computes anyway: ~1 µs a text), and reads only the texts it flags (~1 %) word by word.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from distill4all.curate import dedup
from distill4all.curate.dedup import normalize
from distill4all.evalset import Item, load_items


@dataclass
class EvalIndex:
    """The n-grams (and whole short texts) of a set of eval items, each naming its item."""

    n: int
    grams: dict[str, str] = field(default_factory=dict)  # joined n-gram → item id
    whole: dict[int, dict[str, str]] = field(default_factory=dict)  # word count → joined text → item id
    vocab: frozenset[str] = frozenset()
    items: list[Item] = field(default_factory=list)
    # bit h of the bitmap is set for the (mixed) hash h of each window of `anchor` eval words
    anchor: int = 0
    bitmap: NDArray[np.uint8] = field(default_factory=lambda: np.zeros(0, dtype=np.uint8))

    @classmethod
    def build(cls, items: list[Item], n: int, min_words: int) -> EvalIndex:
        index = cls(n, items=items)
        vocab: set[str] = set()
        normal = [normalize(text) for it in items for text in (f"{it.instruction} {it.input}", it.output)]
        texts = [text.split() for text in normal]
        for k, words in enumerate(texts):
            item_id = items[k // 2].id
            vocab.update(words)
            if len(words) >= n:
                for i in range(len(words) - n + 1):
                    index.grams.setdefault(" ".join(words[i : i + n]), item_id)
            elif len(words) >= min_words:
                index.whole.setdefault(len(words), {}).setdefault(" ".join(words), item_id)
        index.vocab = frozenset(vocab)
        index.anchor = min((n, *index.whole))
        index.bitmap = np.zeros(1 << (_BITMAP_BITS - 3), dtype=np.uint8)
        hashed = dedup.split_words(normal)
        h, k = hashed.hashes, index.anchor
        if len(h) >= k:  # every window of `anchor` words inside one eval text
            inside = hashed.doc[: len(h) - k + 1] == hashed.doc[k - 1 :]
            slots = _bitmap_slots(dedup.window_hashes(h, k)[inside])
            bits = np.left_shift(np.uint8(1), (slots & np.uint64(7)).astype(np.uint8))
            np.bitwise_or.at(index.bitmap, slots >> np.uint64(3), bits)
        return index

    def may_match(self, words: dedup.Words) -> NDArray[np.bool_]:
        """Per text of a batch: whether one of its windows of `anchor` words may be an eval text's.
        False means `match` finds nothing."""
        out = np.zeros(words.n_docs, dtype=bool)
        k, h, doc = self.anchor, words.hashes, words.doc
        if len(h) < k or not len(self.bitmap):
            return out
        slots = _bitmap_slots(dedup.window_hashes(h, k))
        hit = (self.bitmap[slots >> np.uint64(3)] >> (slots & np.uint64(7)).astype(np.uint8)) & np.uint8(1)
        out[doc[: len(slots)][(hit == 1) & (doc[: len(slots)] == doc[k - 1 :])]] = True
        return out

    def match(self, normalized: str) -> tuple[str, str] | None:
        """(item id, the shared words) for the first eval n-gram or whole short text in a
        normalized text, or None."""
        words = normalized.split()
        shortest = min((self.n, *self.whole), default=self.n)
        if len(words) < shortest:
            return None
        # one byte per word, 1 where the eval set has it: runs long enough are found in C
        in_vocab = bytes(map(self.vocab.__contains__, words))
        for run in re.finditer(b"\x01{%d,}" % shortest, in_vocab):
            lo, hi = run.span()
            for k, texts in ((self.n, self.grams), *self.whole.items()):
                for i in range(lo, hi - k + 1):
                    gram = " ".join(words[i : i + k])
                    if (hit := texts.get(gram)) is not None:
                        return hit, gram
        return None


_BITMAP_BITS = 27  # a 16 MB bitmap: ~20k eval windows set ~1.5e-4 of it, so few texts are flagged


def _bitmap_slots(windows: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Each window hash mixed (its low bits are the last word's alone) and cut to a bitmap slot."""
    with np.errstate(over="ignore"):
        mixed = (windows ^ (windows >> np.uint64(29))) * np.uint64(0x9E3779B97F4A7C15)
    return np.asarray(mixed >> np.uint64(64 - _BITMAP_BITS), dtype=np.uint64)


def load_index(paths: list[Path], n: int, min_words: int) -> EvalIndex:
    items = [it for p in paths for it in load_items(p)]
    return EvalIndex.build(items, n, min_words)


def eval_pair_texts(items: list[Item]) -> list[str]:
    """Each item written as curation writes a pair (prompt, newline, answer), for its embedding."""
    return [f"{it.instruction}\n{it.input}".strip() + f"\n{it.output}" for it in items]


def semantic_matches(
    pair_emb: NDArray[np.float32], eval_emb: NDArray[np.float32], threshold: float
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """For each pair (unit-norm rows), the closest eval item and its cosine; -1 where none reaches
    `threshold`."""
    if not len(pair_emb) or not len(eval_emb):
        return np.full(len(pair_emb), -1, dtype=np.int64), np.zeros(len(pair_emb), dtype=np.float32)
    best = np.full(len(pair_emb), -1, dtype=np.int64)
    score = np.zeros(len(pair_emb), dtype=np.float32)
    for lo in range(0, len(pair_emb), 8192):  # bounded memory: a block of pairs × all eval items
        sims = pair_emb[lo : lo + 8192] @ eval_emb.T
        arg = sims.argmax(axis=1)
        top = sims[np.arange(len(arg)), arg]
        score[lo : lo + len(arg)] = top
        best[lo : lo + len(arg)] = np.where(top >= threshold, arg, -1)
    return best, score
