"""Offline models: the tiny LLaMA builder and the embedded real SmolLM2."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from conftest import cli_command, run_cli
from distill4all.atomic import sha256_file
from distill4all.errors import ModelError
from distill4all.models import resolve_model
from distill4all.models.tiny import build_tiny_model
from distill4all.runtime.engine import SamplingParams, TransformersEngine


def test_tiny_model_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a", "tiny", seed=3)
    b = build_tiny_model(tmp_path / "b", "tiny", seed=3)
    c = build_tiny_model(tmp_path / "c", "tiny", seed=4)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256_file(a / name) == sha256_file(b / name)
    assert sha256_file(a / "model.safetensors") != sha256_file(c / "model.safetensors")


def test_tiny_model_loads_and_generates_with_transformers(tiny_model: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert type(model).__name__ == "LlamaForCausalLM"
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.5e6 < n_params < 2e6
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<s>", "<|im_end|>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}) == 3
    assert len(tok) == model.config.vocab_size
    # byte-level BPE: any text round-trips, BOS is prepended like LLaMA's tokenizer
    text = "Grüße, 東京! def f(x): return x**2  # 12345"
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] == len(ids) + 5 or out[0, -1].item() == tok.eos_token_id


def test_tiny_model_cli_and_models_listing(tmp_path: Path) -> None:
    r = run_cli("tiny-model", tmp_path / "m", "--seed", "1")
    assert r.code == 0, r.output
    assert (tmp_path / "m" / "model.safetensors").is_file()
    r = run_cli("tiny-model", tmp_path / "m")
    assert r.code == 2 and "exists" in r.stderr
    r = run_cli("tiny-model", tmp_path / "n", "--size", "huge")
    assert r.code == 2 and "tiny, small" in r.stderr
    r = run_cli("models")
    assert r.code == 0, r.output
    for name in ("smollm2-135m-instruct", "tiny", "small", "Apache-2.0", "gguf", "hf"):
        assert name in r.stdout


def test_models_listing_in_a_pipe_cuts_no_path_and_prints_json(tmp_path: Path) -> None:
    """Into a pipe, with no COLUMNS set, rich would lay the table out in 80 columns; a script needs
    whole names and paths, and JSON."""
    cache = tmp_path / ("a-cache-folder-with-a-long-name/" * 4) / "cache"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"} | {"DISTILL4ALL_CACHE": str(cache)}
    table = subprocess.run(cli_command("models"), capture_output=True, text=True, env=env, timeout=120)
    assert table.returncode == 0, table.stderr
    tiny = str(cache / "models" / "tiny-seed0")
    assert len(tiny) > 80 and f"{tiny} (built on first use)" in table.stdout
    assert "smollm2-135m-instruct " in table.stdout  # the name whole, not "smollm2-135m-in…"
    listed = subprocess.run(cli_command("models", "--json"), capture_output=True, text=True, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert {(m["name"], m["format"]) for m in rows} >= {("smollm2-135m-instruct", "gguf"), ("tiny", "hf")}
    assert next(m for m in rows if m["name"] == "tiny")["location"] == f"{tiny} (built on first use)"
    assert all(set(m) == {"name", "format", "params", "size_bytes", "licence", "location", "description"} for m in rows)


def test_unknown_model_names_and_bad_paths_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="neither a path that exists nor a known name"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="neither an HF checkpoint"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no GGUF form"):
        resolve_model("tiny", want="gguf")


@pytest.mark.slow
def test_smollm2_resolves_offline_answers_in_english_and_caches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DISTILL4ALL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gguf = resolve_model("smollm2-135m-instruct")
    assert gguf.format == "gguf" and gguf.origin == "package" and gguf.path.stat().st_size > 90e6

    t0 = time.perf_counter()
    first = resolve_model("smollm2-135m-instruct", want="hf")
    first_s = time.perf_counter() - t0
    assert first.origin == "built" and (first.path / "model.safetensors").is_file()
    assert first.path.is_relative_to(tmp_path / "cache")
    t0 = time.perf_counter()
    second = resolve_model("smollm2-135m-instruct", want="hf")
    assert second.origin == "cache" and second.path == first.path
    assert time.perf_counter() - t0 < first_s / 10

    engine = TransformersEngine(str(second.path))
    assert engine.model.config.model_type == "llama"
    assert 130e6 < sum(p.numel() for p in engine.model.parameters()) < 140e6
    c = engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=64))
    assert c.finish_reason == "stop", c  # it stopped at <|im_end|>, not at the token limit
    assert "Paris" in c.text
    words = re.findall(r"[A-Za-z]+", c.text)
    assert len(words) >= 4 and sum(w.lower() in {"the", "of", "is", "capital", "france"} for w in words) >= 3
    assert "<|im_end|>" not in c.text and c.completion_tokens < 64
    assert os.environ["HF_HUB_OFFLINE"] == "1"
