"""Dedup on planted duplicates: exact keys, MinHash LSH (checked against datasketch), faiss cosine."""

from __future__ import annotations

import numpy as np
from datasketch import MinHash, MinHashLSH
from hypothesis import given, settings
from hypothesis import strategies as st

from distill4all.config import CurateConfig
from distill4all.curate import curation, dedup
from distill4all.curate.pairs import Rows

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


def test_texts_without_words_are_no_ones_duplicates() -> None:
    keys = [dedup.exact_key(t) for t in ["???", "!!!", "...", "—", "", "a?", "A!"]]
    assert dedup.exact_duplicate_edges(keys).tolist() == [[5, 6]]


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


def test_no_text_can_forge_the_boundary_between_texts_of_a_batch() -> None:
    """A text may hold any word, NULs and lone surrogates: each text's signature in a batch is its
    signature alone, and the batch has one row per text (a forged boundary was an IndexError)."""
    texts = ["qqdocsepqq", "see QQDocSepQQ, and qqdocsepqq! in the middle of a sentence here",
             "a\x00b \x00 c d e f g", "\ud800 lone surrogate words \udfff here and there", "",
             " ".join(corpus(1, 30, seed=4)[0].split()[:30])]  # fmt: skip
    hasher = dedup.MinHasher(num_perm=64, shingle_words=3)
    batched = hasher.signatures(texts)
    assert batched.shape == (len(texts), 64)
    for i, t in enumerate(texts):
        assert (hasher.signatures([t])[0] == batched[i]).all(), repr(t)
    assert dedup.exact_key("qqdocsepqq") == dedup.exact_key("QQDOCSEPQQ.")  # still just a word
    assert dedup.exact_key("\ud800") != dedup.exact_key("")


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


def test_near_duplicates_among_some_rows_equal_those_of_their_copy() -> None:
    texts = corpus(200, length=60, seed=5)
    texts += [near_copy(texts[i], 1, seed=i) for i in range(0, 100, 5)]
    sig = dedup.MinHasher().signatures(texts)
    rows = np.flatnonzero(np.arange(len(texts)) % 3 != 1)  # some originals and copies left out
    among = dedup.near_duplicate_edges(sig, 0.7, rows)
    assert len(among) >= 5
    assert among.tolist() == dedup.near_duplicate_edges(sig[rows], 0.7).tolist()


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


def rows_of(prompts: list[str], answers: list[str | None]) -> Rows:
    n = len(prompts)
    return Rows(ids=list(range(n)), prompt_ids=["p"] * n, sources=["s"] * n, prompts=prompts, responses=answers,
                finish_reasons=[None] * n, teachers=["t"] * n, reasonings=[None] * n)  # fmt: skip


def test_scan_keys_are_the_whole_pairs_and_signatures_the_halves_union() -> None:
    prompts = ["Hello,  World!", "", "Q?", "  spaced\tout  "]
    answers = ["Hi there.", "only an answer", None, "A\nB"]
    found = curation.scan(rows_of(prompts, answers), CurateConfig(), workers=1)
    assert found.keys["prompt"].tolist() == [dedup.exact_key(p) for p in prompts]
    pairs = [curation.pair_text(p, a) for p, a in zip(prompts, answers, strict=True)]
    assert found.keys["pair"].tolist() == [dedup.exact_key(t) for t in pairs]
    # a pair's shingles are its prompt's and its answer's (none spans the two)
    hasher = dedup.MinHasher()
    assert (found.sigs["prompt"] == hasher.signatures(prompts)).all()
    both = np.minimum(hasher.signatures(prompts), hasher.signatures([a or "" for a in answers]))
    assert (found.sigs["pair"] == both).all()


def test_scan_in_worker_processes_equals_one_process() -> None:
    texts = corpus(9000, length=20)
    prompts = [t[:40] + "?" for t in texts]
    answers: list[str | None] = [
        None if i % 997 == 0 else "As an AI language model, " + t if i % 501 == 0 else t for i, t in enumerate(texts)
    ]
    answers[7] = answers[3]  # an exact duplicate
    rows = rows_of(prompts, answers)
    one = curation.scan(rows, CurateConfig(), workers=1)
    two = curation.scan(rows, CurateConfig(), workers=2)  # forked workers, shared signature memory
    assert len(one.hits) == 9000 and sum(map(bool, one.hits)) >= 18
    assert one.hits == two.hits
    for what in ("prompt", "pair"):
        assert (one.keys[what] == two.keys[what]).all() and (one.keys[what] != 0).all()  # every row was written
        assert (one.sigs[what] == two.sigs[what]).all()
        assert (one.sigs[what] != 0).any(axis=1).all()


_SPACES_AND_ODD = [chr(c) for c in range(0x3001) if chr(c).isspace()] + list("aBéß日😀\x00.\u200b\ud800")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(alphabet=st.sampled_from(_SPACES_AND_ODD), max_size=40) | st.text(max_size=40), max_size=6))
def test_split_words_cuts_as_str_split_and_hashes_equal_words_alike(texts: list[str]) -> None:
    """The numpy word splitter reads UTF-8 bytes: its words are str.split()'s (all of Unicode's
    whitespace, control characters that are whitespace, lone surrogates), counted in characters."""
    words = dedup.split_words(texts)
    got: list[list[str]] = [[] for _ in texts]
    for i, d in enumerate(words.doc.tolist()):
        got[d].append(words.word(i))
    assert got == [t.split() for t in texts]
    flat = [w for t in texts for w in t.split()]
    assert words.chars.tolist() == [len(w) for w in flat]
    by_hash = dict(zip(words.hashes.tolist(), flat, strict=True))
    assert len(by_hash) == len(set(flat))  # equal words share a hash, distinct ones do not
    assert words.n_docs == len(texts)


def test_a_word_hashes_the_same_in_any_batch_however_long() -> None:
    """Hashes come from powers of the batch's byte positions: a batch longer than the powers kept
    (a long answer) computes its own, and a word's hash does not depend on where it stands."""
    long_text = "pad " * 300_000 + "needle haystack"  # 1.2 MB of bytes
    assert len(long_text) > 1 << 20
    short, long = dedup.split_words(["haystack needle"]), dedup.split_words(["x y", long_text])
    assert short.hashes.tolist() == long.hashes[-1:-3:-1].tolist()
    assert long.doc[-1] == 1 and long.chars[-1] == len("haystack")
    # many texts are hashed ~64 KB at a time: a word's hash is the same in every slice
    texts = [f"w{i % 97} é{i % 13} x" * (i % 7) for i in range(6000)]
    batch = dedup.split_words(texts)
    assert len(batch.data) > 2 * (1 << 16)
    alone = np.concatenate([dedup.split_words([t]).hashes for t in texts])
    assert (batch.hashes == alone).all()
    assert batch.chars.tolist() == [len(w) for t in texts for w in t.split()]
