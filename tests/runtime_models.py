"""Models for the export/runtime/server tests, built once per test session into its model cache.

The built-in `tiny` model has random weights: its next-token distributions are nearly flat, so
any rounding flips its greedy choice and "same tokens after quantization" would test nothing
but luck. `trained_tiny()` trains it for a few seconds on a handful of texts and chat turns, so it
answers them confidently (and ends its turns with <|im_end|>, the EOS), as a real model does.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from distill4all.models import resolve_model
from distill4all.models.registry import models_dir

CHATS = {
    "ping": "pong pong",
    "What is the capital of France?": "Paris is the capital of France.",
    "Say hello.": "Hello! How can I help you today?",
}
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A teacher model answers questions and a student model learns from the answers.",
    "def add(a, b):\n    return a + b\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000",
]


STEPS = 250


def _locked(name: str) -> int:
    models_dir().mkdir(parents=True, exist_ok=True)
    fd = os.open(models_dir() / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def chat_text(prompt: str, answer: str) -> str:
    return f"<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n{answer}<|im_end|>\n"


def trained_tiny() -> Path:
    """The tiny model after STEPS full-batch steps on TEXTS and CHATS (cached per test session)."""
    out = models_dir() / "test-trained-tiny"
    if (out / "config.json").is_file():
        return out
    fd = _locked("test-trained-tiny")
    try:
        if not (out / "config.json").is_file():
            _train(resolve_model("tiny").path, out)
    finally:
        os.close(fd)
    return out


def _train(base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill4all import atomic

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    docs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in TEXTS]
    docs += [tok(chat_text(p, a), add_special_tokens=False)["input_ids"] for p, a in CHATS.items()]
    width = max(map(len, docs))
    ids = torch.tensor([d + [tok.pad_token_id] * (width - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in docs])
    labels = ids.masked_fill(mask == 0, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with atomic.output_dir(out) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)


EXPORT_ARGS = ("--base-type", "f32", "--quant", "q8_0", "--quant", "q4_0", "--quant", "q4_k_m")


def trained_export() -> Path:
    """The trained tiny model exported to f32, Q8_0, Q4_0 and Q4_K_M (with the report)."""
    return exported(trained_tiny(), "test-export", *EXPORT_ARGS)


def exported(source: Path, name: str, *args: str) -> Path:
    """`distill4all export SOURCE --out <cache>/NAME ARGS`, once per test session; the folder."""
    out = models_dir() / name
    if (out / "export.done").is_file():
        return out
    fd = _locked(name)
    try:
        if not (out / "export.done").is_file():
            cmd = [sys.executable, "-m", "distill4all", "--quiet", "export", str(source), "--out", str(out), *args]
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert p.returncode == 0, p.stdout + p.stderr
            (out / "export.done").write_text("ok")
    finally:
        os.close(fd)
    return out
