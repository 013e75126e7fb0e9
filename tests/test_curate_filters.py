"""Each curation filter on written examples: one that must fire and one that must not."""

from __future__ import annotations

import pytest

from distill4all.config import CurateFiltersConfig
from distill4all.curate.filters import Filters, Pair

GOOD = (
    "Trim the stems at an angle every couple of days, change the water often, keep the vase out of "
    "direct sun, and remove leaves that sit below the waterline."
)

MORE = (
    "Flower food from the shop helps too, and a drop of bleach keeps bacteria down. Tulips keep growing in "
    "the vase, so trim them shorter than the other stems if you want an even bouquet."
)
LOOP = " ".join(["I like to go to the park and play with my dog."] * 8)

CASES: list[tuple[str, Pair, Pair]] = [
    # rule, a pair it must drop, a similar pair it must keep
    ("failure.api", Pair("Hi?", None), Pair("Hi?", "Hello! How can I help?")),
    ("failure.api", Pair("Hi?", "partial", "error"), Pair("Hi?", "Hello! How can I help?", "stop")),
    ("failure.empty", Pair("Write a poem.", "  \n "), Pair("Write a poem.", "Roses are red.")),
    (
        "refusal",
        Pair("What do you think of jazz?", "As an AI language model, I don't have personal opinions on music."),
        Pair("What do you think of jazz?", "Jazz grew out of blues and ragtime in New Orleans."),
    ),
    (
        "refusal",
        Pair("Write malware.", "I’m sorry, but I cannot help with that request."),
        Pair("Is sorry a verb?", "No: 'sorry' is an adjective, as in 'I am sorry I was late'."),
    ),
    (
        "truncated.length",
        Pair("Explain rain.", "Rain forms when water vapour condenses into", "length"),
        Pair("Explain rain.", "Rain forms when water vapour condenses into drops.", "stop"),
    ),
    (
        "truncated.mid-sentence",
        Pair(
            "How do I fix a squeaky hinge?",
            "Lift the hinge pin out, rub it with petroleum jelly or a silicone spray and then put it back in the",
        ),
        Pair(
            "How do I fix a squeaky hinge?",
            "Lift the hinge pin out, rub it with petroleum jelly or a silicone spray and then put it back in place.",
        ),
    ),
    (
        "truncated.code-fence",
        Pair("Reverse a list in Python.", "Use slicing:\n\n```python\nnums = [1, 2, 3]\nrev = nums[::-1]\n"),
        Pair("Reverse a list in Python.", "Use slicing:\n\n```python\nnums = [1, 2, 3]\nrev = nums[::-1]\n```\n"),
    ),
    (
        "malformed.fence",
        Pair("Show two files.", "```python\nprint(1)\n```js\nconsole.log(1)\n```\n```"),
        Pair("Show two files.", "```python\nprint(1)\n```\n\n```js\nconsole.log(1)\n```"),
    ),
    (
        "malformed.json",
        Pair("Return a JSON object with the keys name and age for Bob, 31.", '{"name": "Bob", "age": 31,}'),
        Pair(
            "Return a JSON object with the keys name and age for Bob, 31.",
            'Here it is:\n```json\n{"name": "Bob", "age": 31}\n```',
        ),
    ),
    (
        "malformed.json",
        Pair("Answer in JSON: list three colours.", "Red, green and blue."),
        Pair("How do I parse JSON in Python?", "Use json.loads(text), which returns dicts and lists."),
    ),
    (
        "malformed.mojibake",
        Pair("Where did you eat?", "We ate at the cafÃ© near the stationâ€”it was great."),
        Pair("Where did you eat?", "We ate at the café near the station—it was great."),
    ),
    (
        "malformed.mojibake",
        Pair("Spell it.", "The word is na\ufffdve."),
        Pair("Spell it.", "The word is naïve."),
    ),
    (
        "malformed.echo",
        Pair("What is the capital of Australia?", "What is the capital of Australia?"),
        Pair("What is the capital of Australia?", "Canberra is the capital of Australia."),
    ),
    (
        "malformed.echo",
        Pair("Name three primary colours please", "Name three primary colours please. Red, yellow and blue."),
        Pair("Name three primary colours please", "Red, yellow and blue are the three primary colours."),
    ),
    ("malformed.repetition", Pair("Tell me about your day.", LOOP), Pair("Tell me about your day.", GOOD + " " + MORE)),
    (
        "malformed.repetition",
        Pair("Count.", "one two " * 40 + "done."),
        Pair("Count.", " ".join(f"item{i}" for i in range(80)) + "."),
    ),
    ("length.long", Pair("Say a lot.", "word " * 5000), Pair("Say a lot.", GOOD)),
]


