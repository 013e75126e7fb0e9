"""Benchmark: Self-Instruct ground-truth perplexity, items/s, ours vs the original script's loop.

    python bench/eval.py [--items 40] [--write]

On the real SmolLM2-135M and the real Self-Instruct items (../shared/data, else the written sample
in examples/data). Contenders, all on the same items, in turns (the machine is shared and noisy):

- peer: the loop of nomic-ai/gpt4all's `eval_self_instruct.py` (March 2023), transformers fp32,
  written out here as it was (model(input_ids, labels=target_ids) per 512-token window);
- ours, transformers engine (the HF form), the faithful metric;
- ours, llama.cpp engine on our f16 and Q4_0 exports, the faithful metric;
- and the corrected (conditioned) metric on each of our engines, HF vs GGUF (it has no peer).

Beside the speed it reports each one's median perplexity (clipped at 100, as the figure script)
and the largest per-item gap in log-perplexity: ours on transformers must equal the peer to 1e-4
(the tests assert that on the tiny model), and the GGUF files show what quantization does to the
paper's metric.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _results import machine, table, write_section  # noqa: E402

EVAL_SET = REPO.parent / "shared" / "data" / "self_instruct_user_oriented.jsonl"
SAMPLE = REPO / "examples" / "data" / "self_instruct_sample.jsonl"
SECTION = "eval"


def items(n: int) -> tuple[Path, list[Any]]:
    from distill4all.evaluate.data import load_items, pick

    path = EVAL_SET if EVAL_SET.is_file() else SAMPLE
    return path, pick(load_items(path), n, seed=0)


class OriginalLoop:
    """eval_self_instruct.py's `eval_example`, on transformers: the peer."""

    def __init__(self, hf: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(hf)
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()

    def __call__(self, item: Any) -> float:
        torch = self.torch
        prompt = item.instruction + " " + item.input
        text = prompt + " " + item.output
        prompt_len = self.tok(prompt, return_tensors="pt").input_ids.size(1)
        input_ids = self.tok(text, return_tensors="pt").input_ids
        seq_len, stride = input_ids.size(1), 512
        nlls, prev_end, end = [], 0, 0
        with torch.no_grad():
            for begin in range(prompt_len, seq_len, stride):
                end = min(begin + stride, seq_len)
                trg_len = end - prev_end
                ids = input_ids[:, begin:end]
                target = ids.clone()
                target[:, :-trg_len] = -100
                nlls.append(self.model(ids, labels=target).loss * trg_len)
                prev_end = end
                if end == seq_len:
                    break
        return math.nan if not nlls else float(torch.exp(torch.stack(nlls).sum() / end))


class Ours:
    def __init__(self, spec: Path, metric: str = "faithful") -> None:
        from distill4all.evaluate.perplexity import conditioned_perplexity, faithful_perplexity
        from distill4all.runtime.engine import load_engine

        self.engine = load_engine(str(spec))
        self.fn = faithful_perplexity if metric == "faithful" else conditioned_perplexity

    def __call__(self, item: Any) -> float:
        return self.fn(self.engine, item)


def max_log_gap(xs: list[float], ys: list[float]) -> float:
    """The largest |log a - log b| over items: the mean per-token NLL gap, whatever the scale."""
    return max(abs(math.log(a) - math.log(b)) for a, b in zip(xs, ys, strict=True) if math.isfinite(a + b))


def clipped_median(values: list[float]) -> float:
    return statistics.median([100.0 if math.isinf(v) or v > 100 else v for v in values if not math.isnan(v)])


def main() -> None:
    from distill4all import offline_defaults

    offline_defaults()  # as the CLI: ours and the peers alike run offline
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="replace the eval section of bench/RESULTS.md")
    args = ap.parse_args()

    from distill4all.config import ExportConfig
    from distill4all.export.exporter import export_model
    from distill4all.models import resolve_model
    from distill4all.models.registry import models_dir

    hf = resolve_model("smollm2-135m-instruct", want="hf").path
    out = models_dir() / "bench-smollm2-export"
    if not all((out / f"model-{k}.gguf").is_file() for k in ("f16", "q4_0")):
        export_model("smollm2-135m-instruct", out, ExportConfig(model="smollm2-135m-instruct",
                                                                quantizations=["q4_0"], report=False))  # fmt: skip
    path, chosen = items(args.items)
    contenders: dict[str, Any] = {
        "original loop (transformers fp32)": OriginalLoop(hf),
        "ours, transformers fp32": Ours(hf),
        "ours, llama.cpp f16": Ours(out / "model-f16.gguf"),
        "ours, llama.cpp Q4_0": Ours(out / "model-q4_0.gguf"),
    }
    conditioned: dict[str, Any] = {
        "ours, transformers fp32 (conditioned)": Ours(hf, "conditioned"),
        "ours, llama.cpp f16 (conditioned)": Ours(out / "model-f16.gguf", "conditioned"),
        "ours, llama.cpp Q4_0 (conditioned)": Ours(out / "model-q4_0.gguf", "conditioned"),
    }
    best: dict[str, float] = {}
    values: dict[str, list[float]] = {}
    everyone = contenders | conditioned
    for r in range(args.rounds):
        names = list(everyone)
        for name in names[r % len(names) :] + names[: r % len(names)]:  # rotate the order each round
            t0 = time.perf_counter()
            values[name] = [everyone[name](it) for it in chosen]
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t0)
    peer = "original loop (transformers fp32)"
    rows = []
    for name in contenders:
        diff = max_log_gap(values[name], values[peer])
        rows.append([name, f"{len(chosen) / best[name]:.2f}", f"{best[peer] / best[name]:.2f}×",
                     f"{clipped_median(values[name]):.2f}", f"{diff:.2g}"])  # fmt: skip
    body = table(["contender", "items/s", "vs original loop", "median ppl (clipped)", "max |Δ log ppl| vs loop"], rows)
    ref = "ours, transformers fp32 (conditioned)"
    crows = []
    for name in conditioned:
        diff = max_log_gap(values[name], values[ref])
        crows.append([name, f"{len(chosen) / best[name]:.2f}", f"{best[ref] / best[name]:.2f}×",
                      f"{clipped_median(values[name]):.2f}", f"{diff:.2g}"])  # fmt: skip
    body += "\n\nThe corrected (conditioned) metric, HF vs GGUF:\n\n" + table(
        ["contender", "items/s", "vs transformers", "median ppl (clipped)", "max |Δ log ppl| vs transformers"], crows
    )
    body += (
        f"\n\n{len(chosen)} items of `{path.name}` (seed 0), SmolLM2-135M-Instruct; first table the paper's "
        f"(faithful) metric; best of {args.rounds} rounds in rotated order. {machine()}."
    )
    print(body)
    if args.write:
        ours, q4 = "ours, transformers fp32", "ours, llama.cpp Q4_0"
        write_section(SECTION, body, headlines=[
            {"figure": "Self-Instruct perplexity, items/s", "ours": f"{len(chosen) / best[q4]:.2f} (Q4_0)",
             "peer": f"original loop {len(chosen) / best[peer]:.2f}", "ratio": f"{best[peer] / best[q4]:.2f}×",
             "target": ""},
            {"figure": "faithful ppl, ours vs the original loop", "ours": f"median {clipped_median(values[ours]):.2f}",
             "peer": f"median {clipped_median(values[peer]):.2f}",
             "ratio": f"max Δ log ppl {max_log_gap(values[ours], values[peer]):.1g}", "target": "1e-4"},
        ])  # fmt: skip


if __name__ == "__main__":
    main()
