"""Cards, provenance and the files other runtimes need: model cards that huggingface_hub loads,
the GGUF's general.* keys through quantization, the Ollama Modelfile's TEMPLATE rendering turns as
the Jinja chat template does, the GPT4All entry, and checkpoints a transformers-4 reader gets right."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Any

import gguf
import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import run_cli, write_config, write_jsonl
from distill4all.export.runtimes import TurnLayout, turn_layout
from distill4all.models.chat_templates import layout_jinja
from distill4all.models.compat import V4_TOKENIZER_CLASS, make_v4_readable
from families import CHAT_TEMPLATES, FAMILY_MODELS
from runtime_models import trained_export, trained_tiny

# --- a Go-template renderer of the subset Ollama's legacy templates use -------------------------

_ACTION = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}", re.S)


def go_render(template: str, values: dict[str, str]) -> str:
    """Go's text/template for text, `{{ .Field }}`, `{{ "literal" }}` and `{{ if .F }}…{{ else }}…{{ end }}`."""
    out: list[str] = []
    stack: list[bool] = []  # whether each open if-branch is being written
    pos = 0
    for m in _ACTION.finditer(template):
        if all(stack):
            out.append(template[pos : m.start()])
        pos = m.end()
        action = m.group(1)
        if action.startswith("if "):
            stack.append(all(stack) and bool(values.get(action[3:].strip().removeprefix("."), "")))
        elif action == "else":
            stack[-1] = not stack[-1] and all(stack[:-1])
        elif action == "end":
            stack.pop()
        elif all(stack):
            out.append(json.loads(action) if action.startswith('"') else values[action.removeprefix(".")])
    assert not stack, "unclosed if"
    out.append(template[pos:])
    return "".join(out)


def ollama_prompt(template: str, system: str | None, turns: list[tuple[str, str]], prompt: str) -> str:
    """What Ollama sends for a conversation under a legacy template: each past turn rendered whole
    (.System only on the first), then the last prompt's render cut at {{ .Response }}."""
    text = ""
    sys = system or ""
    for user, answer in turns:
        text += go_render(template, {"System": sys, "Prompt": user, "Response": answer})
        sys = ""
    head = template[: template.index("{{ .Response }}")]
    return text + go_render(head, {"System": sys, "Prompt": prompt})


def gpt4all_prompt(entry: dict[str, Any], turns: list[tuple[str, str]], prompt: str) -> str:
    """What GPT4All sends: systemPrompt once, then promptTemplate per turn, the last cut at %2."""
    template = entry["promptTemplate"]
    text = entry["systemPrompt"] + "".join(template.replace("%1", u).replace("%2", a) for u, a in turns)
    return text + template[: template.index("%2")].replace("%1", prompt)


# --- the Modelfile and GPT4All forms of each family's template -----------------------------------

SMOLLM2_CHATML = (  # SmolLM2-Instruct's template: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TEMPLATES = {
    **{name: jinja for name, (jinja, _) in CHAT_TEMPLATES.items()},
    "smollm2": SMOLLM2_CHATML,
    "paper": layout_jinja("paper", add_bos=True),
    "alpaca": layout_jinja("alpaca", add_bos=True),
}
SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|system|>", "<|user|>", "<|assistant|>",
            "<|end|>", "<start_of_turn>", "<end_of_turn>", "[INST]", "[/INST]"]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer(tiny_model: Path) -> Any:
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.add_tokens(SPECIALS, special_tokens=True)
    return tok


def jinja(tok: Any, template: str, messages: list[dict[str, str]]) -> str:
    """The chat template's render with a generation prompt, less the BOS the runtimes add themselves."""
    text = str(tok.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True))
    assert tok("a")["input_ids"][0] == tok.bos_token_id  # the tiny tokenizer adds BOS
    return text.removeprefix(tok.bos_token)