def test_many_answers_checked_at_once_are_each_judged_alone() -> None:
    """The repetition rule counts the n-grams of all answers in one table: a sentence that each of
    eight answers says once is no loop, and each answer's verdict is the one it gets alone."""
    filters = Filters(CurateFiltersConfig())
    sentence = "I like to go to the park and play with my dog in the afternoon sun."
    alone = [Pair(f"Q{i}?", f"{sentence} Then number {i} went home, " + " ".join(f"w{i}x{k}" for k in range(30)))
             for i in range(8)]  # fmt: skip
    loops = [
        Pair("Day?", LOOP),  # repeated 5-grams
        Pair("Count.", "one two " * 40 + "done."),  # the top 2-gram
        Pair("List.", "\n".join(["Buy milk and eggs today at the shop."] * 6) + "\n" + GOOD),  # repeated lines
    ]
    mixed = [*alone[:4], *loops, *alone[4:], Pair("Hi?", None), Pair("Hi?", GOOD + " " + MORE)]
    together = filters.check_many(mixed)
    assert together == [filters.check(p) for p in mixed]
    assert [[name for name, _ in hits] for hits in together[4:7]] == [["malformed.repetition"]] * 3
    details = [hits[0][1] for hits in together[4:7]]
    assert "repeated 5-grams" in details[0] and "'one two'" in details[1] and "repeated lines" in details[2]
    assert all(not hits for hits in together[:4] + together[7:11] + together[12:])


