"""Duplicates: exact (normalized hash), near (MinHash LSH) and semantic (embedding cosine, faiss).

MinHash here uses datasketch's choice of bands × rows for a Jaccard threshold, but computes the
signatures of a whole batch of texts at once in numpy (words cut and hashed over the batch's UTF-8
bytes, `split_words`; multiply-add-shift hash permutations of 32-bit shingle hashes in 32-bit
arithmetic, 24-bit values: no modulo, unlike datasketch's `(a·h + b) mod p`, and SIMD) and finds
band collisions by sorting. datasketch's
`MinHash.update_batch` + `MinHashLSH.query/insert` cost about 300 µs a text in Python; this is the
part of curation that must run at ≥30k pairs/s, so it is vectorized here (bench/curate.py
measures both side by side; a test checks both find the planted duplicates).
"""

from __future__ import annotations

import functools
import itertools
import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from datasketch.lsh import _optimal_param
from numpy.typing import NDArray
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

# punctuation → space with str.translate: ~18× faster than a [\W_]+ regex on a million characters;
# NUL too: no word holds one
_PUNCT = str.maketrans(dict.fromkeys(string.punctuation + "“”‘’«»—–…¿¡·•\x00", " "))
# the same for ASCII text as a byte table, lower-casing too: bytes.translate is a table lookup per
# byte, ~3× faster than str.translate's per-character dict (most answers are ASCII)
_ASCII = bytes(ord(_PUNCT.get(i, chr(i))) if i in _PUNCT else ord(chr(i).lower()) for i in range(128)) + bytes(
    range(128, 256)
)
_MAX_HASH = np.uint64((1 << 32) - 1)


def normalize(text: str) -> str:
    """What "the same text" means: case-folded words, punctuation and spacing ignored."""
    return " ".join(fold(text).split())


def fold(text: str) -> str:
    """Case-folded, punctuation as spaces: the words of `normalize(text)`, not yet joined."""
    if text.isascii():
        return text.encode().translate(_ASCII).decode()
    return text.casefold().translate(_PUNCT)


def exact_key(text: str) -> int:
    """A text's 64-bit key, the same for texts whose `normalize()`d forms are: kept in a uint64
    array, compared in numpy."""
    return int(text_keys(*word_sums(split_words([fold(text)])))[0])


@dataclass(frozen=True)
class Words:
    """The words of a batch of texts, cut as `str.split()` cuts them, as numbers: each word's
    64-bit hash (equal words, equal hashes), its length in characters and the index of its text.
    `word(i)` gives a word back as text."""

    hashes: NDArray[np.uint64]
    chars: NDArray[np.int64]
    doc: NDArray[np.int64]
    n_docs: int
    data: bytes  # the texts' UTF-8, where each word lies at [starts[i], ends[i])
    starts: NDArray[np.int64]
    ends: NDArray[np.int64]

    def word(self, i: int) -> str:
        return self.data[self.starts[i] : self.ends[i]].decode("utf-8", "surrogatepass")


# str.split()'s whitespace (str.isspace): ASCII bytes, and characters beyond ASCII that become a space
_SPACE_BYTE = np.zeros(256, dtype=bool)
_SPACE_BYTE[[0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x1F, 0x20]] = True
_WIDE_SPACE = str.maketrans(dict.fromkeys("\x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007"
                                          "\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000", " "))  # fmt: skip
_BASE = 0x100000001B3  # odd, so it has an inverse modulo 2^64
_POWERS_KEPT = 1 << 20  # bytes' powers remembered (16 MB at most); a longer text computes its own
_SLICE = 1 << 16  # bytes of texts hashed at a time (the powers and prefix sums stay in cache)


