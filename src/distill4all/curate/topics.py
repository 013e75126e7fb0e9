"""Topics in two levels: k-means subtopics on the embeddings, grouped into coarse topics, each
labelled by its c-TF-IDF keywords (BERTopic's class-based TF-IDF: a topic's words weighted by how
much more often they occur in it than across all topics)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray


@dataclass
class Topics:
    topic: NDArray[np.int64]  # coarse topic of each row
    subtopic: NDArray[np.int64]  # fine topic of each row (globally numbered)
    topic_labels: list[str]
    subtopic_labels: list[str]
    subtopic_parent: list[int]


def auto_counts(n: int, topics: int, subtopics: int) -> tuple[int, int]:
    """Coarse and fine topic counts: given, or growing with the square root of the data size."""
    fine = subtopics or int(np.clip(round(math.sqrt(n) / 1.5), 4, 100))
    coarse = topics or int(np.clip(round(math.sqrt(fine) * 1.2), 2, 20))
    fine = max(1, min(fine, n))
    return max(1, min(coarse, fine)), fine


def find_topics(
    emb: NDArray[np.float32], texts: Sequence[str], *, topics: int = 0, subtopics: int = 0, seed: int = 0
) -> Topics:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    n = len(emb)
    coarse_k, fine_k = auto_counts(n, topics, subtopics)
    rng = np.random.RandomState(seed)
    fit_on = emb if n <= 50_000 else emb[rng.choice(n, 50_000, replace=False)]
    if n <= 20_000:
        fine = KMeans(fine_k, n_init=3, random_state=seed).fit(fit_on)
    else:
        fine = MiniBatchKMeans(fine_k, n_init=3, random_state=seed, batch_size=4096).fit(fit_on)
    sub = fine.predict(emb).astype(np.int64)
    centres = fine.cluster_centers_
    sizes = np.bincount(sub, minlength=fine_k).astype(np.float64)
    if coarse_k < fine_k:
        coarse = KMeans(coarse_k, n_init=5, random_state=seed).fit(centres, sample_weight=np.maximum(sizes, 1e-3))
        parent = coarse.labels_.astype(np.int64)
    else:
        parent = np.arange(fine_k, dtype=np.int64)
    top = parent[sub]
    sub_labels = ctfidf_labels(texts, sub, fine_k, seed=seed)
    top_labels = ctfidf_labels(texts, top, coarse_k, seed=seed)
    return Topics(top, sub, top_labels, sub_labels, [int(p) for p in parent])


def ctfidf_labels(
    texts: Sequence[str], labels: NDArray[np.int64], k: int, *, words: int = 3, per_class: int = 400, seed: int = 0
) -> list[str]:
    """The top `words` c-TF-IDF terms of each class, from at most `per_class` texts of each."""
    from sklearn.feature_extraction.text import CountVectorizer

    rng = np.random.RandomState(seed)
    docs = []
    for c in range(k):
        idx = np.flatnonzero(labels == c)
        if len(idx) > per_class:
            idx = rng.choice(idx, per_class, replace=False)
        docs.append(" ".join(texts[int(i)][:1000] for i in sorted(idx)))
    if not any(d.strip() for d in docs):
        return [f"topic {c}" for c in range(k)]
    vec = CountVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z]{2,}\b", max_features=50_000)
    try:
        counts = vec.fit_transform(docs).astype(np.float64)
    except ValueError:  # no word left after stop words
        return [f"topic {c}" for c in range(k)]
    terms = vec.get_feature_names_out()
    tf = counts.multiply(1.0 / np.maximum(counts.sum(axis=1), 1)).tocsr()
    freq = np.asarray(counts.sum(axis=0)).ravel()
    avg_words = counts.sum() / max(k, 1)
    idf = np.log(1 + avg_words / np.maximum(freq, 1))
    weights = tf.multiply(idf).tocsr()
    out = []
    for c in range(k):
        row = weights.getrow(c).toarray().ravel()
        best = [terms[i] for i in np.argsort(-row)[:words] if row[i] > 0]
        out.append(" · ".join(best) if best else f"topic {c}")
    return out