def conversation(system: str | None, turns: list[tuple[str, str]], prompt: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return [*messages, {"role": "user", "content": prompt}]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_modelfile_and_gpt4all_templates_render_turns_as_the_chat_template(tokenizer: Any, name: str) -> None:
    tokenizer.chat_template = TEMPLATES[name]
    layout = turn_layout(tokenizer)
    go = layout.go_template()
    turns = [("Name a colour.", "Blue, like the sea."), ("And a fruit?", "An apple.")]
    systems = [None, "You answer briefly."] if layout.takes_system else [None]
    for system in systems:
        effective = system if system is not None else layout.default_system
        for past in (turns[:0], turns[:1], turns):
            want = jinja(tokenizer, TEMPLATES[name], conversation(system, past, "Write a haiku."))
            assert ollama_prompt(go, effective, past, "Write a haiku.") == want, (name, system, past)
            entry = {"promptTemplate": layout.gpt4all(system)[1], "systemPrompt": layout.gpt4all(system)[0]}
            if layout.folded is None or system is None:
                assert gpt4all_prompt(entry, past, "Write a haiku.") == want, (name, system, past)
    ends = {"chatml": "<|im_end|>", "smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma": "<end_of_turn>",
            "phi3": "<|end|>", "mistral": "<|im_end|>", "paper": "<|im_end|>", "alpaca": "<|im_end|>"}  # fmt: skip
    assert layout.stops[0] == ends[name]  # the EOS layouts end in the tiny EOS
    assert layout.default_system == (
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face" if name == "smollm2" else
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        if name == "alpaca" else None
    )  # fmt: skip


def test_a_template_that_refuses_system_messages_refuses_a_system_prompt(tokenizer: Any) -> None:
    from distill4all.errors import ExportError

    tokenizer.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
        + CHAT_TEMPLATES["gemma"][0]
    )
    layout: TurnLayout = turn_layout(tokenizer)
    assert not layout.takes_system
    assert ollama_prompt(layout.go_template(), None, [], "Hi") == jinja(
        tokenizer, tokenizer.chat_template, conversation(None, [], "Hi")
    )
    with pytest.raises(ExportError, match="takes no system message"):
        layout.gpt4all("Be brief.")


# --- the export folder: files, cards, GGUF metadata ----------------------------------------------


def test_export_writes_modelfiles_gpt4all_entries_a_card_and_the_licence() -> None:
    out = trained_export()
    tok = AutoTokenizer.from_pretrained(trained_tiny())
    entries = {e["filename"]: e for e in json.loads((out / "gpt4all.json").read_text())}
    for kind in ("f32", "q8_0", "q4_0", "q4_k_m"):
        path = out / f"model-{kind}.gguf"
        reader = gguf.GGUFReader(path)
        # The test model is a locally trained copy of `tiny` with no card: its licence is not known.
        assert reader.get_field("general.license").contents() == "other"
        assert reader.get_field("general.quantized_by").contents() == "distill4all"
        assert reader.get_field("general.name").contents() == "test-trained-tiny"
        modelfile = (out / f"model-{kind}.Modelfile").read_text()
        assert modelfile.startswith(f"FROM ./model-{kind}.gguf\n")
        template = re.search(r'TEMPLATE """(.*?)"""', modelfile, re.S)
        assert template is not None
        messages = [{"role": "user", "content": "ping"}]
        assert ollama_prompt(template.group(1), None, [], "ping") == jinja(tok, tok.chat_template, messages)
        assert 'PARAMETER stop "<|im_end|>"' in modelfile and "SYSTEM" not in modelfile
        entry = entries[path.name]
        assert entry["md5sum"] == hashlib.md5(path.read_bytes()).hexdigest()
        assert entry["filesize"] == str(path.stat().st_size) and entry["quant"] == kind
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "other" and card.data.library_name == "gguf"
    assert "model-q4_0.gguf" in card.text


