"""The export stage and `distill4all export`: GGUF writing, quantization, metadata, report, merge."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli, write_config
from distill4all.export.gguf import PROBE_TEXT, check_compat, llama_tokenize
from distill4all.runtime.engine import SamplingParams, load_engine
from runtime_models import CHATS, trained_export, trained_tiny

PROMPTS = ["The quick brown", "A teacher model", "Numbers: 0 1 2", "def add(a", "Hello world, this is"]


@pytest.fixture(scope="module")
def trained() -> Path:
    return trained_tiny()


@pytest.fixture(scope="module")
def export_dir(trained: Path) -> Path:
    return trained_export()


def hf_greedy(model_dir: Path, prompts: list[str], max_new: int = 32) -> dict[str, list[int]]:
    """Reference tokens from transformers' own generate (not our engine)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = {}
    for p in prompts:
        ids = tok(p)["input_ids"]
        new = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids) :].tolist()
        out[p] = new[:-1] if new[-1:] == [tok.eos_token_id] else new
    return out


@pytest.mark.parametrize("kind", ["f32", "q8_0"])
def test_f32_and_q8_0_give_the_same_greedy_tokens_as_transformers(trained: Path, export_dir: Path, kind: str) -> None:
    want = hf_greedy(trained, PROMPTS)
    tok = AutoTokenizer.from_pretrained(trained)
    engine = load_engine(str(export_dir / f"model-{kind}.gguf"))
    assert engine.backend == "llama.cpp"
    for prompt in PROMPTS:
        ids = engine.tokenize(prompt)
        assert ids == tok(prompt)["input_ids"]
        got = engine.generate_ids(ids, SamplingParams(max_tokens=32))
        assert got.token_ids == want[prompt], prompt
        assert len(got.token_ids) > 3


