"""Per-source diversity and the "homogeneous source" flag.

The paper saw on its map that P3 formed "large balls" of near-identical pairs and dropped it.
Here that judgement is made from numbers: a source is flagged when at least `min_reasons` of
these signals agree (each alone has innocent causes; templated, low-entropy data trips several):

  short answers      share of answers of ≤3 tokens (labels: "positive", "yes", "B")
  prompt gzip ratio  templated prompts compress far better than written ones
  prompt distinct-2  few distinct word bigrams among the prompts
  response gzip      the answers repeat one another
  near-dup rate      share of its pairs with a near-duplicate (MinHash) partner
  templates          share of prompts whose first or last 3 words open/close ≥3% of its prompts
  neighbour distance cosine distance to its 5 nearest pairs, against the median of all sources:
                     the paper's "balls" of near-identical pairs are pairs with very near neighbours
  concentration      share of its pairs in its 3 largest subtopics

Text metrics are measured on a seeded sample of the same size for every source, since
distinct-n and compression ratios change with the amount of text.
"""

from __future__ import annotations

import gzip
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from distill4all.config import CurateDiversityConfig


@dataclass
class SourceProfile:
    """One source's diversity metrics, and whether they flag it as homogeneous."""

    source: str
    pairs: int
    response_words: dict[str, float]
    prompt_words: dict[str, float]
    short_answer_share: float
    distinct_1: float
    distinct_2: float
    prompt_distinct_2: float
    response_gzip_ratio: float
    prompt_gzip_ratio: float
    near_dup_rate: float
    template_share: float
    neighbour_distance: float | None
    relative_neighbour_distance: float | None
    cluster_concentration: float | None
    homogeneous: bool = False
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantiles(values: NDArray[np.int64]) -> dict[str, float]:
    if not len(values):
        return {"mean": 0.0, "p10": 0.0, "p50": 0.0, "p90": 0.0}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"mean": round(float(values.mean()), 1), "p10": float(p10), "p50": float(p50), "p90": float(p90)}


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct word n-grams over all word n-grams of the texts."""
    grams: set[tuple[str, ...]] = set()
    total = 0
    for t in texts:
        w = t.lower().split()
        g = list(zip(*(w[i:] for i in range(n)), strict=False))
        grams.update(g)
        total += len(g)
    return len(grams) / total if total else 0.0


def template_share(prompts: Sequence[str], min_share: float = 0.03) -> float:
    """Share of prompts that open or close with the same 3 words as ≥`min_share` of them (≥3 prompts)."""
    if not prompts:
        return 0.0
    heads = [tuple(p.lower().split()[:3]) for p in prompts]
    tails = [tuple(p.lower().split()[-3:]) for p in prompts]
    need = max(3, int(np.ceil(min_share * len(prompts))))
    head_n, tail_n = Counter(heads), Counter(tails)
    hits = sum(1 for h, t in zip(heads, tails, strict=True) if head_n[h] >= need or tail_n[t] >= need)
    return hits / len(prompts)


def neighbour_distance(emb: NDArray[np.float32], k: int = 5) -> float:
    """Mean cosine distance of each (unit) embedding to its k nearest others."""
    n = len(emb)
    if n < 2:
        return 0.0
    k = min(k, n - 1)
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    nearest = -np.partition(-sims, k - 1, axis=1)[:, :k]
    return float(1 - nearest.mean())


def gzip_ratio(texts: Sequence[str]) -> float:
    raw = "\n".join(texts).encode()
    return len(gzip.compress(raw, mtime=0)) / len(raw) if raw else 1.0


def source_profile(
    source: str,
    prompts: Sequence[str],
    responses: Sequence[str],
    near_dup: NDArray[np.bool_],
    emb: NDArray[np.float32] | None,
    subtopic: NDArray[np.int64] | None,
    sample: int,
    seed: int = 0,
) -> SourceProfile:
    n = len(responses)
    rng = np.random.RandomState(seed)
    pick = np.sort(rng.choice(n, sample, replace=False)) if n > sample else np.arange(n)
    ps = [prompts[i] for i in pick]
    rs = [responses[i] for i in pick]
    r_words = np.asarray([len(r.split()) for r in responses], dtype=np.int64)
    p_words = np.asarray([len(p.split()) for p in prompts], dtype=np.int64)
    spread = round(neighbour_distance(emb[pick]), 4) if emb is not None and len(emb) else None
    concentration = None
    if subtopic is not None and len(subtopic):
        sizes = np.sort(np.bincount(subtopic))[::-1]
        concentration = round(float(sizes[:3].sum() / n), 4)
    return SourceProfile(
        source=source,
        pairs=n,
        response_words=_quantiles(r_words),
        prompt_words=_quantiles(p_words),
        short_answer_share=round(float((r_words <= 3).mean()) if n else 0.0, 4),
        distinct_1=round(distinct_n(rs, 1), 4),
        distinct_2=round(distinct_n(rs, 2), 4),
        prompt_distinct_2=round(distinct_n(ps, 2), 4),
        response_gzip_ratio=round(gzip_ratio(rs), 4),
        prompt_gzip_ratio=round(gzip_ratio(ps), 4),
        near_dup_rate=round(float(near_dup.mean()) if n else 0.0, 4),
        template_share=round(template_share(ps), 4),
        neighbour_distance=spread,
        relative_neighbour_distance=None,
        cluster_concentration=concentration,
    )


def flag_homogeneous(stats: list[SourceProfile], cfg: CurateDiversityConfig) -> None:
    """Set `homogeneous` and its `reasons` on each source's stats."""
    # against the median of all sources (itself included): one odd source cannot make the others look tight
    spreads = [s.neighbour_distance for s in stats if s.neighbour_distance is not None]
    for s in stats:
        if s.neighbour_distance is not None and len(spreads) > 1 and np.median(spreads) > 0:
            s.relative_neighbour_distance = round(s.neighbour_distance / float(np.median(spreads)), 4)
        reasons = []
        if s.short_answer_share >= cfg.short_answer_share:
            reasons.append(f"{s.short_answer_share:.0%} of answers are ≤3 tokens (≥{cfg.short_answer_share:.0%})")
        if s.prompt_gzip_ratio < cfg.prompt_gzip_ratio:
            reasons.append(f"prompts compress to {s.prompt_gzip_ratio:.2f} of their size (<{cfg.prompt_gzip_ratio})")
        if s.prompt_distinct_2 < cfg.prompt_distinct_2:
            reasons.append(f"prompt distinct-2 is {s.prompt_distinct_2:.2f} (<{cfg.prompt_distinct_2})")
        if s.response_gzip_ratio < cfg.response_gzip_ratio:
            reasons.append(
                f"answers compress to {s.response_gzip_ratio:.2f} of their size (<{cfg.response_gzip_ratio})"
            )
        if s.near_dup_rate >= cfg.near_dup_rate:
            reasons.append(f"{s.near_dup_rate:.0%} of pairs have a near-duplicate (≥{cfg.near_dup_rate:.0%})")
        if s.template_share >= cfg.template_share:
            reasons.append(f"{s.template_share:.0%} of prompts share a template's first or last words")
        rel = s.relative_neighbour_distance
        if rel is not None and rel < cfg.neighbour_distance:
            reasons.append(
                f"pairs lie {rel:.2f}× the sources' median distance from their neighbours (<{cfg.neighbour_distance})"
            )
        if s.cluster_concentration is not None and s.cluster_concentration >= cfg.cluster_concentration:
            reasons.append(
                f"{s.cluster_concentration:.0%} of pairs sit in its 3 largest subtopics"
                f" (≥{cfg.cluster_concentration:.0%})"
            )
        s.reasons = reasons
        s.homogeneous = len(reasons) >= cfg.min_reasons and s.pairs >= cfg.min_pairs
