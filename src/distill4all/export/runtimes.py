"""What other runtimes need beside a GGUF: an Ollama Modelfile and a GPT4All model-list entry.

Both want the chat template in their own form (Ollama: a Go template over `.System`, `.Prompt`
and `.Response`; GPT4All: a `promptTemplate` with `%1` for the prompt and `%2` for the answer,
and a `systemPrompt` written once before the first turn). Rather than parse Jinja, the model's
template is rendered with marker texts for the system prompt, the prompt and the answer, and
the renders are cut into pieces:

    first turn  = [system block] + user header + PROMPT + generation prompt + ANSWER + answer end
    later turns =                  user header + PROMPT + generation prompt + ANSWER + answer end

The user header is what comes between an answer's end and the next prompt; the system block
is what a system message adds before the first user header, with a default text when the
template writes one without a system message (SmolLM2's, Alpaca's). A template that puts the
system prompt inside the first user turn (Gemma's) is written as an if/else around the pieces
that differ. This covers ChatML, the paper's `prompt\\n` layout, Llama 3, Gemma, Phi-3, Mistral and
Alpaca; a template whose renders do not cut this way is refused with the reason.

BOS: llama.cpp, Ollama and GPT4All add it themselves when the GGUF says the tokenizer does, so a
`bos_token` the template writes first is left out of both forms.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill4all.errors import ExportError
from distill4all.models.chat_templates import hf_specials

SYSTEM, PROMPT, PROMPT2, ANSWER = "\x01system\x01", "\x01prompt\x01", "\x01second\x01", "\x01answer\x01"


@dataclass(frozen=True)
class TurnLayout:
    """A chat template cut into the pieces of a turn (see the module doc)."""

    user: str  # the user header: before every prompt but the first one's system part
    assistant: str  # between the prompt and the answer (the generation prompt)
    end: str  # after the answer
    system: str | None  # the system block, SYSTEM where its text goes; None: no separate block
    default_system: str | None  # what the template writes as system text without a system message
    # A template that folds the system prompt into the first turn: first = prefix + (with or
    # without) + user, the two alternatives around SYSTEM.
    folded: tuple[str, str, str] | None = None  # (prefix, with system, without system)
    stops: tuple[str, ...] = ()

    @property
    def takes_system(self) -> bool:
        return self.system is not None or self.folded is not None

    def check_system(self, system_prompt: str | None) -> None:
        if system_prompt is not None and not self.takes_system:
            raise ExportError("the chat template takes no system message; unset export.system_prompt")

    def go_template(self) -> str:
        """The Ollama TEMPLATE: one turn over .System, .Prompt and .Response."""
        if self.folded is not None:
            prefix, with_system, without = (_go_text(t) for t in self.folded)
            head = prefix + "{{ if .System }}" + with_system.replace(_go_text(SYSTEM), "{{ .System }}")
            head += ("{{ else }}" + without if without else "") + "{{ end }}"
        elif self.system is not None:
            head = "{{ if .System }}" + _go_text(self.system).replace(_go_text(SYSTEM), "{{ .System }}") + "{{ end }}"
        else:
            head = ""
        return (
            head
            + _go_text(self.user)
            + "{{ .Prompt }}"
            + _go_text(self.assistant)
            + "{{ .Response }}"
            + _go_text(self.end)
        )

    def gpt4all(self, system_prompt: str | None) -> tuple[str, str]:
        """(systemPrompt, promptTemplate) of a GPT4All model-list entry."""
        self.check_system(system_prompt)
        system = system_prompt if system_prompt is not None else self.default_system
        if self.folded is not None:
            if system:
                raise ExportError(
                    "the chat template puts the system prompt inside the first user turn, which GPT4All's "
                    "systemPrompt cannot express; unset export.system_prompt"
                )
            prefix, _, without = self.folded
            return "", prefix + without + self.user + "%1" + self.assistant + "%2" + self.end
        block = self.system.replace(SYSTEM, system) if self.system is not None and system else ""
        return block, self.user + "%1" + self.assistant + "%2" + self.end


def _go_text(text: str) -> str:
    """Literal text in a Go template ("{{" would open an action)."""
    return text.replace("{{", '{{ "{{" }}')


def _common_prefix(a: str, b: str) -> int:
    """Characters `a` and `b` share at their start."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _common_suffix(a: str, b: str) -> int:
    return _common_prefix(a[::-1], b[::-1])


def _token_boundary(text: str, at: int, specials: set[str]) -> int:
    """`at`, moved back to the start of a special token of `text` that it would cut in two
    (Phi-3's `<|end|>\n<|user|>` and `<|end|>\n<|endoftext|>` share `<|`)."""
    for s in specials:
        start = text.find(s)
        while start >= 0:
            if start < at < start + len(s):
                at = start
            start = text.find(s, start + 1)
    return at


