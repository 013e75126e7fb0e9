"""2-D projection of the embeddings for the data map: openTSNE (the paper used t-SNE) by default,
UMAP or PaCMAP when those packages are installed."""

from __future__ import annotations

import os

import numpy as np
from numpy.typing import NDArray

from distill4all.errors import ConfigError


def project(
    emb: NDArray[np.float32], method: str = "tsne", *, perplexity: float = 30.0, seed: int = 0
) -> NDArray[np.float32]:
    n = len(emb)
    if n == 0:
        return np.zeros((0, 2), dtype=np.float32)
    if n < 4:  # too few points for a neighbour graph: lay them on a line
        return np.stack([np.arange(n, dtype=np.float32), np.zeros(n, dtype=np.float32)], axis=1)
    # openTSNE's threads spin-wait: on a busy 2-core machine two of them ran a 500-point map 10×
    # slower than one, so small maps get one thread and only large ones (FFT gradients) all cores
    jobs = max(1, os.cpu_count() or 1) if n > 20_000 else 1
    if method == "tsne":
        from openTSNE import TSNE

        tsne = TSNE(
            perplexity=min(perplexity, (n - 1) / 3),
            metric="cosine",
            n_jobs=jobs,
            random_state=seed,
            neighbors="annoy" if n > 1000 else "exact",
            negative_gradient_method="fft" if n > 5000 else "bh",
            verbose=False,
        )
        xy = np.asarray(tsne.fit(emb))
    elif method == "umap":
        try:
            import umap
        except ModuleNotFoundError:
            raise ConfigError("curate.map.method umap needs the umap-learn package: pip install umap-learn") from None
        xy = umap.UMAP(n_components=2, metric="cosine", random_state=seed).fit_transform(emb)
    elif method == "pacmap":
        try:
            import pacmap
        except ModuleNotFoundError:
            raise ConfigError("curate.map.method pacmap needs the pacmap package: pip install pacmap") from None
        xy = pacmap.PaCMAP(n_components=2, random_state=seed).fit_transform(emb)
    else:
        raise ConfigError(f"unknown map method {method!r}")
    return np.asarray(xy, dtype=np.float32)