@pytest.mark.parametrize("kind", ["q4_0", "q4_k_m"])
def test_4_bit_files_load_and_generate(export_dir: Path, kind: str) -> None:
    path = export_dir / f"model-{kind}.gguf"
    types = {t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert ("Q4_0" if kind == "q4_0" else "Q4_K") in types or "Q5_0" in types  # tiny rows fall back
    engine = load_engine(str(path))
    c = engine.chat([{"role": "user", "content": "What is the capital of France?"}], SamplingParams(max_tokens=20))
    assert c.text == CHATS["What is the capital of France?"]
    assert c.finish_reason == "stop"
    assert (export_dir / f"model-{kind}.gguf").stat().st_size < (export_dir / "model-f32.gguf").stat().st_size / 3


def test_metadata_reads_back_with_gguf_reader(trained: Path, export_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(trained)
    for kind in ("f32", "q4_0"):
        reader = gguf.GGUFReader(export_dir / f"model-{kind}.gguf")

        def field(key: str, r: gguf.GGUFReader = reader) -> object:
            f = r.get_field(key)
            assert f is not None, key
            return f.contents()

        assert field("general.architecture") == "llama"
        assert field("tokenizer.ggml.model") == "gpt2"
        assert field("tokenizer.ggml.pre") == "gpt-2"
        assert field("tokenizer.chat_template") == tok.chat_template
        assert field("tokenizer.ggml.bos_token_id") == tok.bos_token_id
        assert field("tokenizer.ggml.eos_token_id") == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
        assert field("tokenizer.ggml.padding_token_id") == tok.pad_token_id
        assert field("tokenizer.ggml.add_bos_token") is True  # the tiny tokenizer prepends <s>
        tokens = field("tokenizer.ggml.tokens")
        assert isinstance(tokens, list) and len(tokens) == len(tok)
        assert tokens[tok.eos_token_id] == "<|im_end|>"
        assert field("llama.block_count") == 4


def test_the_model_stops_at_eos(export_dir: Path) -> None:
    engine = load_engine(str(export_dir / "model-q8_0.gguf"))
    c = engine.chat([{"role": "user", "content": "ping"}], SamplingParams(max_tokens=50))
    assert (c.text, c.finish_reason) == ("pong pong", "stop")
    assert c.completion_tokens < 10  # it stopped, rather than running to max_tokens
    assert engine.token_text(c.token_ids[-1]) != "<|im_end|>"  # EOS ends the turn, it is not text


def test_quant_report_orders_the_files_by_fidelity(export_dir: Path) -> None:
    rows = {r["file"]: r for r in json.loads((export_dir / "quant_report.json").read_text())["rows"]}
    f32, q8, q4 = rows["model-f32.gguf"], rows["model-q8_0.gguf"], rows["model-q4_0.gguf"]
    assert f32["kl_divergence"] == 0 and f32["top1_agreement"] == 1
    assert 0 <= q8["kl_divergence"] < q4["kl_divergence"]
    assert q8["top1_agreement"] >= q4["top1_agreement"] > 0.5
    assert f32["bits_per_weight"] == 32 and 8 < q8["bits_per_weight"] < 9 and q4["bits_per_weight"] < 6.5
    assert all(r["perplexity"] > 1 and r["reference_perplexity"] == f32["perplexity"] for r in rows.values())
    assert rows["model-q4_k_m.gguf"]["type"] == "Q4_K_M"


def test_export_stage_in_a_run_writes_files_report_and_manifest(trained: Path, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "run.yaml",
        {"name": "ex", "run_dir": "run", "export": {"model": str(trained), "quantizations": ["q4_0", "q8_0"]}},
    )
    r = run_cli("run", config)
    assert r.code == 0, r.output
    assert "quantization report" in r.stderr and "model-q4_0.gguf" in r.stderr
    run_dir = tmp_path / "run"
    stage = json.loads((run_dir / "manifest.json").read_text())["stages"]["export"]
    assert stage["status"] == "done"
    assert set(stage["artifacts"]) == {
        "export/model-f16.gguf", "export/model-q4_0.gguf", "export/model-q8_0.gguf", "export/quant_report.json",
        "export/model-f16.Modelfile", "export/model-q4_0.Modelfile", "export/model-q8_0.Modelfile",
        "export/gpt4all.json", "export/README.md",
    }  # fmt: skip
    report = stage["counts"]["quant_report"]
    assert [row["file"] for row in report] == ["model-f16.gguf", "model-q4_0.gguf", "model-q8_0.gguf"]
    assert stage["counts"]["pre_tokenizer"] == "gpt-2"
    f16 = gguf.GGUFReader(run_dir / "export" / "model-f16.gguf")
    assert {t.tensor_type.name for t in f16.tensors} == {"F16", "F32"}  # norms stay f32
    mtime = (run_dir / "export" / "model-q4_0.gguf").stat().st_mtime_ns
    r = run_cli("run", config)
    assert r.code == 0 and "skipped" in r.stdout
    assert (run_dir / "export" / "model-q4_0.gguf").stat().st_mtime_ns == mtime


def test_export_resumes_after_a_lost_file_and_refuses_other_settings(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert run_cli("--quiet", "export", trained, "-o", out, "--quant", "q4_0", "--no-report").code == 0
    base_mtime = (out / "model-f16.gguf").stat().st_mtime_ns
    (out / "model-q4_0.gguf").unlink()  # as if killed before the quantization finished
    r = run_cli("--quiet", "export", trained, "-o", out, "--quant", "q4_0", "--no-report")
    assert r.code == 0, r.output
    assert (out / "model-q4_0.gguf").is_file()
    assert (out / "model-f16.gguf").stat().st_mtime_ns == base_mtime  # kept, not redone
    r = run_cli("--quiet", "export", trained, "-o", out, "--quant", "q8_0", "--no-report")
    assert r.code == 2 and "other settings" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (out / "model-q4_0.gguf").is_file()  # nothing lost
    r = run_cli("--quiet", "export", trained, "-o", out, "--quant", "q8_0", "--no-report", "--force")
    assert r.code == 0 and (out / "model-q8_0.gguf").is_file() and not (out / "model-q4_0.gguf").exists()


def test_export_errors_are_one_line(tmp_path: Path, trained: Path) -> None:
    r = run_cli("export", tmp_path / "missing", "-o", tmp_path / "o")
    assert r.code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("export", trained, "-o", tmp_path / "o2", "--quant", "q3_xx")
    assert r.code == 2 and "quantizations" in r.stderr
    not_llama = tmp_path / "gpt2"
    shutil.copytree(trained, not_llama)
    cfg = json.loads((not_llama / "config.json").read_text())
    (not_llama / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    r = run_cli("export", not_llama, "-o", tmp_path / "o3")
    assert r.code == 2 and "model_type 'gpt2' cannot be exported yet" in r.stderr, r.output
    config = write_config(tmp_path / "run.yaml", {"name": "ex", "run_dir": "run", "export": {}})
    r = run_cli("run", config)
    assert r.code == 2 and "export.model is required" in r.stderr


def digit_split_copy(trained: Path, dest: Path) -> Path:
    """The trained model with SmolLM2's pre-tokenizer (digits one by one, then GPT-2 splitting)."""
    shutil.copytree(trained, dest)
    tj = json.loads((dest / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ]}  # fmt: skip
    (dest / "tokenizer.json").write_text(json.dumps(tj))
    return dest


def test_compat_writes_refact_for_smollm_and_proves_the_same_split(trained: Path, tmp_path: Path) -> None:
    model = digit_split_copy(trained, tmp_path / "smollm-like")
    out = tmp_path / "out"
    r = run_cli("--quiet", "export", model, "-o", out, "--quant", "q8_0", "--no-report")
    assert r.code == 0, r.output
    assert gguf.GGUFReader(out / "model-f16.gguf").get_field("tokenizer.ggml.pre").contents() == "smollm"
    out2 = tmp_path / "compat"
    r = run_cli("--quiet", "export", model, "-o", out2, "--quant", "q8_0", "--no-report", "--compat")
    assert r.code == 0, r.output
    for kind in ("f16", "q8_0"):
        assert gguf.GGUFReader(out2 / f"model-{kind}.gguf").get_field("tokenizer.ggml.pre").contents() == "refact"
    # Token for token, on multilingual text, code and digit runs: both names, and the HF tokenizer.
    hf = AutoTokenizer.from_pretrained(model)(PROBE_TEXT)["input_ids"]
    smollm = llama_tokenize(out / "model-f16.gguf", PROBE_TEXT)
    refact = llama_tokenize(out2 / "model-f16.gguf", PROBE_TEXT)
    assert smollm == refact == hf
    assert len(hf) > 200
    gpt2_split = llama_tokenize(trained_export() / "model-f32.gguf", PROBE_TEXT)
    assert gpt2_split != refact  # the probe text does tell split rules apart
    assert check_compat(model, "smollm", "refact", tmp_path) == len(hf)


def test_wrong_pre_tokenizer_is_caught_before_the_file_lands(trained: Path, tmp_path: Path) -> None:
    model = digit_split_copy(trained, tmp_path / "smollm-like")
    r = run_cli("export", model, "-o", tmp_path / "out", "--pre-tokenizer", "gpt-2", "--no-report")
    assert r.code == 2 and "tokenizes differently" in r.stderr, r.output
    assert not list((tmp_path / "out").glob("model-*.gguf"))


def test_lora_adapter_is_merged_then_exported(trained: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    base = AutoModelForCausalLM.from_pretrained(trained, dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft_model = get_peft_model(base, lora)
    adapter = tmp_path / "train" / "model"
    peft_model.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(trained).save_pretrained(adapter)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(trained)

    out = tmp_path / "out"
    r = run_cli("--quiet", "export", adapter, "-o", out, "--base-type", "f32", "--quant", "f32", "--no-report")
    assert r.code == 0, r.output
    merged = out / "merged"
    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    want = hf_greedy(merged, PROMPTS[:3], max_new=16)
    direct = load_engine(str(adapter))  # transformers + PEFT, unmerged
    gguf_engine = load_engine(str(out / "model-f32.gguf"))
    for prompt in PROMPTS[:3]:
        ids = gguf_engine.tokenize(prompt)
        assert gguf_engine.generate_ids(ids, SamplingParams(max_tokens=16)).token_ids == want[prompt]
        assert direct.generate_ids(ids, SamplingParams(max_tokens=16)).token_ids == want[prompt]
    from safetensors.torch import load_file

    key = "model.layers.0.self_attn.q_proj.weight"
    delta = load_file(merged / "model.safetensors")[key] - load_file(trained / "model.safetensors")[key]
    assert delta.abs().max() > 1e-3  # the adapter is in the merged weights


def sentencepiece_llama(dest: Path) -> Path:
    """A random-weight LLaMA with a LLaMA-1/2-style tokenizer: SentencePiece BPE with byte
    fallback, trained here on the demo prompts, loaded through transformers' own conversion."""
    import sentencepiece as spm
    from transformers import LlamaConfig, LlamaForCausalLM

    demo = Path(__file__).resolve().parents[1] / "examples" / "data" / "demo"
    corpus = dest / "corpus.txt"
    dest.mkdir(parents=True)
    corpus.write_text((demo / "chip2.jsonl").read_text() + (demo / "stackoverflow.csv").read_text())
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(dest / "sp"), vocab_size=800, model_type="bpe", byte_fallback=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, split_digits=True, num_threads=1,
        minloglevel=2, normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,  # LLaMA's trainer settings: whitespace kept as written
    )  # fmt: skip
    src = dest / "spm"
    src.mkdir()
    (dest / "sp.model").rename(src / "tokenizer.model")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
    }))  # fmt: skip
    tok = AutoTokenizer.from_pretrained(src)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    model_dir = dest / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    shutil.copy(src / "tokenizer.model", model_dir / "tokenizer.model")  # as LLaMA checkpoints ship it
    return model_dir


def sentencepiece_llama_with_bos(dest: Path) -> Path:
    """sentencepiece_llama, with BOS added in front of every text as LLaMA-1/2's tokenizer does
    (so `tokenize("\\n")` is `<s> ▁ \\n`)."""
    model_dir = sentencepiece_llama(dest)
    AutoTokenizer.from_pretrained(model_dir, add_bos_token=True).save_pretrained(model_dir)
    return model_dir


@pytest.mark.parametrize("keep_model_file", [True, False])
def test_sentencepiece_llama_tokenizer_exports_and_matches(tmp_path: Path, keep_model_file: bool) -> None:
    """LLaMA-7B's tokenizer family (the paper's base model): llama.cpp's SentencePiece tokenizer
    must split multilingual text, code and digits exactly as transformers does, with the piece
    scores from tokenizer.model or, without it, from the vocabulary order; and greedy generation
    must agree token for token."""
    model_dir = sentencepiece_llama(tmp_path / "sp")
    if not keep_model_file:
        (model_dir / "tokenizer.model").unlink()
    r = run_cli("export", model_dir, "-o", tmp_path / "out", "--base-type", "f32", "--quant", "q8_0", "--no-report")
    assert r.code == 0, r.output
    gguf_file = tmp_path / "out" / "model-f32.gguf"
    reader = gguf.GGUFReader(gguf_file)
    assert reader.get_field("tokenizer.ggml.model").contents() == "llama"
    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = [PROBE_TEXT, "Ünïcödé, 日本語, emoji 🙂 and   three spaces", "x = 1234567 + 89\n\tprint(x)"]
    for text in texts:
        assert llama_tokenize(gguf_file, text) == tok(text)["input_ids"], text
    prompt = "How do I sort a list in Python?"
    want = hf_greedy(model_dir, [prompt], max_new=16)[prompt]
    engine = load_engine(str(gguf_file))
    got = engine.generate_ids(engine.tokenize(prompt), SamplingParams(max_tokens=16))
    assert got.token_ids == want and len(want) > 3
