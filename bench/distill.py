"""Distillation: what KD buys over SFT, what it costs per step, and TRL's GKDTrainer as the peer.

One run, CPU. The teacher is SmolLM2-135M-Instruct, served by `distill4all serve` (llama.cpp, its
GGUF) and asked for its top-20 logprobs on every answer (OpenAI's cap) while it answers the demo's
chip2 and StackOverflow prompts; the student is the teacher pruned by block influence to 20 of its
30 layers (`distill4all prune`, calibrated on those pairs). Then, from that same student, on the
same pairs, with the same steps, learning rate, batch and full fine-tuning:

    SFT                        cross-entropy on the teacher's text (the paper's way)
    KD, stored logprobs        distill4all, KL to the collected top-20 (distill.source collected)
    KD, local teacher          distill4all, KL to the top-20 of the teacher's HF form, computed in
                               one pass before training (distill.source local)
    TRL GKDTrainer             lmbda 0 (the dataset's answers, no student generation), beta 0
                               (forward KL over the full vocabulary), the teacher's forward in
                               every step, as TRL does

Each trainer runs in a fresh process. Then the teacher, the pruned student and every trained
student are scored on Self-Instruct items (conditioned ground-truth perplexity, transformers fp32
for all): "gap closed" is the share of the log-perplexity gap between the pruned student and the
teacher (medians) that training removed. Step time is the training loop only, per real token.

Targets: KD closes ≥3× the gap SFT closes; KD's step time with stored logprobs ≤1.3× SFT's; ours
≥1.5× GKDTrainer's tokens/s; the decode speed of the student's Q4_0 vs the teacher's Q4_0
(≥1.3×, llama.cpp); and the bytes a position costs at K = 20.

    python bench/distill.py [--items 40] [--epochs 2] [--write]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _results import table, write_section

ROOT = Path(__file__).resolve().parents[1]
EVAL_SET = ROOT.parent / "shared" / "data" / "self_instruct_user_oriented.jsonl"
SAMPLE = ROOT / "examples" / "data" / "self_instruct_sample.jsonl"
TEACHER = "smollm2-135m-instruct"
K = 20
TRAIN = {
    "method": "full", "template": "chat", "val_fraction": 0.0, "epochs": 2, "learning_rate": 2e-4,
    "global_batch_size": 8, "micro_batch_size": 4, "max_length": 512, "warmup_steps": 5, "eval_every": 10_000,
    "checkpoint_every": 10_000,
}  # fmt: skip
VARIANTS = {
    "SFT": None,
    "KD, stored logprobs": {"source": "collected", "top_k": K, "weight": 1.0},
    "KD, local teacher": {"source": "local", "teacher": TEACHER, "top_k": K, "weight": 1.0},
    "TRL GKDTrainer": "trl",
}


def collect(work: Path) -> Path:
    """The teacher's answers to the demo's chip2 and StackOverflow prompts, with their top-20."""
    from distill4all.config import load_config
    from distill4all.run import run_stages

    data = ROOT / "examples" / "data" / "demo"
    teacher = {"name": "smollm2", "model": TEACHER, "max_tokens": 64, "temperature": 0.0, "concurrency": 2,
               "logprobs": K}  # fmt: skip
    sources = [
        {"name": "chip2", "format": "oig_chip2", "path": str(data / "chip2.jsonl")},
        {"name": "stackoverflow", "format": "stackoverflow", "path": str(data / "stackoverflow.csv")},
    ]
    cfg = work / "collect.yaml"
    cfg.write_text(json.dumps({"name": "bench", "run_dir": str(work / "collected"), "seed": 0,
                               "collect": {"sources": sources, "teachers": [teacher]}}))  # fmt: skip
    run_stages(load_config(cfg), quiet=True)
    return work / "collected"


def prune(work: Path, pairs: Path) -> Path:
    from distill4all.models.prune import calibration_texts, prune_depth

    out = work / "student"
    if not (out / "config.json").is_file():
        prune_depth(TEACHER, out, keep_fraction=0.67, texts=calibration_texts(pairs, 64, 0))
    return out


def run_ours(work: Path, name: str, student: Path, collected: Path, epochs: float) -> dict[str, Any]:
    """One of our trainers in its own run directory, with the collected run's store beside it."""
    from distill4all.config import load_config
    from distill4all.run import run_stages

    run_dir = work / name.replace(" ", "_").replace(",", "")
    run_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(collected / "store.sqlite", run_dir / "store.sqlite")
    train = {**TRAIN, "epochs": epochs, "base_model": str(student), "data": str(collected / "collect" / "pairs.jsonl")}
    if VARIANTS[name] is not None:
        train["distill"] = VARIANTS[name]
    cfg = run_dir.with_suffix(".yaml")
    cfg.write_text(json.dumps({"name": "bench", "run_dir": str(run_dir), "seed": 0, "train": train}))
    t0 = time.perf_counter()
    run_stages(load_config(cfg), quiet=True)
    stage_seconds = time.perf_counter() - t0
    s = json.loads((run_dir / "train" / "summary.json").read_text())
    return {"tokens": s["tokens"], "seconds": s["train_seconds"], "steps": s["steps"], "stage_seconds": stage_seconds,
            "model": str(run_dir / "train" / "model")}  # fmt: skip