def test_system_prompt_setting_reaches_the_modelfile_and_gpt4all_entry(tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = run_cli("--quiet", "export", trained_tiny(), "-o", out, "--quant", "q8_0", "--no-report",
                "--system-prompt", "You are terse.")  # fmt: skip
    assert r.code == 0, r.output
    modelfile = (out / "model-q8_0.Modelfile").read_text()
    assert 'SYSTEM """You are terse."""' in modelfile
    entry = json.loads((out / "gpt4all.json").read_text())[1]
    assert entry["systemPrompt"] == "<|im_start|>system\nYou are terse.<|im_end|>\n"


# --- transformers 4 readers ---------------------------------------------------------------------


def test_a_v4_reader_gets_the_rope_base_and_a_tokenizer_class_and_v5_loads_the_same(tmp_path: Path) -> None:
    model_dir = FAMILY_MODELS["llama3"](tmp_path / "llama3")  # rope_theta 5e5, llama3 scaling
    copy = shutil.copytree(model_dir, tmp_path / "v4")
    make_v4_readable(copy)
    config = json.loads((copy / "config.json").read_text())
    rope = config["rope_parameters"]
    assert config["rope_theta"] == rope["rope_theta"] == 500000.0  # a v4 reader would take 10000 without it
    assert config["rope_scaling"]["rope_type"] == config["rope_scaling"]["type"] == "llama3"
    assert config["rope_scaling"]["factor"] == 8.0 and "rope_theta" not in config["rope_scaling"]
    assert json.loads((copy / "tokenizer_config.json").read_text())["tokenizer_class"] == V4_TOKENIZER_CLASS
    text = "Hello world, 123 tokens."
    a, b = AutoTokenizer.from_pretrained(model_dir), AutoTokenizer.from_pretrained(copy)
    assert a(text)["input_ids"] == b(text)["input_ids"] and a.chat_template == b.chat_template
    ids = torch.tensor([a(text)["input_ids"]])
    with torch.no_grad():
        la = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(ids).logits
        lb = AutoModelForCausalLM.from_pretrained(copy, dtype=torch.float32)(ids).logits
    assert torch.equal(la, lb)


# --- the chain: curate's card → train's card → merged and export cards → GGUF -------------------


@pytest.mark.slow
def test_train_and_export_of_smollm2_carry_its_hub_id_licence_and_teachers(tmp_path: Path) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": f"What is {a} plus {b}?", "response": f"{a} plus {b} is {a + b}.", "source": "sums"}
        for a in range(6) for b in range(4)
    ])  # fmt: skip
    config = write_config(tmp_path / "run.yaml", {
        "name": "chain", "run_dir": "run",
        "curate": {"input": str(pairs), "map": {"enabled": False}, "embed": {"model": "minilm-static"}},
        "train": {"base_model": "smollm2-135m-instruct", "template": "chat", "max_steps": 1, "max_length": 48,
                  "global_batch_size": 4, "micro_batch_size": 4, "warmup_steps": 0, "precision": "fp32"},
        "export": {"quantizations": ["q8_0"], "report": False},
    })  # fmt: skip
    r = run_cli("run", config)
    assert r.code == 0, r.output
    run = tmp_path / "run"
    hub = "HuggingFaceTB/SmolLM2-135M-Instruct"
    trained = ModelCard.load(run / "train" / "model" / "README.md")
    assert trained.data.base_model == hub and trained.data.license == "apache-2.0"
    assert trained.data.library_name == "peft" and "/" not in str(trained.data.base_model).removeprefix(hub)
    assert trained.data.to_dict()["distill4all"]["teachers"] == ["import"]
    for card_file in (run / "export" / "merged" / "README.md", run / "export" / "README.md"):
        card = ModelCard.load(card_file)
        assert card.data.base_model == hub and card.data.license == "apache-2.0", card_file
    for kind in ("f16", "q8_0"):
        reader = gguf.GGUFReader(run / "export" / f"model-{kind}.gguf")
        assert reader.get_field("general.license").contents() == "apache-2.0"
        assert reader.get_field("general.base_model.count").contents() == 1
        assert reader.get_field("general.base_model.0.repo_url").contents() == f"https://huggingface.co/{hub}"
        assert reader.get_field("general.base_model.0.organization").contents() == "HuggingFaceTB"
    merged = run / "export" / "merged"
    config_json = json.loads((merged / "config.json").read_text())
    assert config_json["rope_theta"] == 100000.0  # SmolLM2's base: a v4 reader's default would be 10000
    assert json.loads((merged / "tokenizer_config.json").read_text())["tokenizer_class"] == V4_TOKENIZER_CLASS
    modelfile = (run / "export" / "model-q8_0.Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
