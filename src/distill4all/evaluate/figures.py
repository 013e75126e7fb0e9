"""The paper's Figure 3, per metric: overlaid histograms of clipped perplexities, as the figure
script of the report's release drew them (nomic-ai/gpt4all 252676ff, eval_figures.py:
`plt.hist(values, alpha=.5)` — matplotlib's default 10 bins over each model's own range; the
April script's 50 came later), beside box + violin plots of the same values."""

from __future__ import annotations

from pathlib import Path

from distill4all import atomic
from distill4all.evaluate.compare import figure_values


def perplexity_figure(results: dict[str, list[float]], path: Path, *, title: str, clip: float = 100.0) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    values = [figure_values(results[n], clip) for n in names]
    fig, (hist, box) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    for name, v in zip(names, values, strict=True):
        hist.hist(v, alpha=0.5, label=name)  # the defaults, as the March script
    hist.set_xlabel(f"Perplexity (clipped at {clip:g})")
    hist.set_ylabel("Frequency")
    hist.legend()
    hist.set_title(title)
    positions = list(range(1, len(names) + 1))
    box.violinplot(values, positions=positions, showextrema=False)
    box.boxplot(values, positions=positions, widths=0.25, showfliers=True)
    box.set_xticks(positions, names, rotation=15, ha="right")
    box.set_ylabel("Perplexity")
    box.set_ylim(0, clip * 1.02)
    box.set_title("Lower is better")
    fig.tight_layout()
    with atomic.output_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
