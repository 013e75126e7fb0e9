"""Failure and malformed-answer filters: small named rules over one (prompt, answer) pair.

Each rule looks at one pair and returns a short detail when it fires (the pair is dropped) or
None. `Filters.check` runs every enabled rule and returns all that fired, so a pair's decision
names each reason. Rule names are listed in `config.FILTER_RULES`; `filters.disable` in the
config turns off a rule or a whole family ("malformed" for every "malformed.*").

No library ships rules for malformed LLM answers, so these are written here; mojibake detection
is ftfy's and language identification is py3langid's; the refusal rule's many literal phrases
are found by ahocorasick_rs's automaton (one pass over an answer, ~8× Python's re) before its
regexes read the few answers that hold one.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import ahocorasick_rs
import numpy as np
import pandas as pd
from numpy.typing import NDArray

from distill4all.config import FILTER_RULES, CurateFiltersConfig
from distill4all.curate.dedup import Words, fold, normalize, split_words, window_hashes_at


@dataclass(frozen=True)
class Pair:
    prompt: str
    response: str | None
    finish_reason: str | None = None
    reasoning: str | None = None  # a reasoning model's thinking, apart from the answer


Hit = tuple[str, str]  # (rule, detail)


class AnswerForms:
    """A pair's answer in the forms the rules read, each made once per pair rather than per rule."""

    __slots__ = ("fences", "lower", "n_words", "normal", "pair", "prompt_normal", "repetition", "text")

    def __init__(self, pair: Pair, lower: str, n_words: int, prompt_normal: str | None, normal: str | None) -> None:
        self.pair = pair
        self.text = pair.response or ""
        self.lower = lower  # the text lower-cased
        self.n_words = n_words  # its words, as str.split() cuts them
        self.fences = _fence_state(self.text)
        # the prompt's and the whole answer's normalize()d forms, when the caller has them
        self.prompt_normal = prompt_normal
        self.normal = normal
        self.repetition: str | None = None  # malformed.repetition's detail, found for many answers at once


REFUSAL_PHRASES: tuple[str, ...] = (
    "as an ai language model", "as a language model", "as an ai model", "as an ai assistant",
    "as an artificial intelligence", "i'm just an ai", "i am just an ai", "i'm only an ai",
    "i am an ai", "i'm an ai", "developed by openai", "trained by openai", "created by openai",
    "i'm sorry, but i cannot", "i'm sorry, but i can't", "i'm sorry, i cannot", "i'm sorry, i can't",
    "i am sorry, but i cannot", "i apologize, but i cannot", "i apologize, but i can't",
    "i cannot fulfill", "i can't fulfill", "i cannot comply", "i can't comply", "i can't assist with",
    "i cannot assist with", "i'm unable to provide", "i am unable to provide", "i'm not able to provide",
    "i do not have personal opinions", "i don't have personal opinions", "i do not have personal",
    "i don't have personal", "i don't have the ability to", "i do not have the ability to",
    "i cannot browse", "i don't have access to real-time", "i do not have access to real-time",
    "my knowledge cutoff", "my training data", "it is not appropriate for me to", "against my programming",
    "i'm not programmed to", "i am not programmed to",
)  # fmt: skip
"""Refusal and AI-disclaimer phrasing, matched anywhere, case-insensitively with straight apostrophes."""