def split_words(texts: Sequence[str]) -> Words:
    """Every text's words (as `text.split()`), hashed in numpy over the texts' UTF-8 bytes.

    A word's hash is the polynomial Σ (byte + 1)·B^(end-1-i) modulo 2^64, from one prefix sum of
    (byte + 1)·B^-i, then mixed (splitmix64's finalizer). It replaces a Python split and a dict
    lookup per word: ~2× faster. The sums run over ~64 KB of texts at a time, which stay in cache
    (2× faster again than one pass over a chunk's megabyte)."""
    ascii = [t.isascii() for t in texts]
    spaced = [t if a else t.translate(_WIDE_SPACE) for t, a in zip(texts, ascii, strict=True)]
    data = "\n".join(spaced).encode("utf-8", "surrogatepass")
    b = np.frombuffer(data, dtype=np.uint8)
    edge = np.flatnonzero(np.diff(~_SPACE_BYTE[b], prepend=False, append=False))  # word starts and ends alternate
    starts, ends = edge[0::2], edge[1::2]
    # each text's first byte (the texts are joined by one separator byte)
    sizes = np.fromiter(
        (len(t) if a else len(t.encode("utf-8", "surrogatepass")) for t, a in zip(spaced, ascii, strict=True)),
        dtype=np.int64,
        count=len(spaced),
    )
    first = np.cumsum(sizes + 1) - (sizes + 1)
    doc = np.searchsorted(first, starts, side="right") - 1
    h = np.empty(len(starts), dtype=np.uint64)
    chars = ends - starts  # in bytes, which are characters where all is ASCII
    later = np.searchsorted(first, np.arange(_SLICE, len(b), _SLICE))  # slices begin where texts do
    cuts = np.unique(np.r_[0, first[later[later < len(first)]], len(b)]).tolist()
    wide = not all(ascii)
    for lo, hi in itertools.pairwise(cuts):
        w = slice(*np.searchsorted(starts, [lo, hi]).tolist())
        s, e, seg = starts[w] - lo, ends[w] - lo, b[lo:hi]
        h[w] = _segment_sums(seg + np.uint64(1), s, e, _BASE)
        if wide:  # characters are the bytes that do not continue one
            leads = np.zeros(hi - lo + 1, dtype=np.int64)
            np.cumsum((seg & np.uint8(0xC0)) != np.uint8(0x80), out=leads[1:])
            chars[w] = leads[e] - leads[s]
    return Words(_mix(h), chars, doc, len(texts), data, starts, ends)


