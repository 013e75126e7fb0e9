"""Depth pruning by block influence: the right layers go, and what is left is a sound checkpoint
(same logits as removing the layers by hand, a KV cache that still works, GGUF export and chat)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from conftest import cli_command, run_cli, write_jsonl
from distill4all.errors import DataError
from distill4all.models.prune import (
    CALIBRATION_TEXTS,
    block_influence,
    calibration_texts,
    prune_depth,
    remove_layers,
    token_batches,
)

IDENTITY = (2, 3)  # layers of the test model that pass the residual stream through unchanged


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A random 6-layer LLaMA with the tiny model's tokenizer, whose layers 2 and 3 add nothing to
    the residual (their attention and MLP outputs are zeroed): BI exactly 0."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for i in IDENTITY:
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    out = tmp_path_factory.mktemp("six") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def logits(model: Path | torch.nn.Module, tokenizer: Path) -> torch.Tensor:
    """A fixed sentence's logits, computed without a cache."""
    net = AutoModelForCausalLM.from_pretrained(model) if isinstance(model, Path) else model
    ids = AutoTokenizer.from_pretrained(tokenizer)("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    with torch.no_grad():
        return net.eval()(**ids, use_cache=False).logits


def test_the_cli_drops_the_layers_with_the_lowest_influence(tmp_path: Path, six_layers: Path) -> None:
    out = tmp_path / "pruned"
    r = run_cli("prune", six_layers, "--out", out, "--drop-layers", "2")
    assert r.code == 0, r.stderr
    assert "kept layers [0, 1, 4, 5] of 6" in r.stdout
    assert re.search(r"dropped layers 2 \(BI -?0\.0000\), 3 \(BI -?0\.0000\)", r.stdout), r.stdout
    report = json.loads((out / "prune.json").read_text())
    assert report["dropped"] == list(IDENTITY) and report["kept"] == [0, 1, 4, 5]
    assert (report["layers_before"], report["layers_after"]) == (6, 4)
    bi = report["block_influence"]
    assert len(bi) == 6 and all(abs(bi[i]) < 1e-6 for i in IDENTITY)
    assert all(bi[i] > 1e-3 for i in (0, 1, 4, 5))
    assert report["params_after"] < report["params_before"]
    assert report["texts"] == len(CALIBRATION_TEXTS) and report["tokens"] > 100
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 4
    # The dropped layers did nothing, so the smaller model computes exactly what the larger one did.
    torch.testing.assert_close(logits(out, six_layers), logits(six_layers, six_layers), atol=1e-5, rtol=1e-5)
    assert not list(tmp_path.glob("*.tmp-*"))


def test_pruned_checkpoint_equals_removing_layers_by_hand_and_caches_right(tmp_path: Path, six_layers: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Question {i}?", "response": f"Answer {i}."} for i in range(20)])  # fmt: skip
    texts = calibration_texts(pairs, samples=5)
    result = prune_depth(str(six_layers), tmp_path / "pruned", keep_fraction=0.5, texts=texts, max_tokens=32)
    assert result.layers_after == 3 and set(IDENTITY) <= set(result.dropped)  # 6 × 0.5 = 3 kept
    assert result.texts == 5 and result.kept[0] == 0 and result.kept[-1] == 5

    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned")
    assert pruned.config.num_hidden_layers == 3 and len(pruned.model.layers) == 3
    by_hand = AutoModelForCausalLM.from_pretrained(six_layers)
    by_hand.model.layers = torch.nn.ModuleList([by_hand.model.layers[i] for i in result.kept])
    by_hand.config.num_hidden_layers = 3
    torch.testing.assert_close(logits(pruned, six_layers), logits(by_hand, six_layers), atol=1e-5, rtol=1e-5)

    # The saved checkpoint generates the same with and without its KV cache.
    prompt = AutoTokenizer.from_pretrained(tmp_path / "pruned")("Write a short poem", return_tensors="pt")
    cached, uncached = (
        pruned.generate(**prompt, max_new_tokens=8, min_new_tokens=8, do_sample=False, use_cache=c)
        for c in (True, False)
    )
    assert torch.equal(cached, uncached)
    tok = AutoTokenizer.from_pretrained(tmp_path / "pruned")
    assert tok.chat_template == AutoTokenizer.from_pretrained(six_layers).chat_template


def test_block_influence_is_measured_before_the_final_norm(six_layers: Path) -> None:
    """The last layer's output is taken raw: transformers' last hidden state has the final norm
    applied, whose per-channel weights would change the last layer's cosine."""
    model = AutoModelForCausalLM.from_pretrained(six_layers)
    batches = token_batches(AutoTokenizer.from_pretrained(six_layers), CALIBRATION_TEXTS[:4], max_tokens=32)
    before = block_influence(model, batches)
    with torch.no_grad():
        model.model.norm.weight.uniform_(0.1, 3.0)
    assert block_influence(model, batches) == pytest.approx(before, abs=1e-9)


def test_layers_removed_in_memory_keep_their_own_cache_slot_and_attention_kind(tmp_path: Path) -> None:
    """For a model pruned and then trained without a reload: each remaining layer is renumbered (a
    stale index would share or miss a KV cache slot), and per-layer config lists are sliced, so
    that sliding-window and full-attention layers keep their kind once saved and reloaded."""
    kinds = ["full_attention", "sliding_attention", "sliding_attention", "full_attention", "full_attention",
             "sliding_attention"]  # fmt: skip
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=6, num_attention_heads=4,
                         num_key_value_heads=2, use_sliding_window=True, sliding_window=4, layer_types=kinds)  # fmt: skip
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).eval()
    remove_layers(model, [1, 2])
    ids = torch.arange(3, 15).unsqueeze(0)  # longer than the window, so the layer kind matters
    cached, uncached = (
        model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=c, pad_token_id=0)
        for c in (True, False)
    )
    assert torch.equal(cached, uncached)
    assert model.config.layer_types == [kinds[i] for i in (0, 3, 4, 5)]
    model.save_pretrained(tmp_path / "q")
    reloaded = Qwen2ForCausalLM.from_pretrained(tmp_path / "q").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)