# A refusal said any other way is read in the answer's opening sentences, as a first-person "cannot"
# with a verb of doing the task ("I'm unable to complete…", "I won't write…") or a word for the
# task ("…this request"); "I cannot stress enough" and "I can't help but notice" name neither.
_CANNOT = (
    r"(?:cannot|can ?not|can't|won't|will not|must (?:decline|refuse)|have to (?:decline|refuse)|"
    r"(?:am|'m) (?:unable|not able|not allowed|not permitted|not comfortable|afraid i (?:cannot|can't))|"
    r"(?:do not|don't) feel comfortable|(?:am|'m) not (?:going|willing) to|(?:do not|don't) think i (?:should|can))"
)
# Between "cannot" and the verb only adverbs and the like: "I can't wait to help" is no refusal.
_FILLER = r"(?: (?:\w+ly|be able to|in good conscience|go ahead and|help you|help with))*(?: to)?"
_DOING = (
    r"(?:help(?!\s+but\b)|assist|complet|fulfil|do\b|doing|provid|perform|answer|comply|complying|writ|creat|"
    r"generat|produc|engag|support|shar|process|carry|respond|participat|accommodat|execut|translat|draw|"
    r"brows|access|look|predict|giv|offer|mak(?!e it\b)|continu|discuss|role|pretend|fix|edit|rewrit|summari|"
    r"classif|comment|judg|diagnos|identif|prescrib|advis|recommend\w* (?:any|a|specific))"
)
_TASK = r"(?:task|request|question|query|prompt|instruction|assignment|demand|ask)s?\b"
_REFUSAL_SENTENCE = re.compile(
    rf"\bi(?: really| simply| just| truly| unfortunately)?(?: |(?=')){_CANNOT}{_FILLER} "
    rf"(?:{_DOING}|[^.!?]{{0,50}}\b(?:this|that|the|your|such a|such|these|those) {_TASK})"
    r"|\b(?:is|'s) not something i(?:'m| am)? (?:can|do|able|allowed|comfortable|willing|will)"
    r"|\b(?:it is|it's) not (?:possible|appropriate|ethical) for me to"
    r"|\bi (?:must|have to|need to) (?:respectfully )?(?:decline|refuse)"
    # the same in the languages teachers most often answer in besides English
    r"|\bkann ich (?:dir |ihnen |euch )?(?:dabei )?nicht (?:helfen|behilflich)"
    r"|\bich kann (?:dir |ihnen )?nicht (?:helfen|dabei)"
    r"|\bje ne (?:peux|suis) pas (?:vous |t')?(?:aider|en mesure)|\bno puedo (?:ayudar|cumplir|completar|hacer)"
)
_AI_OPENER = re.compile(
    r"\b(?:as an? (?:ai|a\.i\.|machine|language model|large language model|computer program|virtual assistant)\b"
    r"|being an ai\b|i(?:'m| am) (?:just |only |merely )?(?:an ai|a (?:large )?language model|a computer program)\b)"
)
_LACKS = re.compile(
    r"\bi (?:do not|don't) (?:have|possess) (?:the ability|access|feelings|emotions|opinions|personal|"
    r"a (?:body|physical)|real-time|current|preferences|beliefs)"
)
_APOLOGY_OPENER = re.compile(r"^\W*(?:i'm sorry|i am sorry|sorry|i apologi[sz]e|my apologies|apologies|"
                             r"unfortunately,? i\b|regrettably,? i\b)")  # fmt: skip
_NEGATION = re.compile(
    r"\b(?:cannot|can't|can not|unable|not able|(?:don't|do not) (?:have|know)|no (?:access|information|way)|"
    r"not (?:possible|sure|aware|familiar|available)|isn't (?:possible|available))"
)
_PIVOT = re.compile(r"\b(?:but|however|instead|though|that said|here's|here is|here are|nonetheless)\b")
_SENTENCE = re.compile(r"[^.!?\n]+(?:[.!?]+|\n|$)")
OPENING_SENTENCES = 3
PARTIAL_HELP_WORDS = 60  # words after a refusal with a "but …": it still did the task
APOLOGY_MAX_WORDS = 60  # an apology with a "cannot" in an answer this short did not do the task