def _mix(h: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """splitmix64's finalizer: every bit of the result depends on every bit of `h`."""
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        h = (h ^ (h >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return np.asarray(h ^ (h >> np.uint64(31)), dtype=np.uint64)


def _segment_sums(
    values: NDArray[np.uint64], starts: NDArray[np.int64], ends: NDArray[np.int64], base: int
) -> NDArray[np.uint64]:
    """Σ values[i]·base^(end-1-i) over each segment [start, end) of `values`, modulo 2^64 (0 for an
    empty one), from one prefix sum of values[i]·base^-i."""
    power, inverse = _powers(len(values) + 1, base)
    with np.errstate(over="ignore"):
        prefix = np.zeros(len(values) + 1, dtype=np.uint64)
        np.cumsum(values * inverse[:-1], out=prefix[1:])
        return np.asarray((prefix[ends] - prefix[starts]) * power[np.maximum(ends - 1, 0)], dtype=np.uint64)


_POWERS: dict[int, tuple[NDArray[np.uint64], NDArray[np.uint64]]] = {}


def _powers(n: int, base: int = _BASE) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
    """base^i and base^-i modulo 2^64 for i < n."""
    kept = _POWERS.get(base)
    if kept is not None and len(kept[0]) >= n:
        return kept[0][:n], kept[1][:n]
    size = max(n, 1024) if n > _POWERS_KEPT else min(_POWERS_KEPT, 1 << max(n - 1, 1023).bit_length())
    tables = []
    for b in (base, pow(base, -1, 1 << 64)):
        t = np.full(size, b, dtype=np.uint64)
        t[0] = 1
        with np.errstate(over="ignore"):
            tables.append(np.cumprod(t, dtype=np.uint64))
    if size <= _POWERS_KEPT:
        _POWERS[base] = (tables[0], tables[1])
    return tables[0][:n], tables[1][:n]


_KEY_BASE = 0x9E3779B97F4A7C15  # odd


def word_sums(words: Words) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """Per text of a batch: the polynomial Σ h_i·K^(n-1-i) of its n word hashes (modulo 2^64),
    and n. `text_keys` turns them into keys; `joined_sums` gives those of two texts joined."""
    counts = np.bincount(words.doc, minlength=words.n_docs)
    ends = np.cumsum(counts)
    return _segment_sums(words.hashes, ends - counts, ends, _KEY_BASE), counts


def joined_sums(
    first: tuple[NDArray[np.uint64], NDArray[np.int64]], then: tuple[NDArray[np.uint64], NDArray[np.int64]]
) -> tuple[NDArray[np.uint64], NDArray[np.int64]]:
    """The `word_sums` of each text of `first` followed by the same text of `then`."""
    power, _ = _powers(int(then[1].max(initial=0)) + 1, _KEY_BASE)
    with np.errstate(over="ignore"):
        return first[0] * power[then[1]] + then[0], first[1] + then[1]


def text_keys(sums: NDArray[np.uint64], counts: NDArray[np.int64]) -> NDArray[np.uint64]:
    """Each text's 64-bit key from its `word_sums`: a polynomial of 64-bit word hashes, mixed with
    the word count (splitmix64's finalizer). Computed for whole batches in numpy where a
    cryptographic hash of each normalized text cost a Python call a text."""
    with np.errstate(over="ignore"):
        return _mix(sums ^ (counts.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93)))


class MinHasher:
    """Batched MinHash signatures over word n-gram shingles."""

    def __init__(self, num_perm: int = 128, shingle_words: int = 5, seed: int = 1) -> None:
        self.num_perm, self.n = num_perm, shingle_words
        gen = np.random.RandomState(seed)
        # 32-bit odd multipliers and addends: uint32 products are SIMD (8 a vector), uint64 ones are not
        self.a = (gen.randint(1, 2**63, size=num_perm, dtype=np.uint64) >> np.uint64(31)).astype(np.uint32) | 1
        self.b = (gen.randint(0, 2**63, size=num_perm, dtype=np.uint64) >> np.uint64(31)).astype(np.uint32)

    def signatures(
        self,
        texts: Sequence[str],
        batch: int = 128,
        folded: bool = False,
        words_seen: Callable[[int, Words], None] | None = None,
    ) -> NDArray[np.uint32]:
        """One row per text. `folded`: the texts are `fold()`ed (or normalize()d) already.
        `words_seen(lo, words)` is shown the words of each batch (from text `lo` on), for checks
        and keys that read the same words."""
        # 128 texts a batch keeps the (num_perm × shingles) hash matrix in cache: ~25% faster than 256
        out = np.empty((len(texts), self.num_perm), dtype=np.uint32)
        for lo in range(0, len(texts), batch):
            part = texts[lo : lo + batch]
            words = split_words(part if folded else [fold(t) for t in part])
            if words_seen is not None:
                words_seen(lo, words)
            out[lo : lo + batch] = self._batch(words)
        return out

    def _batch(self, words: Words) -> NDArray[np.uint32]:
        """Signatures of a batch of texts."""
        h, doc, n_docs = words.hashes, words.doc, words.n_docs
        n = self.n
        # the hash of each window of n words; windows that cross a document are masked
        m = len(h) - n + 1
        if m > 0:
            sh = window_hashes(h, n)
            valid = doc[:m] == doc[n - 1 :]
            sh, sh_doc = sh[valid], doc[:m][valid]
        else:
            sh, sh_doc = np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64)
        # documents shorter than n words are one shingle: the hash of all their words
        counts = np.bincount(doc, minlength=n_docs)
        short = np.flatnonzero((counts < n) & (counts > 0))
        if len(short):
            # the window hash of all their words, one word position at a time for all of them
            start = (np.cumsum(counts) - counts)[short]
            extra = h[start].copy()
            for j in range(1, n - 1):
                more = counts[short] > j
                extra[more] = extra[more] * _WINDOW_BASE + h[start[more] + j]
            sh, sh_doc = np.concatenate([sh, extra]), np.concatenate([sh_doc, short])
            order = np.argsort(sh_doc, kind="stable")
            sh, sh_doc = sh[order], sh_doc[order]
        x = ((sh ^ (sh >> np.uint64(32))) * np.uint64(0x9E3779B97F4A7C15) >> np.uint64(32)).astype(np.uint32)
        # (a·x + b) mod 2^32, top 24 bits: Dietzfelbinger's multiply-add-shift, a permutation per
        # row of (num_perm, shingles) so each row is contiguous for the segment minima. 24 bits:
        # two different minima agree by chance ~1 in 16M (no bias at any threshold), and no value
        # reaches the empty text's marker
        perm = np.multiply(self.a[:, None], x[None, :])
        perm += self.b[:, None]
        sig = np.full((n_docs, self.num_perm), _MAX_HASH, dtype=np.uint32)
        if len(sh_doc):  # sh_doc is sorted: each document's shingles are one run
            first = np.flatnonzero(np.r_[True, sh_doc[1:] != sh_doc[:-1]])
            # the shift to 24 bits keeps order, so it is taken of the minima alone
            sig[sh_doc[first]] = np.minimum.reduceat(perm, first, axis=1).T >> np.uint32(8)
        return sig


_WINDOW_BASE = np.uint64(1_000_003)


def window_hashes(h: NDArray[np.uint64], k: int) -> NDArray[np.uint64]:
    """The hash of each window of k consecutive word hashes (len(h) - k + 1 of them): a
    polynomial in base 1,000,003, wrapping at 2^64 (where texts meet, the caller masks)."""
    m = len(h) - k + 1
    out = h[:m].copy()
    for j in range(1, k):
        out *= _WINDOW_BASE
        out += h[j : j + m]
    return out


def window_hashes_at(h: NDArray[np.uint64], at: NDArray[np.int64], k: int) -> NDArray[np.uint64]:
    """`window_hashes(h, k)[at]`, computed at those positions only."""
    out = h[at]
    with np.errstate(over="ignore"):
        for j in range(1, k):
            out = out * _WINDOW_BASE + h[at + j]
    return out


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) as datasketch's MinHashLSH picks them for this threshold."""
    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(b), int(r)


