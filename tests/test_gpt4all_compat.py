"""The real SmolLM2: our compat export loads in the GPT4All bindings and answers as our runtime does;
`distill4all serve smollm2-135m-instruct` serves the packaged model with no set-up."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import gguf
import httpx
import openai
import pytest

from distill4all.models import resolve_model
from distill4all.runtime.engine import SamplingParams, load_engine
from runtime_models import exported

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France? Answer in one sentence."


def gpt4all_greedy(model: Path, prompt: str, max_tokens: int) -> str:
    """Greedy text from the gpt4all 2.8 bindings, in a child process (a refused file must not take
    pytest down with it). The prompt is sent raw with special tokens parsed, as our runtime does."""
    code = f"""
import sys
from gpt4all import GPT4All
m = GPT4All({model.name!r}, model_path={str(model.parent)!r}, allow_download=False, device="cpu", n_ctx=2048)
out = []
m.model.prompt_model({prompt!r}, "%1", lambda i, s: out.append(s) or True, n_predict={max_tokens}, top_k=1,
                     top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset_context=True, special=True)
sys.stdout.write("".join(out))
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    # The bindings report a file they cannot load on stderr and then answer nothing.
    refused = [line for line in p.stderr.splitlines() if "error loading model" in line]
    if p.returncode != 0 or refused:
        raise RuntimeError(refused[0] if refused else f"exit {p.returncode}: {p.stderr[-300:]}")
    return p.stdout


def test_gpt4all_loads_a_compat_export_of_smollm2_and_answers_as_we_do() -> None:
    pytest.importorskip("gpt4all")
    hf = resolve_model("smollm2-135m-instruct", want="hf").path
    out = exported(hf, "test-smollm2-compat", "--quant", "q4_0", "--compat", "--no-report")
    model = out / "model-q4_0.gguf"
    assert gguf.GGUFReader(model).get_field("tokenizer.ggml.pre").contents() == "refact"

    engine = load_engine(str(model))
    prompt = engine.render_chat([{"role": "user", "content": QUESTION}])
    ours = engine.generate_ids(engine.tokenize(prompt, add_special=False), SamplingParams(max_tokens=40))
    assert "Paris" in ours.text
    theirs = gpt4all_greedy(model, prompt, 40)
    assert theirs.strip() == ours.text.strip()


def test_gpt4all_refuses_smollm2_under_its_own_pre_tokenizer_name() -> None:
    """Why compat exists: the packaged SmolLM2 GGUF says `smollm`, which gpt4all 2.8 does not know."""
    pytest.importorskip("gpt4all")
    packaged = resolve_model("smollm2-135m-instruct", want="gguf").path
    assert gguf.GGUFReader(packaged).get_field("tokenizer.ggml.pre").contents() == "smollm"
    with pytest.raises(RuntimeError, match="unknown pre-tokenizer type: 'smollm'"):
        gpt4all_greedy(packaged, "Hi", 4)


def test_serve_smollm2_with_no_set_up() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "distill4all", "serve", "smollm2-135m-instruct", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.TransportError:
                assert proc.poll() is None
                time.sleep(0.3)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="smollm2-135m-instruct", temperature=0, max_tokens=30,
                                           messages=[{"role": "user", "content": QUESTION}])  # fmt: skip
        assert "Paris" in (r.choices[0].message.content or "")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