_TERMINAL = set(".!?…\"'”’)]}>`*|;")
_FENCE = re.compile(r"^[ \t]*(`{3,}|~{3,})[ \t]*([^\n`]*?)[ \t]*$", re.MULTILINE)
_CODE_BLOCK = re.compile(r"^[ \t]*(`{3,}|~{3,})[^\n]*\n(.*?)^[ \t]*\1[ \t]*$", re.MULTILINE | re.DOTALL)
_LIST_OR_MARKUP = re.compile(r"^\s*([-*+>#|]|\d+[.)]|[a-z][.)]\s)", re.IGNORECASE)
# "Answer in JSON", "return a JSON object", "format: json" — but not "how do I parse JSON in Python?"
_ASKS_JSON = re.compile(
    r"\b(respond|reply|answer|output|return|format(ted)?|give|provide|produce|generate|write|print)\b"
    r"[^.?!\n]{0,40}\bjson\b(?![ \t]+(in|with|using|from|file|files|string|strings|module|library)\b)"
    r"|\bjson[ \t]+(only|format|object|array|schema)\b|\b(in|as)[ \t]+(valid[ \t]+)?json\b",
    re.IGNORECASE,
)
_PROGRAMMING_QUESTION = re.compile(r"\b(how (do|can|to|would)|python|javascript|java|parse|serializ|library)\b", re.I)


def _straight(text: str) -> str:
    return text.replace("’", "'").replace("‘", "'")


