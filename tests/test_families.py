"""Each exported family computes what its checkpoint computes: a tiny model of each (families.py)
exported to f32 and Q8_0 GGUF, then llama.cpp's log-probabilities on 128+ tokens of mixed text
held to transformers' (f32: within 1e-3 everywhere and the same top-1 at every position; Q8_0:
mean KL ≤ 1e-3), llama.cpp's tokenization to the HF tokenizer's, and greedy continuations at f32
token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config, write_jsonl
from distill4all.export.gguf import PROBE_TEXT
from distill4all.runtime.engine import load_engine, log_softmax
from families import (
    FAMILY_MODELS,
    MIXED,
    TURN_END,
    _build,
    chat_kind,
    config_of,
    qwen_tokenizer,
    sentencepiece_tokenizer,
)

# Inside the text, any whitespace; not at its very start, where transformers 5's SentencePiece
# conversion (Metaspace, prepend_scheme "first") adds no `▁` and SentencePiece and llama.cpp do.
TEXTS = [MIXED, PROBE_TEXT, "Runs of  two   and\ttabs\t\tthen\n\n\n\nnewlines   ", "mixed 東京 — ü 🙂 1234567890 x"]


@pytest.fixture(scope="module", params=list(FAMILY_MODELS))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    folder = tmp_path_factory.mktemp(request.param)
    model = FAMILY_MODELS[request.param](folder / "hf")
    r = run_cli("export", model, "-o", folder / "out", "--base-type", "f32", "--quant", "q8_0", "--no-report")
    assert r.code == 0, r.output
    assert "tokenizes chat prompts differently" not in r.output
    return request.param, model, folder / "out"


def hf_logprobs(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


class F32Llama:
    """llama.cpp itself (llama-cpp-python) with an f32 KV cache: its default f16 cache rounds
    keys and values to 11 bits, which alone moves log-probabilities by ~2e-3 on these models."""

    def __init__(self, gguf_file: Path, n_ctx: int = 512) -> None:
        import llama_cpp

        self.llm = llama_cpp.Llama(model_path=str(gguf_file), n_ctx=n_ctx, logits_all=True, verbose=False,
                                   type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)  # fmt: skip

    def logprobs(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return log_softmax(np.asarray(self.llm.scores[: len(ids)], dtype=np.float64))

    def greedy(self, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        for _ in range(n):
            out.append(int(self.logprobs(out)[-1].argmax()))
        return out[len(ids) :]


def hf_greedy(model_dir: Path, ids: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return [int(t) for t in out[0, len(ids) :]]


def test_the_gguf_computes_what_the_checkpoint_computes(exported: tuple[str, Path, Path]) -> None:
    from transformers import AutoTokenizer

    name, model, out = exported
    tok = AutoTokenizer.from_pretrained(model)
    ids = list(tok(MIXED)["input_ids"])
    assert len(ids) > max(128, config_of(model).get("original_max_position_embeddings", 0)), len(ids)
    want = hf_logprobs(model, ids)
    f32 = F32Llama(out / "model-f32.gguf")
    got = f32.logprobs(ids)
    assert np.abs(got - want).max() <= 1e-3, (name, float(np.abs(got - want).max()))
    assert (got.argmax(-1) == want.argmax(-1)).all(), name
    prompt = list(tok("The quick brown fox")["input_ids"])
    # Long-RoPE picks its factors by length: transformers by the text's, llama.cpp by its context
    # size (a multiple of 256); for a short text both take the short factors when the context is
    # the original length, for MIXED above both take the long ones.
    short = config_of(model).get("original_max_position_embeddings") if name == "phi3" else 512
    assert F32Llama(out / "model-f32.gguf", n_ctx=short).greedy(prompt, 32) == hf_greedy(model, prompt, 32), name
    q = F32Llama(out / "model-q8_0.gguf").logprobs(ids)
    kl = float((np.exp(want) * (want - q)).sum(-1).mean())
    assert kl <= 1e-3, (name, kl)
    q8 = load_engine(str(out / "model-q8_0.gguf"), n_ctx=512)  # as users run it
    for text in TEXTS:
        assert q8.tokenize(text) == list(tok(text)["input_ids"]), (name, text)
    q8.close()


def test_a_family_not_yet_exported_is_named_with_the_nearest(tmp_path: Path) -> None:
    model = _build(tmp_path / "gemma", qwen_tokenizer, "GemmaConfig", "GemmaForCausalLM", "chatml", head_dim=16)
    r = run_cli("export", model, "-o", tmp_path / "out", "--no-report")
    assert r.code == 2, r.output
    supported = "llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3_text"
    assert f"model_type 'gemma' cannot be exported yet; supported: {supported}" in r.stderr
    assert "(the nearest is gemma2)" in r.stderr


def test_a_tokenizer_whose_chat_prompts_llama_cpp_splits_otherwise_is_warned_of(tmp_path: Path) -> None:
    """A SentencePiece tokenizer converted with `legacy: false` puts no `▁` after a special token;
    llama.cpp always does, so the GGUF's chat prompts differ from training's: export says so."""
    model = _build(tmp_path / "hf", lambda d: sentencepiece_tokenizer(d, legacy=False), "MistralConfig",
                   "MistralForCausalLM", "mistral")  # fmt: skip
    r = run_cli("export", model, "-o", tmp_path / "out", "--base-type", "f32", "--quant", "f32", "--no-report")
    assert r.code == 0, r.output
    assert "llama.cpp tokenizes chat prompts differently from the HF tokenizer at token 1" in r.output
    assert "legacy: false" in r.output


def test_two_lora_steps_merge_and_export(exported: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Each family trains (LoRA on every linear layer), and its adapter merges and exports."""
    name, model, _ = exported
    rows = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}.", "source": "s"} for i in range(12)]
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    modules = ["all-linear"]  # peft's: every linear layer, Phi-3's fused ones included
    train = {"base_model": str(model), "data": str(data), "val_fraction": 0.0, "global_batch_size": 4,
             "micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-2, "warmup_steps": 0, "max_length": 64,
             "precision": "fp32", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": modules}}  # fmt: skip
    config = write_config(tmp_path / "run.yaml", {"name": name, "run_dir": "run", "seed": 1, "train": train})
    r = run_cli("train", config, env={"OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.output
    adapter = tmp_path / "run" / "train" / "model"
    assert (adapter / "adapter_config.json").is_file()
    r = run_cli("export", adapter, "-o", tmp_path / "out", "--base-type", "f32", "--quant", "f32", "--no-report")
    assert r.code == 0, r.output
    from safetensors.torch import load_file

    key = f"model.layers.0.self_attn.{'qkv_proj' if name == 'phi3' else 'q_proj'}.weight"
    delta = (
        load_file(tmp_path / "out" / "merged" / "model.safetensors")[key] - load_file(model / "model.safetensors")[key]
    )
    assert delta.abs().max() > 1e-4  # the adapter is in the merged weights
    assert F32Llama(tmp_path / "out" / "model-f32.gguf").logprobs([1, 2, 3]).shape[0] == 3


def test_the_family_template_trains_answers_up_to_its_turn_end(exported: tuple[str, Path, Path]) -> None:
    """Training on the family's own chat template puts loss on the answer and the token that ends
    the turn (EOS, or `<|eot_id|>` / `<end_of_turn>` / `<|end|>` / `<|im_end|>` where the template
    writes one) and on nothing after it."""
    from transformers import AutoTokenizer

    from distill4all.train.data import Example
    from distill4all.train.templates import IGNORE, load_template

    _, model, _ = exported
    tok = AutoTokenizer.from_pretrained(model)
    end_id = tok.convert_tokens_to_ids(TURN_END[chat_kind(model)])
    messages = ({"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi there!"})
    (enc,) = load_template("chat", tok, 64).encode([Example(messages=messages, source="s", row=0)])
    trained = [t for t in enc.labels if t != IGNORE]
    assert trained[-1] == end_id and trained.count(end_id) == 1, tok.convert_ids_to_tokens(trained)
    assert tok.decode(trained[:-1]).strip() == "Hi there!"


def test_a_model_trained_on_its_family_template_stops_on_both_engines_and_evaluates(
    exported: tuple[str, Path, Path], tmp_path: Path
) -> None:
    """Fine-tuned until it knows one answer, each family's model says exactly that answer and stops
    at its template's turn end through transformers and through its GGUF; eval scores both alike."""
    import json

    import gguf

    from distill4all.runtime.engine import LlamaCppEngine, SamplingParams, TransformersEngine

    name, model, _ = exported
    end = TURN_END[chat_kind(model)]
    rows = [{"prompt": "Say hi", "response": "Hi there!", "source": "s"}] * 8
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    train = {"base_model": str(model), "data": str(data), "val_fraction": 0.0, "global_batch_size": 8,
             "micro_batch_size": 8, "max_steps": 40, "learning_rate": 3e-3, "warmup_steps": 0, "max_length": 64,
             "precision": "fp32", "method": "full", "template": "chat"}  # fmt: skip
    config = write_config(tmp_path / "run.yaml", {"name": name, "run_dir": "run", "seed": 1, "train": train})
    r = run_cli("train", config, env={"OMP_NUM_THREADS": "1"})
    assert r.code == 0, r.output
    trained = tmp_path / "run" / "train" / "model"
    r = run_cli("export", trained, "-o", tmp_path / "out", "--base-type", "f32", "--quant", "f32", "--no-report")
    assert r.code == 0, r.output
    gguf_file = tmp_path / "out" / "model-f32.gguf"

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained)
    end_id = tok.convert_tokens_to_ids(end)
    assert end_id in json.loads((trained / "generation_config.json").read_text())["eos_token_id"]
    if end_id != tok.eos_token_id:
        field = gguf.GGUFReader(gguf_file).get_field(gguf.Keys.Tokenizer.EOT_ID)
        assert field is not None and int(field.contents()) == end_id

    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    for engine in (TransformersEngine(trained), LlamaCppEngine(gguf_file)):
        prompt = engine.chat_ids([{"role": "user", "content": "Say hi"}])
        answer = engine.generate_ids(prompt, greedy)
        assert (answer.text.strip(), answer.finish_reason) == ("Hi there!", "stop"), (engine.backend, answer)
        # what it stopped at: the turn end, the token after the answer
        assert int(engine.logits(prompt + answer.token_ids)[-1].argmax()) == end_id, engine.backend
        engine.close()

    items = write_jsonl(tmp_path / "items.jsonl", [{"instruction": "Say hi", "output": "Hi there!"},
                                                   {"instruction": "Greet me.", "output": "Hello, friend."}])  # fmt: skip
    r = run_cli("eval", "--data", items, "--model", f"hf={trained}", "--model", f"gguf={gguf_file}",
                "--out", tmp_path / "eval", "--baseline", "hf")  # fmt: skip
    assert r.code == 0, r.output
    scores = {}
    for label in ("hf", "gguf"):
        for line in (tmp_path / "eval" / f"perplexity-{label}.jsonl").read_text().splitlines():
            row = json.loads(line)
            scores |= {(label, row["id"], metric): row[metric] for metric in ("faithful", "conditioned")}
    assert len(scores) == 2 * 2 * 2 and all(np.isfinite(list(scores.values()))), scores
    if name == "phi3":
        # llama.cpp picks long-RoPE's long factors by context size (512 here, over the original
        # 256), transformers by text length (these are short): docs/export.md.
        return
    for (label, item, metric), ppl in scores.items():
        if label == "gguf":  # within the engine's float16 KV cache
            assert ppl == pytest.approx(scores["hf", item, metric], rel=5e-3), (item, metric)
