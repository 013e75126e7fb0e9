"""Dedup on planted duplicates: exact keys, MinHash LSH (checked against datasketch), faiss cosine."""

from __future__ import annotations

import numpy as np
from datasketch import MinHash, MinHashLSH

from distill4all.curate import dedup

WORDS = [
    "river",
    "stone",
    "garden",
    "lamp",
    "window",
    "paper",
    "music",
    "coffee",
    "train",
    "winter",
    "summer",
    "valley",
    "bridge",
    "market",
    "engine",
    "forest",
    "cloud",
    "harbor",
    "street",
    "candle",
    "mirror",
    "pocket",
    "ladder",
    "violin",
    "carpet",
    "basket",
    "planet",
    "silver",
    "orange",
    "meadow",
    "island",
    "castle",
    "rocket",
    "pencil",
    "wallet",
    "jacket",
    "button",
    "garlic",
    "butter",
    "tomato",
    "kettle",
    "saddle",
    "anchor",
    "feather",
    "marble",
    "cotton",
    "velvet",
    "copper",
    "timber",
    "canyon",
    "desert",
    "glacier",
]


def corpus(n: int = 300, length: int = 60, seed: int = 0) -> list[str]:
    rng = np.random.RandomState(seed)
    return [" ".join(rng.choice(WORDS, length)) for _ in range(n)]


def near_copy(text: str, edits: int, seed: int) -> str:
    rng = np.random.RandomState(seed)
    words = text.split()
    for i in rng.choice(len(words), edits, replace=False):
        words[i] = "changed"
    return " ".join(words)


def test_exact_key_ignores_case_punctuation_and_spacing() -> None:
    assert dedup.exact_key("Hello,  World!\n") == dedup.exact_key("hello world")
    assert dedup.exact_key("Hello World") != dedup.exact_key("Hello Word")
    edges = dedup.exact_duplicate_edges([dedup.exact_key(t) for t in ["a b", "c", "A, b.", "c!", "d"]])
    assert edges.tolist() == [[0, 2], [1, 3]]


def test_minhash_estimates_jaccard() -> None:
    hasher = dedup.MinHasher(num_perm=256, shingle_words=3)
    a = corpus(1, 200, seed=1)[0]
    b = near_copy(a, 20, seed=2)
    sig = hasher.signatures([a, b, corpus(1, 200, seed=3)[0]])

    def shingles(t: str) -> set[tuple[str, ...]]:
        w = t.split()
        return set(zip(w, w[1:], w[2:], strict=False))

    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    assert abs((sig[0] == sig[1]).mean() - true) < 0.08
    assert (sig[0] == sig[2]).mean() < 0.05
    # the same text in another batch gets the same signature: hashes are stable
    assert (hasher.signatures([b])[0] == sig[1]).all()


def test_near_duplicates_found_like_datasketch() -> None:
    texts = corpus(300)
    planted = {}
    for k, src in enumerate(range(0, 60, 3)):  # 20 near copies (1 of 60 words changed: Jaccard ~0.84)
        planted[len(texts)] = src
        texts.append(near_copy(texts[src], 1, seed=k))
    texts.append(texts[5].upper() + "!")  # an exact copy up to case and punctuation
    planted[len(texts) - 1] = 5
    texts.append("short")  # shorter than a shingle: still hashed, matches nothing
    sig = dedup.MinHasher(num_perm=128, shingle_words=5).signatures(texts)
    edges = dedup.near_duplicate_edges(sig, threshold=0.7)
    found = {tuple(e) for e in edges.tolist()}
    assert found == {(src, copy) for copy, src in planted.items()}

    # datasketch's own MinHash + MinHashLSH (other hash functions, so another random draw of
    # misses) finds only planted pairs, and most of them
    lsh = MinHashLSH(threshold=0.7, num_perm=128)
    theirs = set()
    for i, t in enumerate(texts):
        m = MinHash(num_perm=128)
        w = dedup.normalize(t).split()
        m.update_batch([" ".join(w[j : j + 5]).encode() for j in range(max(1, len(w) - 4))])
        theirs.update((int(j), i) for j in lsh.query(m))
        lsh.insert(i, m)
    assert theirs <= found and len(theirs) >= 0.8 * len(found)

    clusters = dedup.clusters(len(texts), edges)
    for copy, src in planted.items():
        assert clusters[copy] == clusters[src] == src
    assert (
        clusters[:300][[i for i in range(300) if i not in planted.values()]]
        == np.arange(300)[[i for i in range(300) if i not in planted.values()]]
    ).all()


def test_lsh_params_follow_datasketch() -> None:
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    assert dedup.lsh_params(0.8, 128) == (lsh.b, lsh.r)


def test_semantic_duplicates_by_cosine() -> None:
    rng = np.random.RandomState(0)
    emb = rng.randn(200, 32).astype(np.float32)
    emb[150] = emb[10] + 0.01 * rng.randn(32)
    emb[151] = emb[10] + 0.01 * rng.randn(32)
    emb[199] = -emb[3]  # opposite, not similar
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    edges = dedup.semantic_duplicate_edges(emb, 0.98)
    assert {tuple(e) for e in edges.tolist()} == {(10, 150), (10, 151), (150, 151)}
    assert dedup.clusters(200, edges)[[10, 150, 151]].tolist() == [10, 10, 10]


def test_pair_keys_from_normalized_halves_equal_the_whole_pairs_key() -> None:
    from distill4all.curate import pipeline
    from distill4all.curate.pairs import Rows

    prompts = ["Hello,  World!", "", "Q?", "  spaced\tout  "]
    answers = ["Hi there.", "only an answer", None, "A\nB"]
    rows = Rows(ids=list(range(4)), prompt_ids=["p"] * 4, sources=["s"] * 4, prompts=prompts, responses=answers,
                finish_reasons=[None] * 4, teachers=["t"] * 4)  # fmt: skip
    pipeline._STATE["rows"] = rows
    try:
        prompt_keys, pair_keys = pipeline._keys_range(0, 4)
    finally:
        pipeline._STATE.clear()
    assert prompt_keys == [dedup.exact_key(p) for p in prompts]
    assert pair_keys == [dedup.exact_key(pipeline.pair_text(p, a)) for p, a in zip(prompts, answers, strict=True)]