class Filters:
    """The enabled rules of one config, with their patterns compiled once."""

    def __init__(self, cfg: CurateFiltersConfig, reasoning: str = "answer") -> None:
        self.cfg = cfg
        self.with_reasoning = reasoning == "with-reasoning"  # training sees the reasoning too
        disabled = set(cfg.disable)
        self.enabled = {r for r in FILTER_RULES if r not in disabled and r.split(".")[0] not in disabled}
        if not cfg.languages:
            self.enabled.discard("language")
        phrases = {_straight(p).lower() for p in (*REFUSAL_PHRASES, *cfg.refusal_phrases)}
        self._refusal = re.compile(_trie_pattern(sorted(phrases)))
        # where the regex may match (few answers): leftmost-first finds a match wherever one exists
        self._phrase_search = ahocorasick_rs.AhoCorasick(sorted(phrases), matchkind=_LEFTMOST)
        self._rules: list[tuple[str, Callable[[Pair, AnswerForms], str | None]]] = [
            ("refusal", self.refusal),
            ("truncated.length", self.truncated_length),
            ("truncated.mid-sentence", self.truncated_mid_sentence),
            ("truncated.code-fence", self.truncated_code_fence),
            ("malformed.fence", self.malformed_fence),
            ("malformed.json", self.malformed_json),
            ("malformed.mojibake", self.malformed_mojibake),
            ("malformed.echo", self.malformed_echo),
            ("malformed.repetition", self.malformed_repetition),
            ("length.short", self.length_short),
            ("length.long", self.length_long),
            ("language", self.language),
        ]
        self._active = [(name, rule) for name, rule in self._rules if name in self.enabled]

    def check(self, pair: Pair, prompt_normal: str | None = None, answer_normal: str | None = None) -> list[Hit]:
        """Every enabled rule that fires on `pair`, in rule order. `prompt_normal` and
        `answer_normal` are the prompt's and the answer's `normalize()`d forms, when the caller has
        them already (the results are the same)."""
        return self.check_many([pair], [prompt_normal], [answer_normal])[0]

    def check_many(
        self,
        pairs: Sequence[Pair],
        prompt_normals: Sequence[str | None] | None = None,
        answer_normals: Sequence[str | None] | None = None,
    ) -> list[list[Hit]]:
        """`check` of each pair. The answers' words are cut and hashed all at once in numpy, and the
        repetition rule counts the 2- and 5-grams of all of them at once: exact on every answer for
        what per-answer Counters cost behind a zlib pre-check, which passed over ~1 loop in 200.
        Curation checks thousands a call."""
        results: list[list[Hit]] = []
        todo = []  # the pairs with an answer to read
        for k, pair in enumerate(pairs):
            failure = self.failure(pair) or self.reasoning_only(pair)
            if failure is not None:
                results.append([failure] if failure[0] in self.enabled else [])
                continue
            results.append([])  # the answer rules' hits, below
            if (pair.response or "").strip():  # else all reasoning, which training sees: nothing to read
                todo.append(k)
        # every answer's lower-cased words at once: the repetition rule compares them, the others count them
        lowers = [(pairs[k].response or "").lower() for k in todo]
        words = split_words(lowers)
        counts = np.bincount(words.doc, minlength=len(todo)).tolist()
        forms = [
            AnswerForms(
                pairs[k],
                lower,
                n,
                prompt_normals[k] if prompt_normals is not None else None,
                answer_normals[k] if answer_normals is not None else None,
            )
            for k, lower, n in zip(todo, lowers, counts, strict=True)
        ]
        if "malformed.repetition" in self.enabled:
            for a, detail in zip(forms, _repetition(self.cfg, forms, words), strict=True):
                a.repetition = detail
        for k, a in zip(todo, forms, strict=True):
            results[k] = self._apply(a)
        return results

    def _apply(self, a: AnswerForms) -> list[Hit]:
        hits = []
        for name, rule in self._active:
            if (detail := rule(a.pair, a)) is not None:
                hits.append((name, detail))
        return hits

    # --- failure ------------------------------------------------------------------------------

    def failure(self, pair: Pair) -> Hit | None:
        """No answer at all, an API-side error, an empty/whitespace answer, or a row that was not text."""
        if pair.finish_reason == "malformed":  # curate/pairs.py: an imported row whose values were not text
            return ("failure.malformed", "prompt or response not text")
        if pair.response is None and not pair.reasoning:
            return ("failure.api", "no answer")
        if pair.finish_reason in ("error", "content_filter"):
            return ("failure.api", f"finish_reason={pair.finish_reason}")
        if not (pair.response or "").strip() and not pair.reasoning:
            return ("failure.empty", "empty answer")
        return None

    def reasoning_only(self, pair: Pair) -> Hit | None:
        """A reasoning teacher's pair whose answer is all reasoning: cut off before it ended, or
        complete with no answer after it (kept when training sees the reasoning, where it is all
        the model said; failure.empty when there is no reasoning either)."""
        if not pair.reasoning or (pair.response or "").strip():
            return None
        if pair.finish_reason == "length":
            return ("truncated.reasoning", "the reasoning was cut before any answer")
        return None if self.with_reasoning else ("reasoning.no-answer", "reasoning but no answer")

    # --- refusal ------------------------------------------------------------------------------

    def refusal(self, pair: Pair, a: AnswerForms) -> str | None:
        """A refusal or AI disclaimer: a listed phrase anywhere, or a refusal in the opening sentences
        (a first-person "cannot" + doing the task, a disclaimer opener + a refusal or a "don't have",
        an apology with a "cannot" in a short answer) that is not followed by the task done anyway."""
        text = _straight(a.lower)
        if self._phrase_search.find_matches_as_indexes(text) and (m := self._refusal.search(text)):
            return f'"{m.group(0)}"'
        return _opening_refusal(text, a.n_words)

    # --- truncation ---------------------------------------------------------------------------

    def truncated_length(self, pair: Pair, a: AnswerForms) -> str | None:
        return "finish_reason=length" if pair.finish_reason == "length" else None

    def truncated_mid_sentence(self, pair: Pair, a: AnswerForms) -> str | None:
        """A prose answer whose last line stops without closing punctuation. Structured answers
        (lists, tables, key: value lines, code, parses, menus) end so when complete: unless the
        teacher said it ran out of tokens, their end is not read as a cut."""
        if a.n_words < self.cfg.truncation_min_words or a.fences[0]:
            return None  # short answers (labels, names) need no full stop; open fences are another rule
        last = a.text.rstrip().rsplit("\n", 1)[-1].strip()
        if len(last.split(None, 2)) < 3 or _LIST_OR_MARKUP.match(last) or last[-1] in _TERMINAL:
            return None
        if pair.finish_reason != "length" and _structured(a.text):
            return None
        if last[-1].isdigit():
            return None  # "… is 42" ends a sentence as often as not
        return f"ends with {last[-30:]!r}"

    def truncated_code_fence(self, pair: Pair, a: AnswerForms) -> str | None:
        return "code block never closed" if a.fences[0] else None

    # --- malformed ----------------------------------------------------------------------------

    def malformed_fence(self, pair: Pair, a: AnswerForms) -> str | None:
        return a.fences[1]

    def malformed_json(self, pair: Pair, a: AnswerForms) -> str | None:
        if "json" not in pair.prompt.lower():  # every way of asking names it: skip the regex
            return None
        if not _ASKS_JSON.search(pair.prompt) or _PROGRAMMING_QUESTION.search(pair.prompt):
            return None
        for candidate in _json_candidates(a.text):
            try:
                json.loads(candidate)
                return None
            except ValueError:
                continue
        return "JSON was asked for; none parses"

    def malformed_mojibake(self, pair: Pair, a: AnswerForms) -> str | None:
        if a.text.isascii():  # mojibake is made of non-ASCII characters; most answers have none
            return None
        if "\ufffd" in a.text:
            return "U+FFFD replacement character"
        from ftfy.badness import is_bad

        return "mojibake (mis-decoded text)" if is_bad(a.text) else None

    def malformed_echo(self, pair: Pair, a: AnswerForms) -> str | None:
        prompt = normalize(pair.prompt) if a.prompt_normal is None else a.prompt_normal
        if not prompt or prompt.count(" ") + 1 < self.cfg.echo_min_words:
            return None
        if a.normal is not None and not a.normal.startswith(prompt):
            return None  # the start's normal form is the whole's up to a cut last word: no echo either
        if a.normal is None and len(head := fold(a.text[:64]).split()) > 1 and head[0] != prompt.split(" ", 1)[0]:
            return None  # an echo's first word is the prompt's (this one is whole: a word follows it)
        answer = normalize(a.text[: 2 * len(pair.prompt) + 64])  # only its start can echo the prompt
        if answer == prompt and len(a.text) <= 2 * len(pair.prompt) + 64:
            return "the answer is the prompt"
        return "the answer starts by repeating the whole prompt" if answer.startswith(prompt + " ") else None

    def malformed_repetition(self, pair: Pair, a: AnswerForms) -> str | None:
        """Repetition loops, by the Gopher rules (see `_repetition`, which `check_many` runs)."""
        return a.repetition

    # --- length and language ------------------------------------------------------------------

    def length_short(self, pair: Pair, a: AnswerForms) -> str | None:
        n = a.n_words
        return f"{n} words < {self.cfg.min_response_words}" if n < self.cfg.min_response_words else None

    def length_long(self, pair: Pair, a: AnswerForms) -> str | None:
        if len(a.text) > self.cfg.max_response_chars:
            return f"answer of {len(a.text)} chars > {self.cfg.max_response_chars}"
        if len(pair.prompt) > self.cfg.max_prompt_chars:
            return f"prompt of {len(pair.prompt)} chars > {self.cfg.max_prompt_chars}"
        return None

    def language(self, pair: Pair, a: AnswerForms) -> str | None:
        import py3langid

        prose = _CODE_BLOCK.sub(" ", a.text)[:2000]
        if len(prose.strip()) < self.cfg.language_min_chars:
            return None
        lang, _ = py3langid.classify(prose)
        return None if lang in self.cfg.languages else f"language {lang}"