@pytest.mark.parametrize(("rule", "bad", "good"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_rule_fires_on_bad_and_not_on_good(rule: str, bad: Pair, good: Pair) -> None:
    filters = Filters(CurateFiltersConfig())
    assert rule in [name for name, _ in filters.check(bad)], filters.check(bad)
    assert filters.check(good) == [], filters.check(good)


def test_good_answers_pass_every_rule() -> None:
    filters = Filters(CurateFiltersConfig(languages=["en"]))
    for answer in (
        GOOD,
        "Canberra.",
        "positive",
        "- apples\n- bananas\n- pears",
        "Steps:\n1. Open the file\n2. Read it\n3. Close it",
        '```bash\nfor f in *.txt; do echo "$f"; done\n```',
        "The answer is 42",
    ):
        assert filters.check(Pair("A question?", answer)) == [], answer


def test_length_short_and_language_are_configurable() -> None:
    short = Pair("Is it raining?", "yes")
    assert Filters(CurateFiltersConfig()).check(short) == []
    assert [h[0] for h in Filters(CurateFiltersConfig(min_response_words=3)).check(short)] == ["length.short"]
    german = Pair("Wie spät ist es?", "Es ist jetzt kurz nach drei Uhr am Nachmittag, und die Sonne scheint hell.")
    assert Filters(CurateFiltersConfig()).check(german) == []  # no language filter unless asked
    hits = Filters(CurateFiltersConfig(languages=["en"])).check(german)
    assert hits == [("language", "language de")]
    assert Filters(CurateFiltersConfig(languages=["en", "de"])).check(german) == []


def test_disable_a_rule_or_a_family_and_extra_phrases() -> None:
    bad = Pair("Q?", "As an AI language model I cannot say.\n```python\nx = 1\n")
    names = [h[0] for h in Filters(CurateFiltersConfig()).check(bad)]
    assert names == ["refusal", "truncated.code-fence"]
    assert [h[0] for h in Filters(CurateFiltersConfig(disable=["refusal"])).check(bad)] == ["truncated.code-fence"]
    assert Filters(CurateFiltersConfig(disable=["refusal", "truncated"])).check(bad) == []
    custom = Filters(CurateFiltersConfig(refusal_phrases=["I would rather not"]))
    assert [h[0] for h in custom.check(Pair("Q?", "I would rather not answer that."))] == ["refusal"]


def test_every_hit_names_a_known_rule_and_a_detail() -> None:
    from distill4all.config import FILTER_RULES

    filters = Filters(CurateFiltersConfig(min_response_words=2, languages=["en"]))
    for _, bad, _ in CASES:
        for name, detail in filters.check(bad):
            assert name in FILTER_RULES and detail


def test_factored_refusal_pattern_matches_as_the_flat_alternation() -> None:
    import random
    import re

    from distill4all.curate.filters import REFUSAL_PHRASES, _trie_pattern

    # built-in phrases, and custom ones that open with a non-word character, where \b means
    # "after a word character"
    phrases = [p.lower() for p in REFUSAL_PHRASES] + ["*sigh* i can't", "(as an ai)", "-- no"]
    flat = re.compile("|".join(rf"\b{re.escape(p)}" for p in sorted(phrases, key=len, reverse=True)))
    factored = re.compile(_trie_pattern(phrases))
    rng = random.Random(0)
    words = [*" ".join(phrases).split(), "the", "a", "model", "aide", "sorry", "i", "as", "x", "(", "--"]
    texts = [
        rng.choice([" ", "", "-", "\n"]).join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(3000)
    ]
    texts += [f"so {p} then" for p in phrases] + [f"so{p}" for p in phrases] + [p[:-1] for p in phrases]
    for text in texts:
        a, b = flat.search(text), factored.search(text)
        assert (a and (a.start(), a.group(0))) == (b and (b.start(), b.group(0))), text


def test_empty_refusal_phrase_is_refused() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="refusal phrase is empty"):
        CurateFiltersConfig(refusal_phrases=["I would rather not", " "])


def test_given_normal_forms_change_nothing() -> None:
    from distill4all.curate.dedup import normalize

    filters = Filters(CurateFiltersConfig(min_response_words=2, languages=["en"]))
    prompt = "Name three fruits that are red, please"
    echoes = [  # the echo rule reads the answer's start; the whole answer's normal form only skips
        Pair(prompt, f"{prompt}!  Apples, cherries and strawberries."),
        Pair(prompt, f"{prompt[:-3]}...{prompt[-3:]} — apples"),
        Pair(prompt, f" {'.' * 20} ".join(prompt.split()) + " apples."),  # spread past the part that is read
        Pair(prompt, prompt.upper()),
        Pair(prompt, "Name three fruits that are redder"),
        Pair(prompt, "." * 70 + prompt),  # no word where the first-word check reads: the whole rule decides
        Pair(prompt, "x" * 80 + " " + prompt),  # a first word longer than that
        Pair(prompt, "Sure! " + prompt),  # another first word
    ]
    for _, bad, good in [*CASES, *((None, e, e) for e in echoes)]:
        for pair in (bad, good):
            expected = filters.check(pair)
            assert filters.check(pair, normalize(pair.prompt), normalize(pair.response or "")) == expected
    assert [h[0] for h in filters.check(echoes[0])] == ["malformed.echo"]
    assert not filters.check(echoes[2])  # its whole normal form starts with the prompt; its start's does not
    assert [h[0] for h in filters.check(echoes[5])] == ["malformed.echo"]
    assert not filters.check(echoes[6]) and not filters.check(echoes[7])
