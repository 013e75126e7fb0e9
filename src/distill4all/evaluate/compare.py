"""Summaries and paired statistics over per-item perplexities of several models."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


def figure_values(ppls: list[float], clip: float = 100.0) -> np.ndarray:
    """The paper's figure script: `np.clip(np.nan_to_num(x, 100), 0, 100)`. Its 100 lands in
    nan_to_num's `copy` argument, not `nan`, so a NaN perplexity becomes 0 — the best possible
    score — and +inf becomes the largest float, which the clip turns into 100."""
    return np.clip(np.nan_to_num(np.asarray(ppls, dtype=np.float64), nan=0.0), 0.0, clip)


@dataclass
class Summary:
    n: int
    median: float
    mean: float
    share_clipped: float  # at or above the clip (inf included)
    n_nan: int
    median_unclipped: float = math.nan  # the median of the raw values (NaN left out, inf kept)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(ppls: list[float], clip: float = 100.0) -> Summary:
    values = figure_values(ppls, clip)
    raw = np.asarray(ppls, dtype=np.float64)
    return Summary(
        n=len(ppls),
        median=float(np.median(values)) if len(values) else math.nan,
        mean=float(np.mean(values)) if len(values) else math.nan,
        share_clipped=float(np.mean(raw >= clip)) if len(raw) else 0.0,
        n_nan=int(np.isnan(raw).sum()),
        median_unclipped=float(np.nanmedian(raw)) if (~np.isnan(raw)).any() else math.nan,
    )


@dataclass
class Paired:
    model: str
    baseline: str
    n: int  # items where both are numbers
    share_lower: float  # items where the model's perplexity is below the baseline's (ties: half)
    median_difference: float  # model - baseline, on the clipped values
    wilcoxon_statistic: float
    p_lower: float  # one-sided: the model's perplexities are stochastically lower
    p_two_sided: float
    # the same on the raw values: above the clip, two models still differ (a pruned student
    # often has many items past 100, which the clipped test counts as ties)
    share_lower_unclipped: float = math.nan
    p_lower_unclipped: float = math.nan

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired(model: str, a: list[float], baseline: str, b: list[float], clip: float = 100.0) -> Paired:
    """Wilcoxon signed-rank test on the clipped per-item values (NaN pairs dropped, not zeroed),
    and on the raw values."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = ~(np.isnan(xa) | np.isnan(xb))
    ca, cb = np.clip(xa[ok], 0, clip), np.clip(xb[ok], 0, clip)
    n = int(ok.sum())
    if n == 0:
        return Paired(model, baseline, 0, math.nan, math.nan, math.nan, math.nan, math.nan)
    diff = ca - cb
    stat, p_less, p_two = _wilcoxon(ca, cb)
    # raw values compared in logs, where an infinite perplexity is only the largest
    la, lb = (np.minimum(np.log(np.maximum(x[ok], 1e-300)), 1e6) for x in (xa, xb))
    _, p_raw, _ = _wilcoxon(la, lb)
    return Paired(
        model,
        baseline,
        n,
        _share_lower(diff),
        float(np.median(diff)),
        stat,
        p_less,
        p_two,
        _share_lower(la - lb),
        p_raw,
    )


def _share_lower(diff: np.ndarray) -> float:
    """Items where the model is lower (ties: half)."""
    return float((np.sum(diff < 0) + 0.5 * np.sum(diff == 0)) / len(diff))


def _wilcoxon(a: np.ndarray, b: np.ndarray) -> tuple[float, float, float]:
    """(statistic, one-sided p that a is lower, two-sided p) of the signed-rank test."""
    from scipy.stats import wilcoxon

    if np.all(a == b):
        return 0.0, 1.0, 1.0
    two = wilcoxon(a, b, zero_method="wilcox")
    return (
        float(two.statistic),
        float(wilcoxon(a, b, alternative="less", zero_method="wilcox").pvalue),
        float(two.pvalue),
    )