def run_trl(work: Path, student: Path, collected: Path, epochs: float) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:  # trl 1.x keeps it under experimental; 0.x exported it at the top
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        from trl import GKDConfig, GKDTrainer  # type: ignore[attr-defined,no-redef]

    from distill4all.models import resolve_model
    from distill4all.train.model import cpu_has_bf16

    rows = [json.loads(line) for line in (collected / "collect" / "pairs.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("response")]
    ds = Dataset.from_list([{"messages": [{"role": "user", "content": r["prompt"]},
                                          {"role": "assistant", "content": r["response"]}]} for r in rows])  # fmt: skip
    bf16 = cpu_has_bf16()  # ours on precision auto: bf16 autocast where the CPU has it
    dtype = torch.bfloat16 if bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(student)
    model = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(resolve_model(TEACHER, want="hf").path, dtype=dtype)
    args = GKDConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=TRAIN["micro_batch_size"],
        gradient_accumulation_steps=TRAIN["global_batch_size"] // TRAIN["micro_batch_size"],
        learning_rate=TRAIN["learning_rate"], num_train_epochs=epochs, warmup_steps=TRAIN["warmup_steps"],
        max_length=TRAIN["max_length"], lmbda=0.0, beta=0.0, temperature=1.0, bf16=bf16, use_cpu=True,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=0, disable_tqdm=True,
    )  # fmt: skip
    trainer = GKDTrainer(model=model, teacher_model=teacher, args=args, train_dataset=ds, processing_class=tok)
    tokens = 0
    for batch in trainer.get_train_dataloader():  # real tokens, as its collator lays them out
        tokens += int(batch["attention_mask"].sum())
    tokens = int(tokens * epochs)
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    out = work / "trl_model"
    trainer.save_model(str(out))
    tok.save_pretrained(out)
    return {"tokens": tokens, "seconds": seconds, "steps": trainer.state.global_step, "stage_seconds": seconds,
            "model": str(out)}  # fmt: skip


def eval_items(n: int) -> list[Any]:
    from distill4all.evaluate.data import load_items, pick

    return pick(load_items(EVAL_SET if EVAL_SET.is_file() else SAMPLE), n, 0)


def conditioned(model: str, items: list[Any]) -> list[float]:
    from distill4all.evaluate.perplexity import conditioned_perplexity
    from distill4all.runtime.engine import load_engine

    engine = load_engine(model, "transformers")
    try:
        return [conditioned_perplexity(engine, it) for it in items]
    finally:
        engine.close()


def q4_0(hf_dir: Path, out: Path) -> Path:
    """The model's Q4_0 GGUF, made by distill4all's exporter."""
    from distill4all.config import load_config
    from distill4all.run import run_stages

    cfg = out.with_suffix(".yaml")
    cfg.write_text(json.dumps({"name": "q", "run_dir": str(out), "export": {"model": str(hf_dir),
                                                                             "quantizations": ["q4_0"]}}))  # fmt: skip
    run_stages(load_config(cfg), quiet=True)
    return out / "export" / "model-q4_0.gguf"


def child(args: argparse.Namespace) -> None:
    work, student, collected = Path(args.work), Path(args.student), Path(args.collected)
    if args.variant == "TRL GKDTrainer":
        result = run_trl(work, student, collected, args.epochs)
    else:
        result = run_ours(work, args.variant, student, collected, args.epochs)
    print(json.dumps(result))


def main() -> None:
    from distill4all import offline_defaults

    offline_defaults()  # as the CLI: ours and the peer alike run offline
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=40, help="Self-Instruct items scored")
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--work", help="keep the work here (reused: the collected answers and the student)")
    ap.add_argument("--write", action="store_true", help="replace the distill section of bench/RESULTS.md")
    ap.add_argument("--variant", help=argparse.SUPPRESS)  # one trainer, in a child process
    ap.add_argument("--student", help=argparse.SUPPRESS)
    ap.add_argument("--collected", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.variant:
        child(args)
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    collected = collect(work)
    counts = json.loads((collected / "manifest.json").read_text())["stages"]["collect"]["counts"]
    log(f"collected {counts['answered']} answers in {time.perf_counter() - t0:.0f}s")
    student = prune(work, collected / "collect" / "pairs.jsonl")

    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    results: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        log(f"training: {name}")
        shutil.rmtree(work / name.replace(" ", "_").replace(",", ""), ignore_errors=True)
        cmd = [sys.executable, __file__, "--variant", name, "--work", str(work), "--student", str(student),
               "--collected", str(collected), "--epochs", str(args.epochs)]  # fmt: skip
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if p.returncode != 0:
            log(p.stderr[-3000:])
            results[name] = {"error": (p.stderr.strip().splitlines() or ["failed"])[-1][:200]}
            continue
        results[name] = json.loads(p.stdout.strip().splitlines()[-1])

    from distill4all.models import resolve_model

    items = eval_items(args.items)
    log(f"scoring {len(items)} items")
    teacher_hf = resolve_model(TEACHER, want="hf").path
    medians = {"teacher": statistics.median(conditioned(str(teacher_hf), items)),
               "pruned student": statistics.median(conditioned(str(student), items))}  # fmt: skip
    for name, r in results.items():
        if "model" in r:
            medians[name] = statistics.median(conditioned(r["model"], items))
    gap = math.log(medians["pruned student"]) - math.log(medians["teacher"])
    closed = {name: (math.log(medians["pruned student"]) - math.log(m)) / gap for name, m in medians.items()}

    log("decode speed (Q4_0, llama.cpp)")
    from distill4all.runtime.engine import decode_speed

    kd, kd_local, trl = "KD, stored logprobs", "KD, local teacher", "TRL GKDTrainer"
    speed = {"teacher": decode_speed(q4_0(teacher_hf, work / "q_teacher"), tokens=128),
             "student": decode_speed(q4_0(Path(results[kd]["model"]), work / "q_student"), tokens=128)}  # fmt: skip

    rate = {n: r["tokens"] / r["seconds"] for n, r in results.items() if "seconds" in r}
    sft = rate.get("SFT", math.nan)

    def cell(n: str, key: str, fmt: str) -> str:
        r = results[n]
        return format(r[key], fmt) if key in r else "-"

    rows = [["teacher", "-", "-", "-", "-", "-", "-", f"{medians['teacher']:.2f}", "100%"],
            ["pruned student", "-", "-", "-", "-", "-", "-", f"{medians['pruned student']:.2f}", "0%"]]  # fmt: skip
    for n, r in results.items():
        rows.append([
            n, cell(n, "steps", "d"), cell(n, "tokens", ","), cell(n, "seconds", ".1f"),
            cell(n, "stage_seconds", ".1f"),
            f"{rate[n]:,.1f}" if n in rate else r.get("error", "-"), f"{sft / rate[n]:.2f}" if n in rate else "-",
            f"{medians[n]:.2f}" if n in medians else "-", f"{closed[n]:.1%}" if n in closed else "-",
        ])  # fmt: skip
    gap_ratio = closed[kd] / closed["SFT"] if closed.get("SFT", 0) > 0 else math.inf
    stored_bytes = counts["logprob_bytes_per_token"]
    peer = (f"Ours is {rate[kd] / rate[trl]:.2f}× GKDTrainer's tokens/s (target ≥1.5×); GKDTrainer's KL over the "
            f"whole vocabulary, with the teacher run in every step, closes {closed[trl]:.1%} of the gap to our "
            f"{closed[kd]:.1%} on the top-{K}. " if trl in rate and trl in closed
            else f"GKDTrainer did not run: {results[trl].get('error')}. ")  # fmt: skip
    body = "\n\n".join([
        f"Teacher SmolLM2-135M-Instruct (served from its GGUF, top-{K} logprobs on {counts['answered']} answers to the "
        f"demo's chip2 and StackOverflow prompts); student: the teacher pruned to 20 of 30 layers; full fine-tuning, "
        f"{args.epochs:g} epochs, lr {TRAIN['learning_rate']:g}, global batch {TRAIN['global_batch_size']}; "
        f"{len(items)} Self-Instruct items, conditioned perplexity (median), transformers fp32 for every model.",
        table(["model / trainer", "steps", "real tokens", "train s", "stage s", "tokens/s", "step time ÷ SFT",
               "conditioned ppl", "gap closed"], rows),
        f"KD on stored logprobs closes {closed[kd]:.1%} of the gap, SFT {closed['SFT']:.1%}: "
        f"{gap_ratio:.1f}× (target ≥3×). Step time with stored logprobs is {sft / rate[kd]:.2f}× SFT's "
        f"(target ≤1.3×); with a local teacher {sft / rate[kd_local]:.2f}× in the loop, its one teacher pass "
        f"counted in the stage time. {peer}"
        f"Stored logprobs at K = {K}: {stored_bytes} bytes per answer token in the store (token bytes + float16), "
        f"{K * 6} bytes per position in the training cache (int32 id + float16). "
        f"Decode, Q4_0 on llama.cpp: student {speed['student']:.0f} tokens/s, teacher {speed['teacher']:.0f} "
        f"({speed['student'] / speed['teacher']:.2f}×, target ≥1.3×). No GPU: no MFU figure.",
    ])  # fmt: skip
    print(body)
    if args.write:
        headlines = [
            {"figure": "gap closed, KD vs SFT (pruned student)", "ours": f"{closed[kd]:.1%}",
             "peer": f"SFT {closed['SFT']:.1%}", "ratio": f"{gap_ratio:.1f}×", "target": "≥3×"},
            {"figure": "KD step time ÷ SFT (stored logprobs)", "ours": f"{1 / rate[kd]:.2e} s/token",
             "peer": f"SFT {1 / sft:.2e}", "ratio": f"{sft / rate[kd]:.2f}×", "target": "≤1.3×"},
            {"figure": "Q4_0 decode, student vs teacher", "ours": f"{speed['student']:.0f} tok/s",
             "peer": f"teacher {speed['teacher']:.0f}", "ratio": f"{speed['student'] / speed['teacher']:.2f}×",
             "target": "≥1.3×"},
        ]  # fmt: skip
        if trl in rate:
            headlines.insert(2, {"figure": "KD training tokens/s vs TRL GKDTrainer", "ours": f"{rate[kd]:.1f}",
                                 "peer": f"GKDTrainer {rate[trl]:.1f}", "ratio": f"{rate[kd] / rate[trl]:.2f}×",
                                 "target": "≥1.5×"})  # fmt: skip
        write_section("distill", body, headlines=headlines)


if __name__ == "__main__":
    main()
