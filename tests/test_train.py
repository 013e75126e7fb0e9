"""The train stage through the real CLI on the tiny model: it learns, resumes exactly after SIGKILL,
runs data-parallel under accelerate, saves adapters and full weights that reload, and refuses
bad input with one line."""

from __future__ import annotations

import json
import math
import os
import pickle
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import cli_command, run_cli, write_config, write_jsonl

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "elk", "yak", "ant"]
COLORS = ["red", "blue", "green", "gold", "pink", "gray", "teal", "plum"]
# One thread per process: the tests run beside other work on few cores, where OpenMP threads
# waiting on each other slow a tiny model down many times over.
ENV = {"OMP_NUM_THREADS": "1"}


def question(animal: str) -> str:
    return f"Which color is the {animal}?"


@pytest.fixture
def pairs(tmp_path: Path) -> Path:
    rows = [
        {"prompt": question(a), "response": f"The {a} is {c}.", "source": "syn"}
        for a, c in zip(ANIMALS, COLORS, strict=True)
    ]
    return write_jsonl(tmp_path / "pairs.jsonl", rows * 8)


def config(tmp_path: Path, data: Path, name: str = "run", **train: Any) -> Path:
    section = {
        "base_model": "tiny", "data": str(data), "val_fraction": 0.1, "global_batch_size": 8,
        "micro_batch_size": 4, "epochs": 2, "learning_rate": 3e-3, "warmup_steps": 5, "eval_every": 5,
        "checkpoint_every": 5, "max_length": 64, "precision": "fp32",
        **train,
    }  # fmt: skip
    return write_config(tmp_path / f"{name}.yaml", {"name": name, "run_dir": name, "seed": 3, "train": section})


def losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def val_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]


def adapter(run_dir: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "train" / "model" / "adapter_model.safetensors"))