def _first_stop(text: str, specials: set[str]) -> str | None:
    """The first special token in `text`, else its non-blank text (Alpaca's `### Instruction:`)."""
    found = [(text.find(s), -len(s), s) for s in specials if s and s in text]
    if found:
        return min(found)[2]
    return text.strip() or None


def turn_layout(tokenizer: Any) -> TurnLayout:
    """Cut the tokenizer's chat template into a TurnLayout (ExportError where it does not cut)."""
    tok = tokenizer
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    if not template:
        raise ExportError("the model has no chat template to write the Modelfile and GPT4All entry from")
    bos = tok.bos_token if tok.bos_token and tok("a")["input_ids"][:1] == [tok.bos_token_id] else None

    def render(messages: Sequence[tuple[str, str]], generation: bool) -> str:
        text = str(tok.apply_chat_template([{"role": r, "content": c} for r, c in messages], tokenize=False,
                                           add_generation_prompt=generation))  # fmt: skip
        return text[len(bos) :] if bos and text.startswith(bos) else text

    one = render([("user", PROMPT)], True)
    full = render([("user", PROMPT), ("assistant", ANSWER)], False)
    two = render([("user", PROMPT), ("assistant", ANSWER), ("user", PROMPT2)], True)
    if one.count(PROMPT) != 1 or ANSWER not in full or PROMPT2 not in two:
        raise ExportError("the chat template does not write each message's text once; cannot convert it")
    first, assistant = one.split(PROMPT)
    between = two[two.index(ANSWER) + len(ANSWER) : two.index(PROMPT2)]  # answer end + user header
    specials = hf_specials(tok)
    cut = _token_boundary(between, _common_prefix(between, full[full.index(ANSWER) + len(ANSWER) :]), specials)
    end, user = between[:cut], between[cut:]
    if not (two.endswith(PROMPT2 + assistant) and full.startswith(first + PROMPT + assistant)):
        raise ExportError("the chat template writes turns differently from one to the next; cannot convert it")
    stops = tuple(s for s in (_first_stop(end, specials), _first_stop(user, specials)) if s)
    try:
        with_system = render([("system", SYSTEM), ("user", PROMPT)], True)
    except Exception:  # the template refuses a system message (Gemma 2's raises)
        with_system = ""
    if with_system.count(SYSTEM) != 1 or not with_system.endswith(PROMPT + assistant):
        if first != user:
            raise ExportError("the chat template starts its first turn unlike the others; cannot convert it")
        return TurnLayout(user, assistant, end, None, None, stops=stops)
    first_s = with_system[: -len(PROMPT + assistant)]
    separate = _separate_system(first, first_s, user)
    if separate is not None:
        block, default = separate
        return TurnLayout(user, assistant, end, block, default, stops=stops)
    # The system prompt sits inside the first turn: keep what both renders share outside an if/else.
    lead = min(_common_prefix(first, first_s), first_s.index(SYSTEM))
    tail = min(_common_suffix(first[lead:], first_s[lead:]), len(first_s) - first_s.index(SYSTEM) - len(SYSTEM))
    folded = (first[:lead], first_s[lead : len(first_s) - tail], first[lead : len(first) - tail])
    return TurnLayout(first[len(first) - tail :], assistant, end, None, None, folded=folded, stops=stops)


def _separate_system(first: str, first_s: str, user: str) -> tuple[str, str | None] | None:
    """(system block, default system text) where the system block stands before the user header,
    and leaving it out (or filling it with the default) gives the first turn without a system message."""
    if not (first.endswith(user) and first_s.endswith(user)):
        return None
    without, block = first[: len(first) - len(user)], first_s[: len(first_s) - len(user)]
    if not without:
        return block, None
    a, b = block.split(SYSTEM)
    if len(without) > len(a) + len(b) and without.startswith(a) and without.endswith(b):
        return block, without[len(a) : len(without) - len(b)]
    return None


def modelfile(gguf_name: str, layout: TurnLayout, system_prompt: str | None) -> str:
    """An Ollama Modelfile for the GGUF beside it."""
    layout.check_system(system_prompt)
    template = layout.go_template()
    system = system_prompt if system_prompt is not None else layout.default_system
    if '"""' in template or (system and '"""' in system):
        raise ExportError('the chat template or system prompt holds """, which a Modelfile cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{template}"""']
    lines += [f"PARAMETER stop {json.dumps(s, ensure_ascii=False)}" for s in layout.stops]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def gpt4all_entry(
    gguf: Path, layout: TurnLayout, system_prompt: str | None, *, name: str, quant: str
) -> dict[str, Any]:
    """The GPT4All app's model-list entry (its models3.json format) for one GGUF file."""
    system, prompt = layout.gpt4all(system_prompt)
    return {
        "order": "a",
        "md5sum": hashlib.md5(gguf.read_bytes(), usedforsecurity=False).hexdigest(),
        "name": name,
        "filename": gguf.name,
        "filesize": str(gguf.stat().st_size),
        "quant": quant,
        "description": f"{name}, exported by distill4all",
        "promptTemplate": prompt,
        "systemPrompt": system,
    }
