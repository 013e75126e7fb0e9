"""Benchmark: our runtime vs raw llama-cpp-python vs transformers fp32, on the real SmolLM2-135M.

    python bench/runtime.py            # prints the tables
    python bench/runtime.py --write    # also replaces the "runtime" section of bench/RESULTS.md

The model is `smollm2-135m-instruct`'s HF form re-exported by us (f16 → Q4_0, Q8_0, Q4_K_M).
Each contender runs in its own process (so peak RSS is its own), on the same prompt, greedy, for
the same number of tokens; the figures are medians of a few runs, taken side by side in one run of
this script because the machine is shared and noisy. Targets: our runtime ≥ 0.95× raw llama.cpp
decode speed; Q4_0 ≥ 3× transformers fp32 decode speed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
EVAL_SET = REPO.parent / "shared" / "data" / "self_instruct_user_oriented.jsonl"
SECTION = "runtime"
MAX_TOKENS = 128
REPS = 4
PROMPT = (
    "Write a detailed, friendly explanation of how a refrigerator keeps food cold. Cover the refrigerant, "
    "the compressor, the condenser coils at the back, the expansion valve and the evaporator inside, and "
    "explain why the back of the fridge feels warm. Then give five practical tips for keeping a fridge "
    "efficient at home, such as where to place it, how full to keep it, and how often to clean the coils. "
    "Finish with a short summary in two sentences."
)


def threads() -> int:
    return len(os.sched_getaffinity(0))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_dir() -> Path:
    """Our export of the HF form (cached beside the model cache; made on first use)."""
    from distill4all.config import ExportConfig
    from distill4all.export.exporter import export_model
    from distill4all.models.registry import models_dir

    out = models_dir() / "bench-smollm2-export"
    cfg = ExportConfig(model="smollm2-135m-instruct", quantizations=["q4_0", "q8_0", "q4_k_m"], report=False)
    if not all((out / f"model-{k}.gguf").is_file() for k in ("f16", "q4_0", "q8_0", "q4_k_m")):
        export_model("smollm2-135m-instruct", out, cfg)
    return out


def chat_prompt(render: Any) -> str:
    return str(render([{"role": "user", "content": PROMPT}]))


# --- workers: each prints one JSON line ---------------------------------------------------------
#
# The machine is shared, so speed is measured with all three contenders loaded in one process and
# run in turns (ours, raw, transformers, then again in rotated order): each sees the same load.
# Peak RSS needs a process per contender, so each is also loaded alone for one short answer.


class Ours:
    def __init__(self, gguf: Path, hf: Path) -> None:
        from distill4all.runtime.engine import LlamaCppEngine

        self.engine = LlamaCppEngine(gguf, n_ctx=2048)
        self.ids = self.engine.chat_ids([{"role": "user", "content": PROMPT}])

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        from distill4all.runtime.engine import SamplingParams

        self.engine.llm.reset()  # no prompt cache between runs, as for the others
        c = self.engine.generate_ids(self.ids, SamplingParams(max_tokens=max_tokens))
        return len(self.ids) / c.prompt_seconds, c.decode_tokens_per_second, c.completion_tokens


class Raw:
    """llama-cpp-python as its users call it: Llama.create_completion, streamed."""

    def __init__(self, gguf: Path, hf: Path) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        n = threads()
        self.llm = llama_cpp.Llama(str(gguf), n_ctx=2048, n_batch=512, n_threads=n, n_threads_batch=n, verbose=False)
        fmt = Jinja2ChatFormatter(self.llm.metadata["tokenizer.chat_template"], "<|im_end|>", "<|im_start|>")
        self.prompt = fmt(messages=[{"role": "user", "content": PROMPT}]).prompt
        self.n_prompt = len(self.llm.tokenize(self.prompt.encode(), add_bos=False, special=True))

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        self.llm.reset()
        t0 = time.perf_counter()
        first, count = 0.0, 0
        for chunk in self.llm.create_completion(self.prompt, max_tokens=max_tokens, temperature=0.0, stream=True):
            if chunk["choices"][0]["finish_reason"] is None:  # the last chunk only carries the reason
                count += 1
                if count == 1:
                    first = time.perf_counter() - t0
        total = time.perf_counter() - t0
        return self.n_prompt / first, (count - 1) / (total - first), count


class Transformers:
    def __init__(self, gguf: Path, hf: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads())
        tok = AutoTokenizer.from_pretrained(hf)
        self.model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
        chat = [{"role": "user", "content": PROMPT}]
        self.ids = torch.tensor([tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                         return_dict=False)])  # fmt: skip

    def run(self, max_tokens: int) -> tuple[float, float, int]:
        import torch

        with torch.inference_mode():
            t0 = time.perf_counter()
            self.model(self.ids)
            prompt_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            out = self.model.generate(self.ids, max_new_tokens=max_tokens, do_sample=False)
            total = time.perf_counter() - t0
        n = int(out.shape[1] - self.ids.shape[1])
        return self.ids.shape[1] / prompt_s, (n - 1) / max(total - prompt_s, 1e-9), n


CONTENDERS = {"ours": Ours, "raw": Raw, "transformers": Transformers}
# transformers fp32 decodes several times slower: fewer tokens keep the run short (a rate per token).
TOKENS = {"ours": MAX_TOKENS, "raw": MAX_TOKENS, "transformers": 32}


def worker_speed(gguf: Path, hf: Path) -> dict[str, Any]:
    """Ours and raw llama-cpp-python, loaded together and run in turns (the 0.95× target needs them
    side by side). transformers runs in its own process: llama.cpp's worker threads keep spinning
    between calls and would slow torch down in a shared process."""
    return _in_turns({"ours": Ours(gguf, hf), "raw": Raw(gguf, hf)})


def worker_transformers(gguf: Path, hf: Path) -> dict[str, Any]:
    return _in_turns({"transformers": Transformers(gguf, hf)})


def _in_turns(loaded: dict[str, Any]) -> dict[str, Any]:
    runs: dict[str, list[tuple[float, float, int]]] = {name: [] for name in loaded}
    order = list(loaded)
    for rep in range(REPS):
        for name in order[rep % len(order) :] + order[: rep % len(order)]:
            runs[name].append(loaded[name].run(TOKENS[name]))
    out: dict[str, Any] = {
        name: {
            "prompt_tps": statistics.median(r[0] for r in rs),
            "decode_tps": statistics.median(r[1] for r in rs),
            "tokens": rs[0][2],
        }
        for name, rs in runs.items()
    }
    out["prompt_tokens"] = len(next(iter(loaded.values())).ids) if "ours" in loaded else None
    return out


def worker_rss(name: str) -> Any:
    def run(gguf: Path, hf: Path) -> dict[str, Any]:
        CONTENDERS[name](gguf, hf).run(16)
        return {"rss_mb": peak_rss_mb()}

    return run


def worker_server(gguf: Path, hf: Path) -> dict[str, Any]:
    """Chat requests through our HTTP server vs the same calls on the engine directly, alternated."""
    import httpx
    import uvicorn

    from distill4all.runtime.engine import LlamaCppEngine, SamplingParams
    from distill4all.runtime.server import create_app

    engine = LlamaCppEngine(gguf, n_ctx=2048)
    app = create_app(engine, model_id="m")
    port = 48931
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    messages = [{"role": "user", "content": "Name three primary colours and one fact about each."}]
    body = {"model": "m", "messages": messages, "max_tokens": 64, "temperature": 0}
    direct, http = [], []
    with httpx.Client(timeout=120) as client:
        client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).raise_for_status()  # warm-up
        for _ in range(5):
            t0 = time.perf_counter()
            engine.chat(messages, SamplingParams(max_tokens=64))
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            client.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body).raise_for_status()
            http.append(time.perf_counter() - t0)
    server.should_exit = True
    return {"direct_s": statistics.median(direct), "http_s": statistics.median(http), "rss_mb": peak_rss_mb()}


WORKERS = {"speed": worker_speed, "transformers": worker_transformers, "server": worker_server} | {
    f"rss-{n}": worker_rss(n) for n in CONTENDERS
}


def run_worker(name: str, gguf: Path, hf: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.run([sys.executable, __file__, "--worker", name, str(gguf), str(hf)], capture_output=True,
                       text=True, env=env, timeout=1800)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"worker {name} failed:\n{p.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(p.stdout.strip().splitlines()[-1])
    return result


# --- the report ---------------------------------------------------------------------------------


def report_texts() -> tuple[str, ...]:
    """The real Self-Instruct eval answers when present (first 24 items), else the built-in texts."""
    from distill4all.export.quant_report import REPORT_TEXTS

    if not EVAL_SET.is_file():
        return REPORT_TEXTS
    texts = []
    for line in EVAL_SET.read_text(encoding="utf-8").splitlines()[:24]:
        item = json.loads(line)
        for inst in item.get("instances", [])[:1]:
            texts.append(f"{item['instruction']}\n{inst.get('input', '')}\n{inst.get('output', '')}".strip())
    return tuple(texts)


def main() -> None:
    from distill4all import offline_defaults

    offline_defaults()  # as the CLI: ours and the peers alike run offline
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"replace the {SECTION!r} section of {RESULTS}")
    ap.add_argument("--worker", nargs=3, metavar=("NAME", "GGUF", "HF"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        name, gguf, hf_dir = args.worker
        print(json.dumps(WORKERS[name](Path(gguf), Path(hf_dir))))
        return

    from distill4all.export.quant_report import quant_report
    from distill4all.models import resolve_model

    hf = resolve_model("smollm2-135m-instruct", want="hf").path
    out = export_dir()
    q4 = out / "model-q4_0.gguf"
    results = {}
    for name in WORKERS:
        t0 = time.perf_counter()
        results[name] = run_worker(name, q4, hf)
        print(f"{name}: {time.perf_counter() - t0:.0f}s {results[name]}", file=sys.stderr)
    speed, srv = {**results["speed"], **{"transformers": results["transformers"]["transformers"]}}, results["server"]
    ours, raw, tf = ({**speed[n], **results[f"rss-{n}"]} for n in CONTENDERS)
    texts = report_texts()
    t0 = time.perf_counter()
    rows = quant_report(out / "model-f16.gguf", [out / f"model-{k}.gguf" for k in ("q8_0", "q4_0", "q4_k_m")], texts)
    print(f"quant report: {time.perf_counter() - t0:.0f}s", file=sys.stderr)

    lines = [
        f"Model: smollm2-135m-instruct, its HF form re-exported by `distill4all export` (f16 → Q4_0/Q8_0/Q4_K_M); "
        f"{threads()} CPU threads; prompt {speed['prompt_tokens']} tokens, {MAX_TOKENS} new tokens greedy "
        f"({TOKENS['transformers']} for transformers); ours and raw loaded in one process and run in turns, "
        f"median of {REPS}; peak RSS from each loaded alone.",
        "",
        "| runtime | file | prompt tokens/s | decode tokens/s | peak RSS | decode vs raw llama.cpp "
        "| decode vs transformers |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for label, r, file in [("distill4all (llama.cpp)", ours, "Q4_0"), ("raw llama-cpp-python", raw, "Q4_0"),
                           ("transformers fp32", tf, "HF fp32")]:  # fmt: skip
        lines.append(
            f"| {label} | {file} | {r['prompt_tps']:.0f} | {r['decode_tps']:.1f} | {r['rss_mb']:.0f} MB | "
            f"{r['decode_tps'] / raw['decode_tps']:.2f}× | {r['decode_tps'] / tf['decode_tps']:.2f}× |"
        )
    ratio_raw = ours["decode_tps"] / raw["decode_tps"]
    ratio_tf = ours["decode_tps"] / tf["decode_tps"]
    lines += [
        "",
        f"Targets: ours ≥ 0.95× raw llama.cpp decode — **{ratio_raw:.2f}×** "
        f"({'met' if ratio_raw >= 0.95 else 'missed'}); Q4_0 ≥ 3× transformers fp32 decode — **{ratio_tf:.2f}×** "
        f"({'met' if ratio_tf >= 3 else 'missed'}).",
        "",
        "Server overhead (chat, 64 tokens, non-streaming, median of 5): "
        f"direct engine call {srv['direct_s'] * 1000:.0f} ms, "
        f"through `serve` over HTTP {srv['http_s'] * 1000:.0f} ms — **{srv['http_s'] / srv['direct_s']:.2f}×**.",
        "",
        f"Quantization report ({len(texts)} texts{' from the Self-Instruct eval set' if EVAL_SET.is_file() else ''}, "
        f"{rows[0].tokens} tokens; reference: model-f16.gguf):",
        "",
        "| file | type | size | bits/weight | KL (nats) | top-1 agreement | perplexity | f16 perplexity |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.file} | {row.type} | {row.size_bytes / 1e6:.1f} MB | {row.bits_per_weight:.2f} | "
            f"{row.kl_divergence:.4f} | {row.top1_agreement:.1%} | {row.perplexity:.2f} | "
            f"{row.reference_perplexity:.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    if args.write:
        from _results import write_section

        q4 = next(r for r in rows if r.type == "Q4_0")
        write_section("runtime", text, headlines=[
            {"figure": "decode tokens/s, Q4_0", "ours": f"{ours['decode_tps']:.1f}",
             "peer": f"raw llama-cpp-python {raw['decode_tps']:.1f}", "ratio": f"{ratio_raw:.2f}×", "target": "≥0.95×"},
            {"figure": "decode tokens/s, Q4_0 vs fp32", "ours": f"{ours['decode_tps']:.1f}",
             "peer": f"transformers fp32 {tf['decode_tps']:.1f}", "ratio": f"{ratio_tf:.2f}×", "target": "≥3×"},
            {"figure": "chat latency through `serve`", "ours": f"{srv['http_s'] * 1000:.0f} ms",
             "peer": f"direct engine call {srv['direct_s'] * 1000:.0f} ms",
             "ratio": f"{srv['http_s'] / srv['direct_s']:.2f}×", "target": "≈1×"},
            {"figure": "Q4_0 top-1 agreement / KL vs f16", "ours": f"{q4.top1_agreement:.1%} / {q4.kl_divergence:.3f}",
             "peer": "f16 100% / 0", "ratio": "-", "target": ""},
        ])  # fmt: skip


if __name__ == "__main__":
    main()