_STRUCTURED_LINE = re.compile(
    r"^\s*(?:[-*+>#|•]|\d+[.):]|[a-z][.)]\s)"  # list items, quotes, headings, table rows
    r"|^[^\s:][^:\n]{0,40}:(?:\s|$)"  # key: value
    r"|\|\s*$|\t"  # table ends, tab-separated columns
    r"|(?:\S+/[A-Z$]{2,5}\b.*){2}"  # tagged words: The/DT cat/NN
    r"|^\s*\(|\)\s*$"  # bracketed parses, calls
    r"|[;{}=\[\]]\s*$|^\s{2,}\S"  # code: statement ends, braces, assignments, indentation
    r"|(?:[^,\n]+,){2,}[^,\n]+$"  # CSV rows
    r"|[$€£¥]\s?\d|\d[.,]\d\d\s*$|\d{1,2}:\d\d",  # prices, times (menus, timetables)
    re.IGNORECASE,
)
_SHORT_LINE_WORDS = 6


def _structured(text: str) -> bool:
    """Whether an answer is laid out in lines rather than sentences: most of its lines are list
    items, table rows, key: value pairs, code, parses, CSV, prices or times — or short fragments
    (an outline, a menu), and its last line is one of them."""
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    if len(lines) < 2:
        return False
    shaped = [bool(_STRUCTURED_LINE.search(ln)) or len(ln.split()) <= _SHORT_LINE_WORDS for ln in lines]
    return shaped[-1] and sum(shaped) >= 0.6 * len(lines)


