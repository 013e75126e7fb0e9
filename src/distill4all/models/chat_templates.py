"""The named prompt layouts as Jinja chat templates, shared by training (which saves the one it
trained with next to the model) and eval (which may score a baseline in the layout it was trained
in, e.g. alpaca-lora in Alpaca's).

`paper` is the report's `<s>prompt\\n` + answer + `</s>`. Its template carries PAPER_MARK, a Jinja
comment (it renders as nothing), because the layout is more than its text: the original tokenized
the prompt, the newline and the answer apart (see train/templates.py), and eval scores a model
trained so at that boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

PAPER_MARK = "{# distill4all: paper layout (prompt, newline and answer tokenized apart) #}"

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ALPACA_SYSTEM = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
)

NAMED_LAYOUTS = ("paper", "chatml", "alpaca")


def _bos(add_bos: bool) -> str:
    return "{{ bos_token }}" if add_bos else ""


def paper_jinja(add_bos: bool) -> str:
    """User (and system) turns end in a newline, answers in EOS; BOS first where the tokenizer adds one."""
    return (
        PAPER_MARK + _bos(add_bos) + "{% for message in messages %}"
        "{% if message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
        "{% else %}{{ message['content'] + '\n' }}{% endif %}"
        "{% endfor %}"
    )


def alpaca_jinja(add_bos: bool) -> str:
    return (
        _bos(add_bos) + "{% if messages[0]['role'] == 'system' %}"
        "{{ messages[0]['content'] + '\n\n' }}{% set turns = messages[1:] %}"
        "{% else %}{{ '" + ALPACA_SYSTEM + "\n\n' }}{% set turns = messages %}{% endif %}"
        "{% for message in turns %}"
        "{% if message['role'] == 'user' %}{{ '### Instruction:\n' + message['content'] + '\n\n### Response:\n' }}"
        "{% else %}{{ message['content'] + eos_token }}{% if not loop.last %}{{ '\n\n' }}{% endif %}{% endif %}"
        "{% endfor %}"
    )


def layout_jinja(name: str, add_bos: bool) -> str:
    """The Jinja template of a named layout (one of NAMED_LAYOUTS)."""
    if name == "paper":
        return paper_jinja(add_bos)
    if name == "alpaca":
        return alpaca_jinja(add_bos)
    if name == "chatml":
        return CHATML
    raise ValueError(f"unknown layout {name!r}; one of {', '.join(NAMED_LAYOUTS)}")


def is_paper_layout(template: str | None) -> bool:
    return template is not None and template.startswith(PAPER_MARK)


def paper_prompt_ids(tokenize: Callable[..., list[int]], texts: list[str]) -> list[int]:
    """The paper layout's prompt as training built it: each text and its newline tokenized apart,
    BOS (where the tokenizer adds one) in front only — on SentencePiece `▁ \\n`, unlike the joined text."""
    ids: list[int] = []
    for text in texts:
        ids += tokenize(text, add_special=not ids) + tokenize("\n", add_special=False)
    return ids


PROBE_ANSWER = "Hello"
PROBE = ({"role": "user", "content": "Hi"}, {"role": "assistant", "content": PROBE_ANSWER})


def answer_end(render: Callable[[Sequence[dict[str, str]]], str], specials: Iterable[str]) -> str | None:
    """The special token that ends an assistant answer under a chat template: EOS in most, an
    end-of-turn token in others (Llama 3's `<|eot_id|>` over a base model's `<|end_of_text|>`,
    Gemma's `<end_of_turn>`, Phi-3's `<|end|>`, ChatML's `<|im_end|>` on a base Qwen). It is the
    first of `specials` after the answer's text (the longest where two start there); None when
    the answer ends in none, so a model trained with the template could never stop.
    `render` writes a whole conversation (no generation prompt)."""
    full = render(PROBE)
    at = full.rfind(PROBE_ANSWER)
    if at < 0:
        return None
    rest = full[at + len(PROBE_ANSWER) :]
    found = [(rest.find(s), -len(s), s) for s in set(specials) if s and s in rest]
    return min(found)[2] if found else None


def hf_specials(tokenizer: object) -> set[str]:
    """The special tokens of an HF tokenizer: its named ones and every added token marked special."""
    names = set(getattr(tokenizer, "all_special_tokens", []))
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return names | {t.content for t in added.values() if getattr(t, "special", False)}


def hf_stop_ids(tokenizer: object, jinja: str | None = None) -> list[int]:
    """EOS and the token that ends an answer under `jinja` (default: the tokenizer's own chat
    template), as generation_config.eos_token_id lists them."""
    tok: Any = tokenizer
    ids = [tok.eos_token_id] if tok.eos_token_id is not None else []
    template = jinja if jinja is not None else tok.chat_template
    if isinstance(template, str) and template:
        try:
            end = answer_end(
                lambda m: str(tok.apply_chat_template(list(m), chat_template=template, tokenize=False)),
                hf_specials(tok),
            )
        except Exception:  # a template that cannot render the probe adds no stop token
            end = None
        if end is not None:
            end_id = tok.convert_tokens_to_ids(end)
            if isinstance(end_id, int) and end_id not in ids:
                ids.append(end_id)
    return ids