def test_pruned_model_exports_to_gguf_and_chats(tmp_path: Path, six_layers: Path) -> None:
    pruned, gguf_dir = tmp_path / "pruned", tmp_path / "gguf"
    assert run_cli("--quiet", "prune", six_layers, "--out", pruned, "--keep-fraction", "0.7").code == 0  # 4 kept
    r = run_cli("--quiet", "export", pruned, "--out", gguf_dir, "--quant", "q8_0", "--no-report")
    assert r.code == 0, r.stderr
    gguf = gguf_dir / "model-q8_0.gguf"
    assert gguf.is_file()
    from gguf import GGUFReader

    assert GGUFReader(gguf).get_field("llama.block_count").contents() == 4
    chat = subprocess.run(cli_command("chat", gguf, "--max-tokens", "4", "--temperature", "0"), input="hi\n",
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert chat.returncode == 0 and "tokens/s" in chat.stderr, chat.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop-layers", "2", "--keep-fraction", "0.5"], "exactly one of"),
        ([], "exactly one of"),
        (["--drop-layers", "5"], "cannot drop 5 of 6 layers"),
        (["--keep-fraction", "0.95"], "nothing to drop"),
        (["--keep-fraction", "1.5"], "between 0 and 1"),
        (["--drop-layers", "1", "--data", "missing.jsonl"], "pairs file not found"),
    ],
)
def test_cli_refuses_bad_requests_in_one_line(tmp_path: Path, six_layers: Path, args: list[str], message: str) -> None:
    r = run_cli("prune", six_layers, "--out", tmp_path / "pruned", *args, cwd=tmp_path)
    assert r.code == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert message in r.stderr
    assert not (tmp_path / "pruned").exists() and not list(tmp_path.glob("*.tmp-*"))


def test_cli_refuses_an_existing_out_folder(tmp_path: Path, six_layers: Path) -> None:
    out = tmp_path / "pruned"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = run_cli("prune", six_layers, "--out", out, "--drop-layers", "1")
    assert r.code == 2 and "not empty" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_calibration_texts_are_a_seeded_sample_of_the_pairs(tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(50)]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", rows)
    texts = calibration_texts(pairs, samples=8, seed=1)
    assert len(texts) == len(set(texts)) == 8 and all(t.startswith("p") and "\nr" in t for t in texts)
    assert texts == calibration_texts(pairs, samples=8, seed=1) != calibration_texts(pairs, samples=8, seed=2)
    assert len(calibration_texts(pairs, samples=500)) == 50
    assert calibration_texts(None, samples=3) == list(CALIBRATION_TEXTS[:3])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: "):
        calibration_texts(write_jsonl(tmp_path / "bad.jsonl", [rows[0], {"text": "x"}]), samples=4)