def _quoted(text: str, at: int) -> bool:
    """Whether position `at` of a text is inside a quotation (an odd number of quote marks before it)."""
    before = text[:at]
    return (before.count('"') + before.count("“") + before.count("”")) % 2 == 1


# Every opening refusal holds one of these...
_MAY_REFUSE = ("not", "n't", "unable", "decline", "refuse", "sorry", "apologi", "unfortunately", "regrettably",
               "nicht", "je ne", "no puedo")  # fmt: skip
# ... and one of these, or an apology opening, in the words _REFUSAL_SENTENCE, _LACKS or the
# apology rule read ("not" alone is everywhere; "cannot", "for me to" or "don't have" are rarer).
# The cues are searched first: ~6 answers in 7 hold none and are passed over. Cues that overlap
# lie in one sentence, so the leftmost of them tells where there is one.
_REFUSAL_CUES = ("cannot", "can not", "can't", "won't", "will not", "decline", "refuse", "unable", "not able",
                 "not allowed", "not permitted", "comfortable", "not going", "not willing", "think i",
                 "not something i", "for me to", "don't have", "do not have", "don't possess", "do not possess",
                 "kann ich", "ich kann", "je ne", "no puedo")  # fmt: skip
_LEFTMOST = ahocorasick_rs.MatchKind.LeftmostFirst
_CUE_SEARCH = ahocorasick_rs.AhoCorasick(_REFUSAL_CUES, matchkind=_LEFTMOST)
_HEAD = 600  # characters the opening sentences are read from


def _may_refuse(head: str, cued: bool) -> bool:
    """`cued`: the head holds one of _REFUSAL_CUES."""
    return (cued or bool(_APOLOGY_OPENER.match(head))) and _holds_any(head, _MAY_REFUSE)


def _holds_any(text: str, words: tuple[str, ...]) -> bool:
    for word in words:  # noqa: SIM110 (a loop: any() over a generator costs ~25% more)
        if word in text:
            return True
    return False


def _opening_refusal(text: str, n_words: int) -> str | None:
    """A refusal in the first sentences of a lower-cased answer, or None (see Filters.refusal)."""
    head = text[:_HEAD]
    cues = [(start, end) for _, start, end in _CUE_SEARCH.find_matches_as_indexes(head)]
    if not _may_refuse(head, bool(cues)):
        return None
    found = [m for _, m in zip(range(OPENING_SENTENCES), _SENTENCE.finditer(head), strict=False)]
    if not found:
        return None
    sentences = [m.group(0) for m in found]
    opening = " ".join(sentences)
    disclaimer: bool | None = None
    for k, sentence in enumerate(sentences):
        lo, hi = found[k].span()
        if not any(lo <= start and end <= hi for start, end in cues):
            continue  # every sentence the two patterns below match holds a cue
        if disclaimer is None:
            disclaimer = bool(_AI_OPENER.search(opening))
        hit = _REFUSAL_SENTENCE.search(sentence) or (_LACKS.search(sentence) if disclaimer else None)
        if hit is None or _quoted(opening, opening.find(sentence) + hit.start()):
            continue  # "I can't do this," the robot said: a story's words, not the teacher's
        after = sentence[hit.end() :] + " " + (sentences[k + 1][:40] if k + 1 < len(sentences) else "")
        rest = n_words - sum(len(x.split()) for x in sentences[: k + 1])
        if _PIVOT.search(after) and rest >= PARTIAL_HELP_WORDS:
            return None  # "I can't give medical advice, but here is …": the task is done after all
        return f'"{hit.group(0).strip()}"'
    if n_words <= APOLOGY_MAX_WORDS and _APOLOGY_OPENER.match(opening) and (neg := _NEGATION.search(opening)):
        return f'apology with "{neg.group(0)}"'
    return None


