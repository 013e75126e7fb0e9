"""The named prompt layouts as Jinja chat templates, shared by training (which saves the one it
trained with next to the model) and eval (which may score a baseline in the layout it was trained
in, e.g. alpaca-lora in Alpaca's).

`paper` is the report's `<s>prompt\\n` + answer + `</s>`. Its template carries PAPER_MARK, a Jinja
comment (it renders as nothing), because the layout is more than its text: the original tokenized
the prompt, the newline and the answer apart (see train/templates.py), and eval scores a model
trained so at that boundary.
"""

from __future__ import annotations

from collections.abc import Callable

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
