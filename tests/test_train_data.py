"""Train data: file formats, the validation split, templates (exact label masks), batching, packing."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import write_jsonl
from distill4all.errors import DataError, TemplateError
from distill4all.train.batching import TokenizedSplit, collate, deal, pack, step_examples
from distill4all.train.data import Example, read_examples, split_indices
from distill4all.train.templates import IGNORE, load_template

PROMPT = "What is the capital of France?"
RESPONSE = "Paris is the capital of France."


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Any:
    from distill4all.train.model import load_tokenizer

    return load_tokenizer(tiny_model)


def pair(prompt: str = PROMPT, response: str = RESPONSE, row: int = 0) -> Example:
    return Example(({"role": "user", "content": prompt}, {"role": "assistant", "content": response}), "s", row)


def trained(labels: list[int]) -> list[int]:
    return [i for i, t in enumerate(labels) if t != IGNORE]


def plain(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


# --- reading ------------------------------------------------------------------------------------


def test_reads_gpt4all_alpaca_messages_and_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    g = write_jsonl(
        tmp_path / "g.jsonl", [{"prompt": "p1", "response": "r1", "source": "oig"}, {"prompt": "p2", "response": " "}]
    )
    a = write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "Sum", "input": "1 2", "output": "3"}, {"instruction": "Hi", "output": "Hello"}],
    )
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]  # fmt: skip
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    pq.write_table(pa.Table.from_pylist([{"prompt": "pq", "response": "rq"}]), tmp_path / "p.parquet")

    ex, stats = read_examples(g)
    assert [e.messages[0]["content"] for e in ex] == ["p1"] and ex[0].source == "oig"
    assert stats.rows == 2 and stats.empty == 1  # a blank answer is left out, and counted
    ex, _ = read_examples(a)
    assert [e.messages[0]["content"] for e in ex] == ["Sum\n\n1 2", "Hi"]
    assert [e.messages[1]["content"] for e in ex] == ["3", "Hello"]
    ex, _ = read_examples(m)
    assert ex[0].messages == tuple(conv) and not ex[0].single_turn
    ex, _ = read_examples(tmp_path / "p.parquet")
    assert ex[0].messages[1]["content"] == "rq" and ex[0].single_turn


def test_reads_sharegpt_with_every_role_name_and_messages_written_from_value(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    conv = [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"},
            {"from": "user", "value": "c"}, {"from": "chatgpt", "value": "d"}]  # fmt: skip
    others = [
        [{"from": "human", "value": "q"}, {"from": name, "value": "r"}] for name in ("bing", "model", "assistant")
    ]
    s = write_jsonl(tmp_path / "s.jsonl", [{"id": "x1", "conversations": c} for c in [conv, *others]])
    ex, stats = read_examples(s)
    expected = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                {"role": "assistant", "content": "d"})  # fmt: skip
    assert ex[0].messages == expected and stats.rows == 4
    assert all(e.messages == ({"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}) for e in ex[1:])
    # OpenAI messages whose turns are written the ShareGPT way, and a ShareGPT Parquet file
    m = write_jsonl(tmp_path / "m.jsonl", [{"messages": conv}])
    assert read_examples(m)[0][0].messages == expected
    pq.write_table(pa.Table.from_pylist([{"conversations": conv}]), tmp_path / "s.parquet")
    assert read_examples(tmp_path / "s.parquet")[0][0].messages == expected
    assert read_examples(s, "sharegpt")[0][0].messages == expected  # named in train.data_format


def test_reads_a_json_array_file_as_the_original_alpaca_data_json(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Sum", "input": "1 2", "output": "3"},
        {"instruction": "Hi", "input": "", "output": "Hello"},
    ]
    a = tmp_path / "alpaca_data.json"
    a.write_text(json.dumps(rows, indent=4))  # the layout alpaca_data.json ships in
    ex, stats = read_examples(a)
    assert [e.messages[0]["content"] for e in ex] == ["Sum\n\n1 2", "Hi"] and stats.rows == 2
    assert [e.row for e in ex] == [0, 1]
    conv = [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]
    for kind in ([{"conversations": conv}], [{"prompt": "p", "response": "r"}], [{"messages": conv}]):
        one_line = tmp_path / "one.json"
        one_line.write_text("  \n" + json.dumps(kind))
        assert read_examples(one_line)[0][0].messages[-1]["content"] in ("b", "r")
    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    with pytest.raises(DataError, match="no usable examples"):
        read_examples(empty)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[\n  {"prompt": "a", "response": "b"},\n  {"prompt": "a", "response": 3}\n]', "a.json:3 (element 1): field 'response' must be a string"),
        ('[\n  {"prompt": "a", "response": "b"},\n\n  {"question": "a"}]', "a.json:4 (element 1): field 'prompt' must be"),
        ('[{"prompt": "a", "response": "b"},\n"text"]', "a.json:2 (element 1): each row must be a JSON object"),
        ('[{"prompt": "a", "response": "b"}\n {"prompt": "c"}]', "a.json:2: not valid JSON (expected ',' or ']' after element 0)"),
        ('[{"prompt": "a", "response": "b"},\n]', "a.json:2: not valid JSON (Expecting value)"),
        ('[{"prompt": "a", "response": "b"}', "a.json:1: not valid JSON (expected ',' or ']' after element 0)"),
        ('[{"prompt": "a",\n "response": "b"', "a.json:2: not valid JSON (Expecting ',' delimiter)"),
        ('[{"prompt": "a",\n "response": }]', "a.json:2: not valid JSON (Expecting value)"),
        ('[{"prompt": "a", "response": "b"}]\n[]', "a.json:2: not valid JSON (more after the array's closing ']')"),
        ('[{"conversations": [{"from": "human", "value": "a"}]}]', "a.json:1 (element 0): the last message must be"),
        ('[\n{"conversations": [{"from": "robot", "value": "a"}]}]', "a.json:2 (element 0): conversations[0] needs a role"),
        ('[{"conversations": []}]', "a.json:1 (element 0): 'conversations' must be a non-empty list"),
    ],
)  # fmt: skip
def test_bad_json_array_elements_name_file_line_and_element(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        read_examples(path)


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"prompt": "a", "response": "b"}', "{not json"], "b.jsonl:2: not valid JSON"),
        (['{"question": "a"}'], "b.jsonl:1: unknown row format (keys: question)"),
        (['{"prompt": "a", "response": 3}'], "b.jsonl:1: field 'response' must be a string"),
        (['{"messages": [{"role": "user", "content": "a"}]}'], "b.jsonl:1: the last message must be the assistant's"),
        (['{"messages": [{"role": "bot", "content": "a"}]}'], "b.jsonl:1: messages[0] needs a role"),
        (['{"conversations": [{"from": "human", "value": 3}]}'], "b.jsonl:1: conversations[0] needs a role"),
        (
            ['{"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "b"}]}'],
            "b.jsonl:1: the last message must be the assistant's",
        ),
    ],
)
def test_bad_rows_name_file_and_line(tmp_path: Path, lines: list[str], message: str) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        read_examples(path)


def test_validation_split_is_five_percent_by_seed() -> None:
    train, val = split_indices(101, 0.05, seed=42)
    assert len(val) == 6 and len(train) == 95  # ceil(5.05), as datasets' train_test_split
    assert sorted([*train, *val]) == list(range(101))
    again_train, again_val = split_indices(101, 0.05, seed=42)
    assert list(val) == list(again_val) and list(train) == list(again_train)
    assert list(split_indices(101, 0.05, seed=1)[1]) != list(val)
    assert len(split_indices(10, 0.0, seed=0)[1]) == 0


# --- the paper template -------------------------------------------------------------------------


def test_paper_template_masks_prompt_bos_and_newline_and_ends_with_eos(tok: Any) -> None:
    enc = load_template("paper", tok, max_length=64).encode([pair()])[0]
    prompt_ids, newline_ids, response_ids = plain(tok, PROMPT), plain(tok, "\n"), plain(tok, RESPONSE)
    assert enc.input_ids == [tok.bos_token_id, *prompt_ids, *newline_ids, *response_ids, tok.eos_token_id]
    first = 1 + len(prompt_ids) + len(newline_ids)  # BOS, the prompt, the newline carry no loss
    assert trained(enc.labels) == list(range(first, len(enc.input_ids)))
    assert enc.labels[first:] == [*response_ids, tok.eos_token_id]  # EOS is a target: the model learns to stop
    assert not enc.truncated


def test_paper_template_eos_only_when_nothing_was_cut(tok: Any) -> None:
    ex = pair(response=" ".join([RESPONSE] * 4))  # long enough that the prompt stays under half
    full = load_template("paper", tok, max_length=256).encode([ex])[0]
    n = len(full.input_ids)
    exact = load_template("paper", tok, max_length=n).encode([ex])[0]
    assert exact.input_ids == full.input_ids and exact.input_ids[-1] == tok.eos_token_id and not exact.truncated
    for cut_by in (1, 4):
        cut = load_template("paper", tok, max_length=n - cut_by).encode([ex])[0]
        assert cut.input_ids == full.input_ids[: n - cut_by] and cut.truncated
        assert tok.eos_token_id not in cut.input_ids  # a truncated answer never teaches the model to stop
        assert trained(cut.labels) == trained(full.labels)[:-cut_by]  # the same prompt mask, fewer targets


def test_paper_template_cuts_a_long_prompt_to_half_the_tokens_as_the_original(tok: Any) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    max_length = 64
    enc = load_template("paper", tok, max_length=max_length).encode([pair(long_prompt)])[0]
    head = list(tok(long_prompt, truncation=True, max_length=max_length // 2)["input_ids"])  # BOS + 31 tokens
    first = len(head) + len(plain(tok, "\n"))
    assert len(head) == max_length // 2 and enc.input_ids[:first] == [*head, *plain(tok, "\n")]
    assert trained(enc.labels) == list(range(first, len(enc.input_ids)))
    assert enc.input_ids[first:] == [*plain(tok, RESPONSE), tok.eos_token_id]


def test_paper_april_template_cuts_a_long_prompt_by_characters(tok: Any) -> None:
    long_prompt = " ".join(f"word{i}" for i in range(200))
    max_length = 64
    enc = load_template("paper-april", tok, max_length=max_length).encode([pair(long_prompt)])[0]
    cut = long_prompt[: min(max_length // 2, len(long_prompt) // 2)]  # 32 characters
    cut_ids = plain(tok, cut)
    assert len(cut_ids) + 1 < max_length // 2
    first = 1 + len(cut_ids) + 1
    assert enc.input_ids[:first] == [tok.bos_token_id, *cut_ids, *plain(tok, "\n")]
    assert trained(enc.labels) == list(range(first, len(enc.input_ids)))
    assert enc.input_ids[first:] == [*plain(tok, RESPONSE), tok.eos_token_id]


def march_data_py(tok: Any, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """nomic-ai/gpt4all's data.py at 252676ff (March 2023), re-written from its description with no
    code shared with distill4all: the prompt truncated to max_length // 2 tokens (BOS included),
    then tokenize("\\n") less its first id (LLaMA's BOS), then the response truncated to the room
    left plus one and less its first id (BOS again), then EOS only if the sequence is still short;
    labels mask everything before the response."""
    prompt_ids = tok(prompt, truncation=True, max_length=max_length // 2)["input_ids"]
    newline_ids = tok("\n")["input_ids"][1:]
    remaining = max_length - len(prompt_ids) - len(newline_ids) + 1
    target_ids = tok(response, truncation=True, max_length=remaining)["input_ids"][1:]
    ids = [*prompt_ids, *newline_ids, *target_ids]
    if len(ids) < max_length:
        ids.append(tok.eos_token_id)
    start = len(prompt_ids) + len(newline_ids)
    return ids, [IGNORE] * start + ids[start:]


def test_paper_template_is_token_identical_to_the_march_code_on_a_llama_tokenizer(tmp_path: Path) -> None:
    """On a LLaMA-style SentencePiece tokenizer (BPE, byte fallback, BOS added: the paper's), where
    tokenizing the parts apart differs from tokenizing the joined text."""
    from transformers import AutoTokenizer

    from test_export import sentencepiece_llama_with_bos

    tok = AutoTokenizer.from_pretrained(sentencepiece_llama_with_bos(tmp_path / "sp"))
    newline = tok("\n")["input_ids"][1:]
    assert tok.convert_ids_to_tokens(newline) == ["▁", "<0x0A>"]  # `▁ \n`: two ids, as LLaMA's
    long = "Summarize this: " + " ".join(f"item {i} costs {i * 7} dollars;" for i in range(40))
    prompts = ["What is 12 + 30?", " leading space", "def f(x):\n    return x ** 2", "Qu'est-ce que l'été ? 東京",
               "  two spaces and a tab\t", "x", long]  # fmt: skip
    responses = ["42", " It starts with a space.", "```python\nprint(f(3))\n```", "La saison chaude. 東京です。",
                 "Done.", "y " * 300, "A list of items and their prices."]  # fmt: skip
    examples = [pair(p, r, row=i) for i, (p, r) in enumerate(zip(prompts, responses, strict=True))]
    for max_length in (64, 128, 512):
        encoded = load_template("paper", tok, max_length=max_length).encode(examples)
        for ex, enc in zip(examples, encoded, strict=True):
            ids, labels = march_data_py(tok, ex.messages[0]["content"], ex.messages[1]["content"], max_length)
            assert enc.input_ids == ids and enc.labels == labels, (max_length, ex.messages)
            head = len(tok(ex.messages[0]["content"], truncation=True, max_length=max_length // 2)["input_ids"])
            whole = head + len(newline) + len(tok(ex.messages[1]["content"])["input_ids"]) - 1
            fits = whole < max_length  # EOS is there exactly when the whole answer and it fit
            assert (ids[-1] == tok.eos_token_id) == fits == (not enc.truncated) and len(ids) <= max_length
    # what the joined text would have given instead: the first answer token is the one after the mask
    joined = tok("What is 12 + 30?\n42</s>")["input_ids"]
    ours = load_template("paper", tok, max_length=64).encode(examples[:1])[0]
    assert joined != ours.input_ids
    first = trained(ours.labels)[0]
    assert tok.convert_ids_to_tokens(ours.input_ids[first]).startswith("▁")  # the answer keeps its `▁`
    long_enc = load_template("paper", tok, max_length=128).encode(examples[-1:])[0]
    assert trained(long_enc.labels)[0] == 64 + len(newline)  # the long prompt: cut to 64 tokens


def test_paper_template_train_on_inputs_and_generation_prompt(tok: Any) -> None:
    tmpl = load_template("paper", tok, max_length=64, train_on_inputs=True)
    enc = tmpl.encode([pair()])[0]
    assert enc.labels == enc.input_ids
    # The saved template renders, for generation, exactly the tokens training put before the answer.
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], chat_template=tmpl.jinja,
                                     tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert prompt == tok.bos_token + PROMPT + "\n"
    masked = load_template("paper", tok, max_length=64).encode([pair()])[0]
    assert plain(tok, prompt) == masked.input_ids[: trained(masked.labels)[0]]


def test_paper_template_refuses_conversations(tok: Any) -> None:
    conv = Example(({"role": "system", "content": "x"}, *pair().messages), "s", 6)
    with pytest.raises(DataError, match="row 7: template 'paper' takes prompt/response pairs"):
        load_template("paper", tok, max_length=64).encode([conv])


# --- chat templates -----------------------------------------------------------------------------


def test_chat_template_trains_answer_and_end_of_turn_only(tok: Any) -> None:
    tmpl = load_template("chat", tok, max_length=128)
    enc = tmpl.encode([pair()])[0]
    text = f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n{RESPONSE}<|im_end|>\n"
    assert enc.input_ids == plain(tok, text)
    answer = [*plain(tok, RESPONSE), tok.eos_token_id]
    prompt_part = plain(tok, f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n")
    assert trained(enc.labels) == list(range(len(prompt_part), len(prompt_part) + len(answer)))
    assert [enc.labels[i] for i in trained(enc.labels)] == answer  # not the newline after <|im_end|>
    generation = tok.apply_chat_template([{"role": "user", "content": PROMPT}], chat_template=tmpl.jinja,
                                         tokenize=False, add_generation_prompt=True)  # fmt: skip
    assert plain(tok, generation) == prompt_part


def test_chat_template_multi_turn_trains_every_answer(tok: Any) -> None:
    conv = Example(
        ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "One?"},
         {"role": "assistant", "content": "Uno."}, {"role": "user", "content": "Two?"},
         {"role": "assistant", "content": "Dos."}),
        "s", 0,
    )  # fmt: skip
    enc = load_template("chatml", tok, max_length=128).encode([conv])[0]
    targets = [t for t in enc.labels if t != IGNORE]
    assert targets == [*plain(tok, "Uno."), tok.eos_token_id, *plain(tok, "Dos."), tok.eos_token_id]
    every = load_template("chatml", tok, max_length=128, train_on_inputs=True).encode([conv])[0]
    assert every.labels == every.input_ids


def test_alpaca_template_and_truncation(tok: Any) -> None:
    tmpl = load_template("alpaca", tok, max_length=512)
    enc = tmpl.encode([pair()])[0]
    assert enc.input_ids[0] == tok.bos_token_id  # this tokenizer adds BOS, so the template does
    assert tok.decode(enc.input_ids[: trained(enc.labels)[0]]).endswith(
        f"### Instruction:\n{PROMPT}\n\n### Response:\n"
    )
    assert [enc.labels[i] for i in trained(enc.labels)] == [*plain(tok, RESPONSE), tok.eos_token_id]
    long = pair(response=" ".join([RESPONSE] * 30))
    n = len(load_template("alpaca", tok, max_length=1024).encode([long])[0].input_ids)
    short = load_template("alpaca", tok, max_length=n - 1).encode([long])[0]
    assert short.truncated and len(short.input_ids) == n - 1 and tok.eos_token_id not in short.labels


def test_a_template_without_eos_is_refused(tok: Any, tmp_path: Path) -> None:
    never_stops = tmp_path / "t.jinja"
    never_stops.write_text("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}")
    with pytest.raises(TemplateError, match="would never stop"):
        load_template("paper", tok, max_length=64, file=never_stops)
    with pytest.raises(TemplateError, match="no chat template"):
        tok2 = type(tok).from_pretrained(tok.name_or_path)
        tok2.chat_template = None
        load_template("chat", tok2, max_length=64)


# --- batching -----------------------------------------------------------------------------------


def split_of(tok: Any, examples: list[Example], max_length: int = 64) -> TokenizedSplit:
    encoded = load_template("paper", tok, max_length).encode(examples)
    return TokenizedSplit.build(encoded, [e.row for e in examples])


def test_eos_target_survives_when_pad_is_eos(tok: Any) -> None:
    """SmolLM2 ships pad == eos: padding must never mask the EOS target."""
    data = split_of(tok, [pair(), pair("Hi", "Hello there, friend.")])
    eos = tok.eos_token_id
    for packing in (False, True):
        batch = collate(data, np.array([0, 1]), packing=packing, max_length=64, pad_id=eos, pad_to_max_length=True)
        targets = batch.targets.flatten().tolist()
        assert targets.count(eos) == 2  # each example's EOS is still predicted
        assert batch.tokens == int(data.offsets[-1]) and batch.input_ids.numel() == 64 * batch.input_ids.shape[0]


def test_targets_never_cross_examples(tok: Any) -> None:
    examples = [pair(), pair("Hi", "Hello."), pair("Why?", "Because.")]
    encoded = load_template("paper", tok, 64).encode(examples)
    data = TokenizedSplit.build(encoded, [0, 1, 2])
    for i, enc in enumerate(encoded):  # target of token t is the label of token t + 1, within the example
        assert data.tokens(i)[1].tolist() == [*enc.labels[1:], IGNORE]
    batch = collate(data, np.array([0, 1, 2]), packing=True, max_length=64, pad_id=0)
    assert batch.input_ids.shape[0] == 1  # all three share one row
    positions, targets = batch.position_ids[0].tolist(), batch.targets[0].tolist()
    last_tokens = [i - 1 for i in range(1, len(positions)) if positions[i] == 0]
    assert len(last_tokens) == 2 and all(targets[i] == IGNORE for i in last_tokens)
    assert batch.target_tokens == sum(e.trainable for e in encoded)  # every trained label is predicted once


def test_pack_and_deal_place_every_example_once() -> None:
    lengths = np.array([60, 10, 33, 31, 5, 64, 2, 40])
    rows = pack(np.arange(8), lengths, max_length=64)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert (
        all(sum(lengths[i] for i in r) <= 64 for r in rows) and len(rows) == 4
    )  # 245 tokens: 4 rows is the least possible
    for group in (True, False):
        plan = deal(np.arange(8), lengths, processes=2, accumulation=2, group_by_length=group)
        flat = [int(i) for proc in plan for micro in proc for i in micro]
        assert sorted(flat) == list(range(8)) and all(len(m) == 2 for proc in plan for m in proc)
    grouped = deal(np.arange(8), lengths, processes=1, accumulation=4, group_by_length=True)[0]
    assert [sorted(lengths[m].tolist()) for m in grouped] == [[60, 64], [33, 40], [10, 31], [2, 5]]


def test_data_order_is_a_function_of_seed_and_step() -> None:
    per_epoch = [step_examples(s, 10, 3, seed=7) for s in range(3)]  # 10 // 3 = 3 steps; one example rests
    assert len({int(i) for b in per_epoch for i in b}) == 9
    assert all(
        (a == b).all() for a, b in zip(per_epoch, [step_examples(s, 10, 3, seed=7) for s in range(3)], strict=True)
    )
    assert not (step_examples(3, 10, 3, seed=7) == per_epoch[0]).all()  # epoch 2 is reshuffled
    assert not (step_examples(0, 10, 3, seed=8) == per_epoch[0]).all()


# --- packing leaves every example's logits as if it ran alone -----------------------------------


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_logits_equal_solo_logits(tok: Any, tiny_model: Path, attn: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), attn_implementation=attn).eval()
    examples = [pair(), pair("Hi", "Hello there."), pair("Name three colours.", "Red, green and blue.")]
    data = split_of(tok, examples)
    batch = collate(
        data, np.array([0, 1, 2]), packing=True, max_length=64, pad_id=tok.pad_token_id, pad_to_max_length=True
    )
    assert batch.input_ids.shape == (1, 64)  # three examples and a padding tail in one row
    with torch.no_grad():
        # use_cache=False as in training: with a KV cache transformers ignores packed position ids
        packed = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits[0]
        crossed = model(input_ids=batch.input_ids, use_cache=False).logits[0]  # ordinary causal attention
        at = 0
        differs = []
        (order,) = pack(np.array([0, 1, 2]), data.lengths, 64)  # the row's examples, longest first
        for i in order:
            ids, _ = data.tokens(i)
            solo = model(input_ids=torch.tensor([ids.tolist()])).logits[0]
            k = len(ids)
            torch.testing.assert_close(packed[at : at + k], solo, atol=2e-5, rtol=1e-4)
            differs.append(not torch.allclose(crossed[at : at + k], solo, atol=1e-3))
            at += k
    assert differs == [False, True, True]  # without the reset, later examples would see earlier ones


def test_learning_rate_schedules() -> None:
    from distill4all.train.loop import lr_factor

    assert [lr_factor(s, 4, 10, "constant") for s in (0, 1, 3, 4, 9)] == [0.25, 0.5, 1.0, 1.0, 1.0]  # no step at 0
    assert lr_factor(4, 4, 10, "cosine") == 1.0 and lr_factor(7, 4, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 4, 10, "cosine") == pytest.approx(0.0) and lr_factor(7, 4, 10, "linear") == 0.5
    assert lr_factor(0, 0, 10, "constant") == 1.0