def _trie_pattern(phrases: list[str]) -> str:
    r"""One regex for many literal phrases, each starting at a word boundary, factored by common
    prefixes ("i(?:'m (?:sorry|…)|…)"). Python's re tries a flat alternation's branches one by one
    at every position; the factored form decides after a character or two, ~2× faster on answers,
    with the same matches. The boundary is asserted after the first character (`a(?<=\ba)…`), not
    before it: a pattern that opens with a character set lets re skip ahead to candidate
    characters (another ~15%)."""
    trie: dict[str, Any] = {}
    for phrase in phrases:
        node = trie
        for ch in phrase:
            node = node.setdefault(ch, {})
        node[""] = {}  # a phrase ends here

    def build(node: dict[str, Any]) -> str:
        branches = [re.escape(ch) + build(child) for ch, child in sorted(node.items()) if ch]
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body  # greedy: the longest phrase wins

    first = sorted(ch for ch in trie if ch)
    return "(?:" + "|".join(rf"{re.escape(ch)}(?<=\b{re.escape(ch)})" + build(trie[ch]) for ch in first) + ")"


def _fence_state(text: str) -> tuple[bool, str | None]:
    """Walk the ``` / ~~~ fences: (a block is left open at the end, why the fences are malformed).

    An opening fence may carry an info string ("```python"); a closing one may not. A second
    opening while a block is open (an info string before the block was closed) is malformed.
    """
    if "```" not in text and "~~~" not in text:
        return False, None
    open_fence: str | None = None
    bad = None
    for m in _FENCE.finditer(text):
        fence, info = m.group(1), m.group(2)
        if open_fence is None:
            open_fence = fence
        elif fence[0] == open_fence[0] and len(fence) >= len(open_fence):
            if info and bad is None:
                bad = f"fence {fence}{info} opens a block inside an open block"
            if not info:
                open_fence = None
    return open_fence is not None, bad


def _json_candidates(text: str) -> list[str]:
    """The whole answer, its fenced code blocks, and the span from the first {/[ to the last }/]."""
    out = [text.strip()]
    out += [m.group(2) for m in _CODE_BLOCK.finditer(text)]
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    end = max(text.rfind("}"), text.rfind("]"))
    if starts and end > min(starts):
        out.append(text[min(starts) : end + 1])
    return out


