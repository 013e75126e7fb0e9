"""The runtime engines, the Python API and `distill4all chat` on the trained tiny model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distill4all import Assistant
from distill4all.runtime.engine import Engine, SamplingParams, load_engine
from runtime_models import CHATS, trained_export, trained_tiny


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    return trained_export() / "model-q8_0.gguf"


@pytest.fixture(scope="module")
def engines(gguf_file: Path) -> dict[str, Engine]:
    return {"llama.cpp": load_engine(str(gguf_file)), "transformers": load_engine(str(trained_tiny()))}


BACKENDS = ["llama.cpp", "transformers"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_streaming_gives_the_same_text_as_a_whole_answer(engines: dict[str, Engine], backend: str) -> None:
    e = engines[backend]
    messages = [{"role": "user", "content": "Say hello."}]
    whole = e.chat(messages, SamplingParams(max_tokens=30))
    stream = e.stream_chat(messages, SamplingParams(max_tokens=30))
    pieces = list(stream)
    assert len(pieces) > 3 and "".join(pieces) == whole.text == CHATS["Say hello."]
    assert stream.completion is not None and stream.completion.finish_reason == "stop"


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_strings_and_max_tokens(engines: dict[str, Engine], backend: str) -> None:
    e = engines[backend]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    c = e.chat(messages, SamplingParams(max_tokens=30, stop=["capital"]))
    assert (c.text, c.finish_reason) == ("Paris is the ", "stop")
    pieces = list(e.stream_chat(messages, SamplingParams(max_tokens=30, stop=["of Fr"])))
    assert "".join(pieces) == "Paris is the capital " and not any("of" in p for p in pieces)
    c = e.chat(messages, SamplingParams(max_tokens=3))
    assert c.finish_reason == "length" and c.completion_tokens == 3 and c.text and "Paris".startswith(c.text[:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_is_reproducible_by_seed(engines: dict[str, Engine], backend: str) -> None:
    e = engines[backend]
    hot = SamplingParams(max_tokens=20, temperature=2.0, top_k=0, top_p=1.0, seed=7)
    a, b = e.generate("Numbers:", hot), e.generate("Numbers:", hot)
    assert a.token_ids == b.token_ids
    others = {tuple(e.generate("Numbers:", SamplingParams(**{**hot.as_dict(), "seed": s})).token_ids) for s in range(4)}
    assert len(others) > 1  # the seed matters at a high temperature
    greedy = e.generate("Numbers:", SamplingParams(max_tokens=20, temperature=0.0, seed=None))
    topk1 = e.generate("Numbers:", SamplingParams(max_tokens=20, temperature=1.0, top_k=1, seed=None))
    assert greedy.token_ids == topk1.token_ids
    # a temperature near zero is greedy (a denormal one once overflowed the logits to inf - inf)
    for t in (1e-6, 2.2e-311):
        assert (
            e.generate("Numbers:", SamplingParams(max_tokens=20, temperature=t, seed=3)).token_ids == greedy.token_ids
        )


def test_logits_and_logprobs_agree_across_backends(engines: dict[str, Engine], gguf_file: Path) -> None:
    f32 = load_engine(str(gguf_file.with_name("model-f32.gguf")))
    hf = engines["transformers"]
    ids = hf.tokenize("A teacher model answers questions and a student model learns from the answers.")
    a, b = f32.logits(ids), hf.logits(ids)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (len(ids), hf.vocab_size)
    assert np.abs(a - b).max() < 1e-2 * np.abs(b).max()  # f32 both ways: float rounding only
    lp = f32.token_logprobs(ids)
    assert len(lp) == len(ids) - 1
    assert np.allclose(lp, hf.token_logprobs(ids), atol=1e-3)
    assert -0.1 < float(np.median(lp)) < 0  # the trained text is likely
    # token_logprobs is the log-softmax of logits at the previous position
    row = a[2] - a[2].max()
    assert abs(lp[2] - float(row[ids[3]] - np.log(np.exp(row).sum()))) < 1e-4
    assert f32.token_logprobs(ids[:1]) == []


def test_over_long_prompt_is_a_clear_error(gguf_file: Path) -> None:
    from distill4all.errors import ContextLengthError

    e = load_engine(str(gguf_file), n_ctx=64)
    assert e.n_ctx == 64
    with pytest.raises(ContextLengthError, match="context holds 64"):
        e.generate("word " * 100, SamplingParams())
    c = e.generate("Numbers: 0 1 2 " * 8, SamplingParams(max_tokens=200))  # the answer is cut at the context
    assert c.prompt_tokens + c.completion_tokens <= 64 and c.finish_reason == "length"


def test_python_api_generate_and_chat_session(gguf_file: Path) -> None:
    with Assistant.load(str(gguf_file), temperature=0.0) as a:
        assert a.generate("ping") == "pong pong"
        assert "".join(a.generate("ping", stream=True)) == "pong pong"
        assert a.last is not None and a.last.finish_reason == "stop"
        assert a.complete("The quick brown", max_tokens=40) == " fox jumps over the lazy dog."
        with a.chat_session(system="Be brief.") as s:
            assert s.send("What is the capital of France?") == CHATS["What is the capital of France?"]
            second = "".join(s.send("ping", stream=True))  # the tiny model only learnt single turns
            assert second and s.history[-1] == {"role": "assistant", "content": second}
            assert [m["role"] for m in s.history] == ["system", "user", "assistant", "user", "assistant"]
            assert s.history[2]["content"] == CHATS["What is the capital of France?"]
            rendered = a.engine.render_chat(s.history, add_generation_prompt=False)
            assert (
                rendered.startswith("<|im_start|>system\nBe brief.<|im_end|>") and rendered.count("<|im_start|>") == 5
            )
            s.reset()
            assert s.history == [{"role": "system", "content": "Be brief."}]
            s.reset(system="")
            assert s.history == []
        with pytest.raises(TypeError, match="temprature"):
            a.generate("ping", temprature=1.0)


def test_chat_session_forgets_old_turns_to_fit_the_context(gguf_file: Path) -> None:
    a = Assistant.load(str(gguf_file), n_ctx=96, max_tokens=16, temperature=0.0)
    s = a.chat_session(system="Be brief.")
    for _ in range(8):
        s.send("ping")  # never a ContextLengthError: old turns make room
    assert s.dropped_turns > 0 and s.history[0]["role"] == "system"
    assert len(a.engine.chat_ids(s.history)) <= 96


def test_chat_cli_with_piped_stdin(gguf_file: Path) -> None:
    lines = "ping\n/system You are terse.\nWhat is the capital of France?\n/reset\n/bogus\n/system\nSay hello.\n/exit\nping\n"
    p = subprocess.run(
        [sys.executable, "-m", "distill4all", "chat", str(gguf_file), "--temperature", "0"],
        input=lines, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == ["pong pong", CHATS["What is the capital of France?"], CHATS["Say hello."]]
    assert (
        p.stderr.count("tokens/s") == 3
        and "system prompt set" in p.stderr
        and "cleared" in p.stderr
        and "unknown command /bogus" in p.stderr
    )


def test_chat_cli_bad_model_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    p = subprocess.run([sys.executable, "-m", "distill4all", "chat", str(bad)], input="hi\n", capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip().startswith("error: ") and "GGUF" in p.stderr, p.stderr


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprobs_kept_while_sampling_are_the_distributions_sampled_from(
    engines: dict[str, Engine], backend: str
) -> None:
    from distill4all.runtime.server import score_tokens

    e = engines[backend]
    ids = e.chat_ids([{"role": "user", "content": "Say hello."}])
    c = e.generate_ids(ids, SamplingParams(max_tokens=12, temperature=0.0, repeat_penalty=1.3, logprobs=4))
    rescored = score_tokens(e, ids, c.token_ids, 4)
    if backend == "transformers":  # keeps no logits while sampling: the server scores afterwards
        assert c.logprobs is None
        return
    assert c.logprobs is not None and [t.token for t in c.logprobs] == c.token_ids  # the EOS that ended it left out
    for kept, again in zip(c.logprobs, rescored, strict=True):
        # one token at a time vs the whole answer in one batch: llama.cpp's kernels differ a little
        assert kept.logprob == pytest.approx(again.logprob, abs=0.05)
        assert len(kept.top) == 4 and kept.top[0][0] == again.top[0][0]
        assert [lp for _, lp in kept.top] == sorted((lp for _, lp in kept.top), reverse=True)
