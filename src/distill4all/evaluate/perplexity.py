"""Ground-truth perplexity of reference answers: the paper's metric, faithfully, and a corrected one.

Both work on any runtime engine (transformers or llama.cpp) through two calls:
`tokenize(text, add_special=...)` and `token_logprobs(ids)` (log p(ids[i] | ids[:i]), i ≥ 1).
"""

from __future__ import annotations

import math
from typing import Protocol

from distill4all.evaluate.data import Item
from distill4all.models.chat_templates import is_paper_layout, paper_prompt_ids

Message = dict[str, str]


class Scorer(Protocol):
    n_ctx: int

    def tokenize(self, text: str, *, add_special: bool = True) -> list[int]: ...
    def token_logprobs(self, ids: list[int]) -> list[float]: ...
    @property
    def chat_template(self) -> str | None: ...
    def render_chat(self, messages: list[Message], *, add_generation_prompt: bool = True) -> str: ...


def _exp(x: float) -> float:
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def faithful_perplexity(engine: Scorer, item: Item, stride: int = 512) -> float:
    """What nomic-ai/gpt4all's `eval_self_instruct.py` (March 2023) computed, quirks and all:

    1. prompt = instruction + ' ' + input; text = prompt + ' ' + output; each tokenized on its own
       with the tokenizer's special tokens (BOS where the tokenizer adds one). The boundary is
       `len(prompt ids)` taken on the *text's* ids, although tokenizing the joined text can merge
       across it.
    2. The model sees only windows `ids[begin:begin + stride]` for begin = len(prompt ids),
       len + stride, …: neither the prompt nor BOS is ever in context, and each window starts
       cold (windows do not overlap, so no token has context from an earlier window).
    3. `target_ids[:, :-trg_len] = -100` never masks anything (trg_len ≥ the window's length), so
       a window's loss is transformers' mean over its len - 1 next-token predictions; its first
       token is never predicted.
    4. That mean is multiplied by trg_len = end - previous end, which for the first window is its
       end *position* — the prompt's length included — not the number of tokens scored.
    5. The sum is divided by the last end position (prompt included) and exponentiated.
    A window of one token has no prediction: transformers returns NaN, and so do we; an empty
    output leaves no window at all (the original crashed on it): NaN too.
    """
    prompt = item.instruction + " " + item.input
    text = prompt + " " + item.output
    n_prompt = len(engine.tokenize(prompt, add_special=True))
    ids = engine.tokenize(text, add_special=True)
    seq_len = len(ids)
    nll, prev_end, end = 0.0, 0, 0
    for begin in range(n_prompt, seq_len, stride):
        end = min(begin + stride, seq_len)
        trg_len = end - prev_end
        logprobs = engine.token_logprobs(ids[begin:end])
        mean_loss = -sum(logprobs) / len(logprobs) if logprobs else math.nan
        nll += mean_loss * trg_len
        prev_end = end
        if end == seq_len:
            break
    if end == 0:
        return math.nan
    return _exp(nll / end)


def conditioned_ids(engine: Scorer, item: Item) -> tuple[list[int], list[int]]:
    """(context, target): the prompt as the model was trained to see it, and the reference output
    tokenized at the boundary as training placed it.

    - The paper's layout (a model trained with template `paper`, or one with no chat template):
      as the original data.py built it, `tokenize(prompt)` + `tokenize("\\n")` + `tokenize(output)`,
      each tokenized apart (BOS only in front), so on a SentencePiece tokenizer the newline is
      `▁ \\n` and the output's first word keeps its `▁`, as in training.
    - A chat template: training tokenized the rendered conversation once, so the output is
      tokenized inside it: the tokens of the conversation up to the output's end, after those it
      shares with the generation prompt."""
    user = item.instruction if not item.input else f"{item.instruction}\n\n{item.input}"
    template = engine.chat_template
    if template is None or is_paper_layout(template):
        return paper_prompt_ids(engine.tokenize, [user]), engine.tokenize(item.output, add_special=False)
    prompt = engine.render_chat([{"role": "user", "content": user}], add_generation_prompt=True)
    full = engine.render_chat([{"role": "user", "content": user}, {"role": "assistant", "content": item.output}],
                              add_generation_prompt=False)  # fmt: skip
    at = full.find(item.output, len(prompt)) if full.startswith(prompt) else -1
    upto = full[: at + len(item.output)] if at >= 0 else prompt + item.output
    context = engine.tokenize(prompt, add_special=False)  # a template holds its own specials
    joined = engine.tokenize(upto, add_special=False)
    shared = next((i for i, (a, b) in enumerate(zip(context, joined, strict=False)) if a != b), len(context))
    shared = max(shared, 1)  # the first token is context: it has no prediction
    return joined[:shared], joined[shared:]


def conditioned_context(engine: Scorer, item: Item) -> list[int]:
    return conditioned_ids(engine, item)[0]


def conditioned_perplexity(engine: Scorer, item: Item) -> float:
    """The corrected metric: perplexity of every reference output token given the templated prompt
    and the output so far, in one pass, tokenized as training placed them (conditioned_ids); no
    EOS is scored (references have none). A prompt too long for the context is cut from the left
    (keeping at least its last token)."""
    context, target = conditioned_ids(engine, item)
    if not target:
        return math.nan
    excess = len(context) + len(target) - engine.n_ctx
    if excess > 0:
        keep = max(1, len(context) - excess)
        context = context[-keep:]
        target = target[: engine.n_ctx - keep]  # an output longer than the context: what fits
    ids = context + target
    logprobs = engine.token_logprobs(ids)
    scored = logprobs[len(context) - 1 :]
    return _exp(-sum(scored) / len(scored))
