"""What quantization cost: each GGUF file against the unquantized one, on a fixed set of texts.

For every position of every text both files give a next-token distribution. The report gives
the mean KL divergence KL(reference ‖ quantized) in nats, how often the most likely next token
agrees (top-1), the perplexity of both on the texts, the file size and the bits per weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distill4all.runtime.engine import LlamaCppEngine, log_softmax

REPORT_TEXTS: tuple[str, ...] = (
    "The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
    "World's Fair, and for the Louvre, the most visited art museum in the world.",
    "To make a cup of tea, boil fresh water, pour it over the tea leaves and let it steep for three to "
    "five minutes. Add milk or lemon if you like, and sugar to taste.",
    "def is_prime(n: int) -> bool:\n    if n < 2:\n        return False\n    for k in range(2, int(n ** 0.5) + 1):\n"
    "        if n % k == 0:\n            return False\n    return True\n",
    "Photosynthesis is the process by which green plants use sunlight, water and carbon dioxide to make "
    "glucose and oxygen. It takes place mainly in the chloroplasts of leaf cells.",
    "Question: What is 12 times 12?\nAnswer: 12 times 12 is 144. Question: What is the square root of 81?\n"
    "Answer: The square root of 81 is 9.",
    "Dear team, thank you for your hard work this quarter. Sales grew by 15% and we welcomed 40 new "
    "customers. Let's keep the momentum going into the new year. Best regards, Anna",
    "Le petit chat dort sur le canapé pendant que la pluie tombe doucement sur la ville. "
    "Der Hund spielt im Garten, und die Kinder lachen.",
    "SELECT customer_id, SUM(amount) AS total FROM orders WHERE created_at >= '2023-01-01' "
    "GROUP BY customer_id ORDER BY total DESC LIMIT 10;",
)


@dataclass(frozen=True)
class QuantRow:
    file: str
    type: str
    size_bytes: int
    bits_per_weight: float
    kl_divergence: float  # mean over positions, nats; 0 for the reference itself
    top1_agreement: float  # fraction of positions whose argmax agrees with the reference
    perplexity: float
    reference_perplexity: float
    tokens: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gguf_stats(path: Path) -> tuple[int, float, str]:
    """(file size, bits per weight over all tensors, the file type name llama.cpp recorded)."""
    import gguf

    reader = gguf.GGUFReader(path)
    n_bytes = sum(int(t.n_bytes) for t in reader.tensors)
    n_weights = sum(int(t.n_elements) for t in reader.tensors)
    ftype = reader.get_field("general.file_type")
    name = gguf.LlamaFileType(int(ftype.contents())).name if ftype is not None else "?"
    return path.stat().st_size, 8 * n_bytes / max(n_weights, 1), name.removeprefix("MOSTLY_").removeprefix("ALL_")


@dataclass
class _Totals:
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0


def quant_report(
    reference: Path,
    files: list[Path],
    texts: tuple[str, ...] = REPORT_TEXTS,
    on_text: Callable[[], None] | None = None,
) -> list[QuantRow]:
    """One row per file (the reference first), all measured on the same token ids.

    Text by text, every file scores the same ids, so memory holds one text's logits per file
    rather than the reference's logits for every text.
    """
    paths = [reference, *[f for f in files if f != reference]]
    engines = [LlamaCppEngine(p) for p in paths]
    totals = [_Totals() for _ in paths]
    n_tokens = 0
    try:
        for text in texts:
            ids = engines[0].tokenize(text)
            if len(ids) < 2:
                continue
            targets = np.asarray(ids[1:])
            positions = np.arange(len(targets))
            ref = log_softmax(engines[0].logits(ids[:-1]))
            ref_p, ref_top = np.exp(ref), ref.argmax(axis=-1)
            n_tokens += len(targets)
            for engine, t in zip(engines, totals, strict=True):
                lp = ref if engine is engines[0] else log_softmax(engine.logits(ids[:-1]))
                t.nll -= float(lp[positions, targets].sum())
                t.kl += float((ref_p * (ref - lp)).sum())
                t.agree += int((lp.argmax(axis=-1) == ref_top).sum())
            if on_text is not None:
                on_text()
    finally:
        for engine in engines:
            engine.close()
    ref_ppl = math.exp(totals[0].nll / max(n_tokens, 1))
    rows = []
    for path, t in zip(paths, totals, strict=True):
        size, bpw, ftype = gguf_stats(path)
        kl = 0.0 if path == reference else t.kl / max(n_tokens, 1)
        rows.append(QuantRow(path.name, ftype, size, round(bpw, 3), kl, t.agree / max(n_tokens, 1),
                             math.exp(t.nll / max(n_tokens, 1)), ref_ppl, n_tokens))  # fmt: skip
    return rows


def report_table(rows: list[QuantRow], title: str = "quantization report") -> Any:
    """A rich Table of the rows."""
    from rich.table import Table

    table = Table("file", "type", "size", "bits/weight", "KL (nats)", "top-1", "ppl", "ppl ref", title=title)
    for r in rows:
        table.add_row(
            r.file,
            r.type,
            f"{r.size_bytes / 1e6:.1f} MB",
            f"{r.bits_per_weight:.2f}",
            f"{r.kl_divergence:.4f}",
            f"{r.top1_agreement:.1%}",
            f"{r.perplexity:.2f}",
            f"{r.reference_perplexity:.2f}",
        )
    return table