def near_duplicate_edges(
    sig: NDArray[np.uint32], threshold: float, rows: NDArray[np.int64] | None = None
) -> NDArray[np.int64]:
    """Index pairs (i, j), i < j, that share an LSH band and whose estimated Jaccard is ≥ threshold.

    `rows` picks the rows of `sig` to look among (all by default) and the pairs are then positions
    in `rows`: a band at a time is gathered, never a copy of the whole (rows × num_perm) matrix."""
    n, num_perm = sig.shape if rows is None else (len(rows), sig.shape[1])
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    pick = slice(None) if rows is None else rows
    bands, width = lsh_params(threshold, num_perm)
    empty = (sig[pick, bands * width :] == np.uint32(_MAX_HASH)).all(axis=1)  # texts without words…
    coeff = np.random.RandomState(7).randint(1, 2**62, size=width, dtype=np.uint64) | np.uint64(1)
    found: list[NDArray[np.int64]] = []
    for band in range(bands):
        part = sig[pick, band * width : (band + 1) * width].astype(np.uint64)
        empty &= (part == np.uint64(_MAX_HASH)).all(axis=1)  # …match nothing
        with np.errstate(over="ignore"):
            key = (part * coeff).sum(axis=1, dtype=np.uint64)
        # only keys seen twice can link anything: a hash pass finds them (most keys are unique),
        # then a stable sort of those alone gives their runs in row order
        cand = np.flatnonzero(pd.Series(key).duplicated(keep=False).to_numpy())
        if not len(cand):
            continue
        order = cand[np.argsort(key[cand], kind="stable")]
        k = key[order]
        same = np.flatnonzero(k[1:] == k[:-1]) + 1  # positions equal to their predecessor
        # link each member of a run of equal keys to the run's first member
        run_start = np.maximum.accumulate(np.where(np.r_[True, k[1:] != k[:-1]], np.arange(len(k)), 0))
        found.append(order[run_start[same]] * n + order[same])  # (i, j) as one number, i < j
    if not found:
        return np.zeros((0, 2), dtype=np.int64)
    packed = np.unique(np.concatenate(found))
    edges = np.stack([packed // n, packed % n], axis=1)
    edges = edges[~empty[edges[:, 0]] & ~empty[edges[:, 1]]]
    at = edges if rows is None else rows[edges]
    similar = (sig[at[:, 0]] == sig[at[:, 1]]).mean(axis=1) >= threshold
    return np.asarray(edges[similar], dtype=np.int64)


def exact_duplicate_edges(keys: Sequence[int] | NDArray[np.uint64]) -> NDArray[np.int64]:
    """Link each repeated key to its first occurrence. Texts with no words (`???`, `...`) have the
    empty normal form: they are not the same text as each other, so they link nothing (as a text
    without words matches nothing near)."""
    keys = np.asarray(keys, dtype=np.uint64)
    codes = pd.factorize(keys)[0]
    first = np.zeros(codes.max() + 1 if len(codes) else 0, dtype=np.int64)
    first[codes[::-1]] = np.arange(len(codes))[::-1]  # the last write of each code is its first position
    at = np.flatnonzero((first[codes] != np.arange(len(codes))) & (keys != np.uint64(_EMPTY_KEY)))
    return np.stack([first[codes[at]], at], axis=1).astype(np.int64).reshape(-1, 2)


_EMPTY_KEY = exact_key("")


def semantic_duplicate_edges(emb: NDArray[np.float32], threshold: float) -> NDArray[np.int64]:
    """Pairs whose (unit-norm) embeddings have cosine ≥ threshold: faiss range search."""
    import faiss

    n, dim = emb.shape
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    x = np.ascontiguousarray(emb, dtype=np.float32)
    index: faiss.Index
    if n <= 200_000:
        index = faiss.IndexFlatIP(dim)
    else:  # exact search is O(n²); an inverted file keeps a million pairs to minutes
        nlist = int(np.sqrt(n))
        ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        ivf.train(x[np.random.RandomState(0).choice(n, min(n, 50 * nlist), replace=False)])
        ivf.nprobe = 8
        index = ivf
    index.add(x)
    edges = []
    for lo in range(0, n, 8192):
        lims, _, ids = index.range_search(x[lo : lo + 8192], threshold)
        for q in range(len(lims) - 1):
            for j in ids[lims[q] : lims[q + 1]]:
                i = lo + q
                if j > i:
                    edges.append((i, int(j)))
    return np.asarray(edges, dtype=np.int64).reshape(-1, 2)


def clusters(n: int, edges: NDArray[np.int64]) -> NDArray[np.int64]:
    """Connected components: each item's cluster is the smallest index in its component."""
    if not len(edges):
        return np.arange(n)
    graph = coo_matrix((np.ones(len(edges), dtype=np.int8), (edges[:, 0], edges[:, 1])), shape=(n, n))
    _, label = connected_components(graph, directed=False)
    smallest = np.full(label.max() + 1, n, dtype=np.int64)
    np.minimum.at(smallest, label, np.arange(n))
    return np.asarray(smallest[label], dtype=np.int64)
