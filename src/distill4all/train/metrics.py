"""Training metrics: one JSON object per line in metrics.jsonl, and the loss-curve PNG.

Rows carry `step` and either train fields (loss, lr, grad_norm, tokens, tokens_per_s) or
`val_loss`. A resumed run first drops the rows logged after its checkpoint (they are redone), so
the file always reads as one run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from distill4all import atomic


def read_metrics(path: Path, tail_bytes: int | None = None) -> list[dict[str, Any]]:
    """Every complete row, or those in the last `tail_bytes` (a kill mid-write can leave a partial
    line: it is skipped)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        if tail_bytes is not None:
            f.seek(max(0, path.stat().st_size - tail_bytes))
        text = f.read().decode("utf-8", errors="replace")
    rows = []
    for line in text.split("\n"):  # JSONL: U+2028 and U+0085 are text, not line ends
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


class MetricsLog:
    def __init__(self, path: Path, resume_step: int) -> None:
        # Rows up to the checkpoint's step were logged before it was written; later ones are redone.
        kept = [r for r in read_metrics(path) if r["step"] <= resume_step] if resume_step > 0 else []
        atomic.write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        self.path = path
        self._f: TextIO = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed in close())

    def write(self, row: dict[str, Any]) -> None:
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def plot_loss(metrics: Path, png: Path, title: str = "") -> None:
    """Train loss per step (light), its running mean, and validation loss (points)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    if train:
        steps, losses = zip(*train, strict=True)
        window = max(1, len(losses) // 10)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3 if window > 1 else 1.0, linewidth=1, label="train loss")
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1) : i + 1]) / min(window, i + 1) for i in range(len(losses))]
            ax.plot(steps, smooth, color="tab:blue", linewidth=2, label=f"train loss, mean of {window} steps")
    if val:
        steps, losses = zip(*val, strict=True)
        ax.plot(steps, losses, "o-", color="tab:orange", linewidth=2, label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy per target token")
    ax.set_title(title or "training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic.output_file(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
