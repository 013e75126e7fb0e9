"""Templates: how a conversation becomes token ids, and which of those tokens carry loss.

`paper` reproduces the data.py of the report's release (nomic-ai/gpt4all 252676ff, March 2023),
token for token:

    ids    = tokenize(prompt, truncated to max_length // 2 tokens)   (BOS as the tokenizer adds it)
           + tokenize("\n") without its BOS
           + tokenize(response) without its BOS, truncated to the room left
           + EOS, only when it fits: a truncated answer does not teach the model to stop mid-code
    labels = ids with the prompt and the newline masked

Each part is tokenized on its own and the ids are concatenated, so on a SentencePiece tokenizer
(the paper's LLaMA) the newline is `▁ \n` and the answer's first word keeps its `▁` — which
tokenizing the joined text would not give.

`paper-april` is the later data.py (April 2023, GPT4All-J): the joined text
`prompt + "\n" + response + eos` tokenized once, truncated to max_length; a prompt of at least
max_length // 2 tokens first cut to min(max_length // 2, len(prompt) // 2) *characters*.

Every other template is a Jinja chat template (the tokenizer's own as `chat`, a named one, or a
file): the rendered conversation is tokenized once with character offsets, and tokens that start
inside an assistant turn, up to and including the special token that ends it, carry loss. That
token is EOS, or an end-of-turn token the template writes instead (Llama 3's `<|eot_id|>`,
Gemma's `<end_of_turn>`, Phi-3's `<|end|>`); the trained model lists it with EOS as a token
generation stops at (generation_config, and the GGUF's EOT id).

Whichever is used is saved as the tokenizer's `chat_template` next to the trained model, so that
export, chat, serve and eval render prompts as training did. For `paper` that template renders
`bos + prompt + "\n"` for generation and carries a marker (models/chat_templates.py) by which
eval knows to score a paper-trained model at the boundary training saw.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from distill4all.errors import DataError, TemplateError
from distill4all.models import chat_templates
from distill4all.models.chat_templates import CHATML, answer_end, hf_specials
from distill4all.train.data import Example

IGNORE = -100
"""Label of a token that carries no loss (the value transformers and PyTorch use)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # aligned with input_ids; IGNORE where no loss
    truncated: bool  # max_length cut the sequence (so no EOS was learned from it)

    @property
    def trainable(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


class Template(Protocol):
    name: str
    jinja: str  # saved as the tokenizer's chat_template

    def encode(self, examples: Sequence[Example]) -> list[Encoded]: ...


def adds_bos(tokenizer: Any) -> bool:
    """Whether the tokenizer puts a BOS token in front of plain text by itself."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a")["input_ids"][:1] == [bos]


def paper_jinja(tokenizer: Any) -> str:
    return chat_templates.paper_jinja(adds_bos(tokenizer))


def alpaca_jinja(tokenizer: Any) -> str:
    return chat_templates.alpaca_jinja(adds_bos(tokenizer))


NAMED = ("paper", "paper-april", "chat", "chatml", "alpaca")


def _cut_prompt(text: str, max_length: int) -> str:
    """The April rule for a prompt of half the context or more: keep a prefix of its characters."""
    return text[: min(max_length // 2, len(text) // 2)]


def without_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    """`ids` less a leading BOS (the original cut the first id blindly: its LLaMA always added one)."""
    return ids[1:] if ids[:1] == [tokenizer.bos_token_id] and tokenizer.bos_token_id is not None else ids


class PaperTemplate:
    """The report's prompt/response layout; `april` selects the later data.py (see the module doc)."""

    def __init__(self, tokenizer: Any, max_length: int, train_on_inputs: bool = False, *, april: bool = False) -> None:
        if tokenizer.eos_token is None:
            raise TemplateError("the tokenizer has no EOS token: a model trained without one could never stop")
        self.name = "paper-april" if april else "paper"
        self.tok = tokenizer
        self.max_length = max_length
        self.train_on_inputs = train_on_inputs
        self.april = april
        self.jinja = paper_jinja(tokenizer)
        self.newline = without_bos(tokenizer, list(tokenizer("\n")["input_ids"]))
        self.starts_with_bos = adds_bos(tokenizer)

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        prompts, responses = [], []
        for ex in examples:
            if [m["role"] for m in ex.messages] != ["user", "assistant"]:
                raise DataError(
                    f"row {ex.row + 1}: template {self.name!r} takes prompt/response pairs; "
                    "use template: chat for conversations or system prompts"
                )
            prompts.append(ex.messages[0]["content"])
            responses.append(ex.messages[1]["content"])
        return self._april(prompts, responses) if self.april else self._march(prompts, responses)

    def _march(self, prompts: list[str], responses: list[str]) -> list[Encoded]:
        half, eos = self.max_length // 2, self.tok.eos_token_id
        prompt_ids = self.tok(prompts, truncation=True, max_length=half)["input_ids"]
        out = []
        for head, response in zip(prompt_ids, responses, strict=True):
            head = [*head, *self.newline]
            room = self.max_length - len(head)
            # the BOS that will be dropped counts toward the truncation, as in the original
            drop = 1 if self.starts_with_bos else 0
            answer = without_bos(self.tok, self.tok(response, truncation=True, max_length=room + drop)["input_ids"])
            ids = [*head, *answer[:room]]
            if len(ids) < self.max_length:
                ids.append(eos)
            masked = 0 if self.train_on_inputs else len(head)
            out.append(Encoded(ids, [IGNORE] * masked + ids[masked:], truncated=ids[-1] != eos))
        return out

    def _april(self, prompts: list[str], responses: list[str]) -> list[Encoded]:
        half = self.max_length // 2
        prompt_lens = [len(ids) for ids in self.tok(prompts)["input_ids"]]
        for i, n in enumerate(prompt_lens):
            if n >= half:
                prompts[i] = _cut_prompt(prompts[i], self.max_length)
                prompt_lens[i] = len(self.tok(prompts[i], truncation=True, max_length=half)["input_ids"])
        eos = self.tok.eos_token
        texts = [p + "\n" + r + eos for p, r in zip(prompts, responses, strict=True)]
        full = self.tok(texts, truncation=True, max_length=self.max_length)["input_ids"]
        out = []
        for ids, prompt_len in zip(full, prompt_lens, strict=True):
            masked = 0 if self.train_on_inputs else min(prompt_len + len(self.newline), len(ids))
            labels = [IGNORE] * masked + ids[masked:]
            out.append(Encoded(list(ids), labels, truncated=ids[-1] != self.tok.eos_token_id))
        return out


class JinjaTemplate:
    """A chat template; loss on the assistant turns (to the token that ends them: EOS or an end-of-turn
    token), or on everything with train_on_inputs."""

    def __init__(self, name: str, jinja: str, tokenizer: Any, max_length: int, train_on_inputs: bool = False) -> None:
        if tokenizer.eos_token is None:
            raise TemplateError("the tokenizer has no EOS token: a model trained without one could never stop")
        self.name, self.jinja, self.tok = name, jinja, tokenizer
        self.max_length = max_length
        self.train_on_inputs = train_on_inputs
        end = answer_end(lambda m: self._apply(m, False, "the template check"), hf_specials(tokenizer))
        if end is None or tokenizer(end, add_special_tokens=False)["input_ids"] != [
            tokenizer.convert_tokens_to_ids(end)
        ]:
            raise TemplateError(
                f"template {name!r} does not end an answer with a special token of the tokenizer (its EOS "
                f"{tokenizer.eos_token!r} or an end-of-turn token such as <|eot_id|>): a model trained with it "
                "would never stop; use template: paper, or a template whose assistant turns end in one"
            )
        self.end_token = end  # what the answer's loss runs up to, and what generation stops at

    def _apply(self, messages: Sequence[dict[str, str]], generation_prompt: bool, where: str) -> str:
        try:
            text = self.tok.apply_chat_template(
                list(messages), chat_template=self.jinja, tokenize=False, add_generation_prompt=generation_prompt
            )
        except Exception as e:  # jinja2 raises TemplateError/UndefinedError, templates raise their own
            raise TemplateError(f"{where}: template {self.name!r} cannot render it: {e}") from None
        return str(text)

    def _render(self, messages: Sequence[dict[str, str]], where: str) -> tuple[str, list[tuple[int, int]]]:
        """The full text and the character span of each assistant turn, up to and including the
        token that ends it."""
        full = self._apply(messages, False, where)
        spans = []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = self._apply(messages[:i], True, where)
            upto = full if i == len(messages) - 1 else self._apply(messages[: i + 1], False, where)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise TemplateError(
                    f"{where}: template {self.name!r} renders earlier turns differently once later ones are "
                    "added, so answer tokens cannot be told apart; use another template"
                )
            start, end = len(before), len(upto)
            end_at = upto.rfind(self.end_token, start)
            if end_at >= 0:  # what follows it (a newline, an EOS) is never generated: no loss there
                end = end_at + len(self.end_token)
            spans.append((start, end))
        return full, spans

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
        enc = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [list(ids) for ids in enc["input_ids"]], [list(o) for o in enc["offset_mapping"]]

    def encode(self, examples: Sequence[Example]) -> list[Encoded]:
        rendered = [self._render(ex.messages, f"row {ex.row + 1}") for ex in examples]
        ids, offsets = self._tokenize([text for text, _ in rendered])
        # The paper's rule for long prompts, for single-turn examples: the prompt's share is the
        # tokens before the answer starts (template scaffolding included).
        long = [
            i
            for i, ex in enumerate(examples)
            if ex.single_turn and sum(1 for o in offsets[i] if o[0] < rendered[i][1][0][0]) >= self.max_length // 2
        ]
        for i in long:
            messages = examples[i].messages
            cut = {"role": "user", "content": _cut_prompt(messages[-2]["content"], self.max_length)}
            rendered[i] = self._render((*messages[:-2], cut, messages[-1]), f"row {examples[i].row + 1}")
        if long:
            redone = self._tokenize([rendered[i][0] for i in long])
            for k, i in enumerate(long):
                ids[i], offsets[i] = redone[0][k], redone[1][k]
        out = []
        for full, offs, (_, spans) in zip(ids, offsets, rendered, strict=True):
            kept = full[: self.max_length]
            if self.train_on_inputs:
                labels = list(kept)
            else:
                labels = [
                    t if any(a <= o[0] < b for a, b in spans) else IGNORE for t, o in zip(kept, offs, strict=False)
                ]
            out.append(Encoded(kept, labels, truncated=len(full) > self.max_length))
        return out


def load_template(
    name: str, tokenizer: Any, max_length: int, train_on_inputs: bool = False, file: Path | None = None
) -> Template:
    """`paper`, `paper-april`, `chat` (the tokenizer's own chat template), `chatml`, `alpaca`, or a Jinja file."""
    if file is not None:
        try:
            jinja = file.read_text(encoding="utf-8")
        except OSError as e:
            raise TemplateError(f"cannot read template file {file}: {e.strerror}") from None
        return JinjaTemplate(file.name, jinja, tokenizer, max_length, train_on_inputs)
    if name in ("paper", "paper-april"):
        return PaperTemplate(tokenizer, max_length, train_on_inputs, april=name == "paper-april")
    if name == "chat":
        if not tokenizer.chat_template:
            raise TemplateError(
                "the base model's tokenizer has no chat template; use template: paper, chatml or alpaca"
            )
        jinja = str(tokenizer.chat_template)
    elif name == "chatml":
        jinja = CHATML
    elif name == "alpaca":
        jinja = alpaca_jinja(tokenizer)
    else:
        raise TemplateError(f"unknown template {name!r}; use one of {', '.join(NAMED)} or template_file")
    return JinjaTemplate(name, jinja, tokenizer, max_length, train_on_inputs)