def greedy(model: Any, tok: Any, prompt: str) -> tuple[str, bool]:
    """The answer and whether the model ended it with EOS, prompted through the saved template."""
    text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False, return_tensors="pt").input_ids
    out = model.generate(
        ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    new = out[0, ids.shape[1] :].tolist()
    return tok.decode(new, skip_special_tokens=True), tok.eos_token_id in new


@pytest.mark.slow
def test_learns_a_small_task_and_saves_a_reloadable_adapter(tmp_path: Path, pairs: Path, tiny_model: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(tmp_path, pairs, epochs=12, eval_every=20, checkpoint_every=20,
                 lora={"r": 16, "alpha": 32, "dropout": 0.0,
                       "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]})  # fmt: skip
    r = run_cli("train", cfg, env=ENV)
    assert r.code == 0, r.output
    run_dir = tmp_path / "run"
    model_dir = run_dir / "train" / "model"
    curve = losses(run_dir)
    assert len(curve) == 12 * (57 // 8)  # 57 train examples after the 10% split: 7 steps an epoch
    assert sum(curve[-5:]) / 5 < sum(curve[:5]) / 5 - 1.5
    vals = val_losses(run_dir)
    assert vals[0][0] == 0 and vals[-1][1] < vals[0][1] - 1.0
    assert (run_dir / "train" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "train" / "checkpoints").exists()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "train/model" in manifest["stages"]["train"]["artifacts"]

    info = json.loads((model_dir / "adapter_config.json").read_text())
    assert info["base_model_name_or_path"] == str(tiny_model) and info["r"] == 16
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    assert tok.chat_template == "{# distill4all: paper layout (prompt, newline and answer tokenized apart) #}" + (
        "{{ bos_token }}"
        "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}{% endfor %}"
    )  # the paper layout, as the model was trained
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model)).eval()
    probe = torch.tensor([tok(question("cat"))["input_ids"]])
    before = base(probe).logits
    tuned = PeftModel.from_pretrained(base, str(model_dir)).eval()
    assert not torch.allclose(tuned(probe).logits, before, atol=1e-3)
    for animal, color in zip(ANIMALS, COLORS, strict=True):
        answer, stopped = greedy(tuned, tok, question(animal))
        assert (answer, stopped) == (f"The {animal} is {color}.", True)


class _Planted:
    """Unpickling it touches a file."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def kill_past_checkpoint(config: Path, run_dir: Path, step: int) -> None:
    """Run `config` and SIGKILL it a little after its checkpoint at `step`, before it finishes."""
    proc = subprocess.Popen(cli_command("-q", "run", config), env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    ckpt = run_dir / "train" / "checkpoints" / f"step-{step:08d}"
    deadline = time.monotonic() + 300
    while not ckpt.is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # a little past the checkpoint: these steps are lost and redone
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "train" / "model").exists(), "the run finished before it could be killed"


@pytest.mark.slow
def test_resume_after_sigkill_continues_the_same_loss_curve(tmp_path: Path, pairs: Path) -> None:
    whole = config(tmp_path, pairs, name="whole", epochs=5)
    killed = config(tmp_path, pairs, name="killed", epochs=5)  # LoRA dropout 0.1: the RNG state matters
    assert run_cli("run", whole, env=ENV).code == 0

    kill_past_checkpoint(killed, tmp_path / "killed", step=10)
    # A checkpoint is a file in the run directory, not code: a pickle planted where accelerate keeps
    # custom objects' state must not run when training resumes.
    ran = tmp_path / "planted-pickle-ran"
    for ckpt in (tmp_path / "killed" / "train" / "checkpoints").glob("step-*"):
        (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(_Planted(str(ran))))

    r = run_cli("run", killed, env=ENV)
    assert r.code == 0, r.output
    assert "resuming at step" in r.stderr
    assert not ran.exists()
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    assert val_losses(tmp_path / "killed") == val_losses(tmp_path / "whole")
    a, b = adapter(tmp_path / "whole"), adapter(tmp_path / "killed")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_two_process_ddp_matches_one_process(tmp_path: Path, pairs: Path) -> None:
    import torch

    one = config(tmp_path, pairs, name="one", lora={"dropout": 0.0})
    two = config(tmp_path, pairs, name="two", lora={"dropout": 0.0}, num_processes=2, micro_batch_size=2)
    assert run_cli("run", one, env=ENV).code == 0
    r = run_cli("train", two, env=ENV)  # gloo on the CPU, through accelerate launch
    assert r.code == 0, r.output
    assert "accelerate.commands.launch" in r.stderr and "--num_processes 2" in r.stderr
    summary = json.loads((tmp_path / "two" / "train" / "summary.json").read_text())
    assert summary["processes"] == 2
    assert losses(tmp_path / "two") == pytest.approx(losses(tmp_path / "one"), rel=1e-5)
    a, b = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.slow
def test_full_fine_tune_bf16_checkpointed_with_an_added_pad_token(
    tmp_path: Path, pairs: Path, tiny_model: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = config(tmp_path, pairs, method="full", max_steps=3, precision="bf16", pad_token="<pad2>", packing=False,
                 pad_to_max_length=True, template="chat", gradient_checkpointing=True, schedule="cosine")  # fmt: skip
    r = run_cli("run", cfg, env=ENV)
    assert r.code == 0, r.output
    model_dir = tmp_path / "run" / "train" / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tuned = AutoModelForCausalLM.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert tok.pad_token == "<pad2>" and len(tok) == base.config.vocab_size + 1
    assert tuned.get_input_embeddings().weight.shape[0] == len(tok)  # resized for the new token
    assert json.loads((model_dir / "training.json").read_text())["template"] == "chat"
    assert not torch.allclose(tuned.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert all(math.isfinite(x) for x in losses(tmp_path / "run"))


def test_standalone_cli_with_the_paper_preset(tmp_path: Path, pairs: Path) -> None:
    out = tmp_path / "out"
    args = (
        "train",
        "--base-model",
        "tiny",
        "--data",
        pairs,
        "--out",
        out,
        "--preset",
        "paper-lora",
        "--max-steps",
        "1",
    )
    r = run_cli(*args, env=ENV)
    assert r.code == 0, r.output
    assert "train: ran, steps 1" in r.stdout and f"model: {out / 'train' / 'model'}" in r.stdout
    saved = (out / "train.yaml").read_text()
    assert "preset: paper-lora" in saved and "max_steps: 1" in saved
    summary = json.loads((out / "train" / "summary.json").read_text())
    assert summary["train_examples"] == 60 and summary["tokens"] > 0  # one global batch of 32 from 60
    assert json.loads((out / "train" / "model" / "adapter_config.json").read_text())["lora_alpha"] == 32
    r = run_cli(*args, env=ENV)
    assert r.code == 0 and "train: skipped" in r.stdout


def sharegpt_file(path: Path) -> Path:
    """Multi-turn ShareGPT rows, with a system turn and the role names ShareGPT dumps use."""
    rows = [
        {"id": f"c{i}", "conversations": [
            {"from": "system", "value": "Answer in one sentence."},
            {"from": "human", "value": question(a)}, {"from": "gpt", "value": f"The {a} is {c}."},
            {"from": "user", "value": "And twice?"}, {"from": "chatgpt", "value": f"{c} and {c}."}]}
        for i, (a, c) in enumerate(zip(ANIMALS, COLORS, strict=True))
    ]  # fmt: skip
    return write_jsonl(path, rows)


def alpaca_array_file(path: Path) -> Path:
    """The original alpaca_data.json layout: one indented JSON array."""
    pairs = zip(ANIMALS, COLORS, strict=True)
    rows = [{"instruction": question(a), "input": "", "output": f"The {a} is {c}."} for a, c in pairs]
    path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("make", "name", "template", "answer"),
    [(sharegpt_file, "sharegpt.jsonl", "chatml", "red and red."), (alpaca_array_file, "alpaca_data.json", "paper",
      "The cat is red.")],
)  # fmt: skip
def test_sharegpt_and_json_array_files_train_through_the_cli(
    tmp_path: Path, tiny_model: Path, make: Any, name: str, template: str, answer: str
) -> None:
    import numpy as np
    from transformers import AutoTokenizer

    data = make(tmp_path / name)
    cfg = config(tmp_path, data, val_fraction=0.0, global_batch_size=4, max_steps=2, template=template, max_length=256)
    r = run_cli("train", cfg, env=ENV)
    assert r.code == 0, r.output
    summary = json.loads((tmp_path / "run" / "train" / "summary.json").read_text())
    assert summary["train_examples"] == 8 and summary["steps"] == 2
    # what was trained on is the file's answers (every assistant turn of a conversation)
    split = tmp_path / "run" / "train" / "data" / "train"
    targets = np.load(split / "targets.npy")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "run" / "train" / "model"))
    assert answer in tok.decode(targets[targets >= 0].tolist())


@pytest.mark.parametrize(
    ("rows", "train", "message"),
    [
        (None, {}, "train: file not found:"),
        ([{"prompt": "a", "response": "b"}] * 5, {}, "5 training examples, fewer than one global batch (8)"),
        ([{"prompt": "a", "answer": "b"}], {}, "pairs.jsonl:1: unknown row format (keys: answer, prompt)"),
        ([{"prompt": "a", "response": "b"}] * 20, {"global_batch_size": 6}, "must be a multiple of micro_batch_size"),
        ([{"prompt": "a", "response": "b"}] * 20, {"lora": {"target_modules": ["nope"]}}, "train.lora: Target modules"),
        ([{"prompt": "a", "response": "b"}] * 20, {"template_file": "never.jinja"}, "would never stop"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, rows: list[dict[str, str]] | None, train: dict[str, Any], message: str
) -> None:
    data = tmp_path / "pairs.jsonl"
    if rows is not None:
        write_jsonl(data, rows)
    (tmp_path / "never.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    r = run_cli("train", config(tmp_path, data, val_fraction=0.0, **train), env=ENV)
    assert r.code == 2, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and message in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.slow
def test_pipeline_trains_on_what_collect_gathered(make_run: Any, tmp_path: Path) -> None:
    """Without train.data or a curate stage, train reads collect/pairs.jsonl; status shows the run."""
    train = {"base_model": "tiny", "global_batch_size": 8, "micro_batch_size": 4, "max_steps": 4,
             "max_length": 64, "val_fraction": 0.2, "eval_every": 2, "precision": "fp32"}  # fmt: skip
    cfg = make_run(n=24, train=train)
    r = run_cli("run", cfg, env=ENV)
    assert r.code == 0, r.output
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    stage = manifest["stages"]["train"]
    assert stage["status"] == "done" and stage["upstream"] == {"collect": manifest["stages"]["collect"]["run_id"]}
    assert stage["counts"]["train_examples"] == 19 and stage["counts"]["steps"] == 4  # 24 pairs, 5 held out
    assert str(tmp_path / "run" / "collect" / "pairs.jsonl") in manifest["inputs"]
    r = run_cli("status", tmp_path / "run")
    assert "train" in r.stdout and "done" in r.stdout