def _repetition(cfg: CurateFiltersConfig, forms: Sequence[AnswerForms], words: Words) -> list[str | None]:
    """malformed.repetition of many answers, by the Gopher rules on their lower-cased words: the
    share of characters in repeated lines, in the most frequent 2-gram (seen over twice), and in
    5-grams seen more than once. The n-grams of all answers are counted at once: each word is a
    number (`dedup.split_words` of the lower-cased answers), each n-gram the hash of its words,
    counted in hash tables (`_counts`)."""
    out: list[str | None] = [None] * len(forms)
    judged = np.zeros(len(forms), dtype=bool)  # long enough, and not already repeated lines
    for k, a in enumerate(forms):
        if a.n_words < cfg.repetition_min_words:
            continue
        if "\n" in a.text and (share := _dup_line_share(a.text)) > cfg.max_dup_line_chars:
            out[k] = f"{share:.0%} of the text is repeated lines"
        else:
            judged[k] = True
    if not judged.any():
        return out
    # every answer's n-grams are counted (the few not judged cost less than picking the others out)
    ids, lens, doc = words.hashes, words.chars, words.doc
    counts = np.bincount(doc, minlength=len(forms))
    chars = np.maximum(np.bincount(doc, weights=lens, minlength=len(forms)), 1)
    # the most frequent 2-gram of each answer (the first seen of equals, as Counter.most_common)
    at, seen = _bigram_counts(ids, doc)
    top = np.zeros(len(forms), dtype=np.int64)
    np.maximum.at(top, doc[at], seen)
    first = at[(seen == top[doc[at]]) & (top[doc[at]] > 2) & judged[doc[at]]]
    docs, where = np.unique(doc[first], return_index=True)
    for d, i in zip(docs.tolist(), first[where].tolist(), strict=True):
        share = top[d] * (lens[i] + lens[i + 1]) / chars[d]
        if share > cfg.max_top_bigram_chars:
            out[d] = f"2-gram {words.word(i) + ' ' + words.word(i + 1)!r} covers {share:.0%}"
    # the characters of words inside a 5-gram seen more than once (answers of ≥ 10 words). Each of
    # a repeated 5-gram's 2-grams is repeated too: only where all four are are 5-grams counted
    twice = np.zeros(len(ids), dtype=bool)
    twice[at[seen > 1]] = True
    at = np.flatnonzero(twice[:-4] & twice[1:-3] & twice[2:-2] & twice[3:-1])  # 5-grams that may repeat
    at = at[(doc[at] == doc[at + 4]) & (counts[doc[at]] >= 10)]
    seen = _counts(window_hashes_at(ids, at, 5), doc[at])
    repeated = at[seen > 1]
    covered = np.zeros(len(ids), dtype=bool)
    for j in range(5):
        covered[repeated + j] = True
    shares = np.bincount(doc, weights=lens * covered, minlength=len(forms)) / chars
    for d in np.flatnonzero((shares > cfg.max_dup_ngram_chars) & judged).tolist():
        if out[d] is None:
            out[d] = f"{shares[d]:.0%} of the text is in repeated 5-grams"
    return out


def _bigram_counts(ids: NDArray[np.uint64], doc: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """The start of each 2-gram inside one text, and how often its text holds that 2-gram."""
    at = np.flatnonzero(doc[:-1] == doc[1:])
    return at, _counts(window_hashes_at(ids, at, 2), doc[at])


_COUNT_SLICE = 1 << 15  # keys counted in one hash table: one that stays in cache is ~4x faster a key


def _counts(key: NDArray[np.uint64], doc: NDArray[np.int64]) -> NDArray[np.int64]:
    """How often each key occurs among its own text's keys (`doc` ascending). A few texts are
    counted at a time, cut where a text begins; their keys are told apart by their text's number."""
    seen = np.empty(len(key), dtype=np.int64)
    cuts = np.unique(np.r_[np.searchsorted(doc, doc[_COUNT_SLICE::_COUNT_SLICE]), len(key)])
    cuts = cuts[cuts > 0]
    lo = 0
    for hi in cuts.tolist():
        with np.errstate(over="ignore"):
            salted = key[lo:hi] + doc[lo:hi].astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        codes = pd.factorize(salted)[0]
        seen[lo:hi] = np.bincount(codes)[codes]
        lo = hi
    return seen


def _dup_line_share(text: str) -> float:
    """Share of the characters of lines of 3+ words that are in a line seen before."""
    lines = [ln.strip() for ln in text.splitlines() if len(ln.split()) >= 3]
    total = sum(len(ln) for ln in lines)
    seen: set[str] = set()
    dup = 0
    for ln in lines:
        if ln in seen:
            dup += len(ln)
        seen.add(ln)
    return dup / total if total else 0.0
