"""Property tests with Hypothesis: hostile text through curation, hostile bodies through `serve`.

Curation: random pairs files (any Unicode — lone surrogates, NULs, RTL marks, HTML/JS, Markdown,
matplotlib mathtext, the dedup batch separator, huge texts — as JSON escapes, raw bytes that are
not UTF-8, broken lines) through the import, the filters, dedup, the data map (HTML and PNG) and
the report: the only error allowed is a UserError naming the file and line. Prompt sources (JSONL,
JSON, CSV) with rows that are not text — bytes that are not UTF-8, lone surrogates escaped as
\ud800, nesting 100,000 deep, numbers past Python's digit limit, rows of the wrong shape — are read
into a store: with `on_error: skip` every such row is skipped and counted and every other stored,
with `on_error: fail` the first is a DataError naming its file and line.

Serving: random JSON bodies (valid field names with values of any type and size, random keys,
random nesting) to both engines: every answer is a 2xx or a 4xx with an OpenAI error body, and the
server is alive after each. Example counts are fixed per test (EXAMPLES) so CI time stays bounded.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from distill4all.collect.gather import load_sources
from distill4all.config import CollectConfig, CurateConfig
from distill4all.curate import curation, pairs
from distill4all.errors import DataError, UserError
from distill4all.store import Store
from runtime_models import trained_export, trained_tiny
from test_server import running_server

EXAMPLES = {"curate": 30, "serve": 200, "sources": 60}

HOSTILE = [
    "qqdocsepqq", "QqDocSepQq!", "<!--<script>", "</script><script>alert(1)</script>", "<b>&amp;</b>", "\u2028\u2029",
    "\x00", "\u202e\u2066RTL\u2069", "$x^$", "$\\frac{x}{$", "| a | b |\n|---|", "```python\n", "# heading\n---",
    "\ufeff", "\U0001f600", "e\u0301", "\\u0000", "???", "...", "\t\r\n", " ", "",
]  # fmt: skip


def texts(chars: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    repeated = st.sampled_from(["word ", "<a>", "$", "é", "\x00"])
    return st.one_of(
        st.text(chars, max_size=60),
        st.lists(st.one_of(st.sampled_from(HOSTILE), st.text(chars, max_size=8)), max_size=8).map("".join),
        st.builds(lambda piece, k: piece * k, repeated, st.integers(1, 20_000)),  # huge texts
    )


hostile_text = texts(st.characters(codec=None, exclude_categories=()))  # every code point, lone surrogates too
valid_text = texts(st.characters(codec="utf-8"))  # every code point that is text
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text)


UNFIT = ["not utf-8", "surrogate", "deep", "huge number"]  # rows no parser may choke on
_MARK = "\x00unfit\x00"  # where a row's unfit part goes; json.dumps writes it as \u0000unfit\u0000


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@st.composite
def unfit_line(draw: st.DrawFn, kind: str, row: dict[str, Any], field: str) -> bytes:
    """`row` as a JSON line that cannot be stored as text, in the way `kind` names: in its `field`
    or in a field of its own."""
    at = draw(st.sampled_from([field, "meta"]))
    mark = json.dumps(_MARK).encode()
    line = json.dumps({**row, at: _MARK}).encode()
    if kind == "surrogate":  # escaped as \ud800: a value, or a key
        lone = draw(st.sampled_from(["\ud800", "\udfff", "x\udc80", "\udbff!"]))
        return json.dumps({**row, at: draw(st.sampled_from([lone, {lone: 1}, [lone]]))}).encode()
    if kind == "not utf-8":
        raw = draw(st.sampled_from([b"\xff", b"\x80", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"]))
        return line.replace(mark, b'"a' + raw + b'b"', 1)
    if kind == "deep":
        return line.replace(mark, nested(draw(st.sampled_from([100, 1_001, 100_000]))).encode(), 1)
    assert kind == "huge number"
    return line.replace(mark, b"9" * 5_000, 1)


@st.composite
def pair_line(draw: st.DrawFn, broken: bool) -> bytes:
    """One line of a pairs file: a pair of texts of any kind, or (in a broken file) anything at all."""
    kind = draw(st.sampled_from(["pair", "pair", "json", "bytes", *UNFIT])) if broken else "pair"
    if kind in UNFIT:
        row = {"prompt": draw(valid_text.filter(lambda t: bool(t.strip()))), "response": draw(valid_text)}
        return draw(unfit_line(kind, row, draw(st.sampled_from(["prompt", "response"]))))
    if kind == "json":
        fields = st.dictionaries(st.sampled_from(["prompt", "response", "source", "x"]), json_scalar, max_size=4)
        return json.dumps(draw(json_scalar | fields)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    text = hostile_text if broken else valid_text
    prompt = draw(text if broken else text.filter(lambda t: bool(t.strip())))  # a blank prompt is a row error
    row: dict[str, Any] = {"prompt": prompt, "response": draw(text), "source": draw(text)}
    if draw(st.booleans()):  # metadata nested as deep as a row may
        row["meta"] = json.loads(nested(draw(st.sampled_from([1, 50, 99]))))
    return json.dumps(row).encode()  # ASCII: lone surrogates travel as \ud800 escapes


# two plain pairs first, so that a file is never "nothing to curate" by the luck of the draw
PLAIN = [json.dumps({"prompt": f"Plain question {i}?", "response": f"A plain answer {i}.", "source": "plain"}).encode()
         for i in range(2)]  # fmt: skip
pairs_file = st.sampled_from([False, False, True]).flatmap(  # a third of the files broken
    lambda broken: st.lists(pair_line(broken), min_size=1, max_size=14).map(lambda ls: b"\n".join(PLAIN + ls) + b"\n")
)


def map_data(page: str) -> dict[str, Any]:
    """The data embedded in the map page, read the way a browser splits it: up to the first </script>."""
    head = '<script id="datamap-data" type="application/json">'
    assert page.count(head) == 1 and page.count("<script") == 2, "text changed the page's structure"
    start = page.index(head) + len(head)
    return json.loads(page[start : page.index("</script>", start)])  # type: ignore[no-any-return]


def test_hostile_pairs_files_curate_or_fail_with_file_and_line(model_cache: Path,
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:  # fmt: skip
    outcomes: dict[str, int] = {}
    cfg = CurateConfig.model_validate({"embed": {"model": "minilm", "max_chars": 300}, "workers": 1,
                                       "map": {"max_points": 1000}})  # fmt: skip

    @settings(max_examples=EXAMPLES["curate"], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])  # fmt: skip
    @given(pairs_file)
    def one(content: bytes) -> None:
        folder = tmp_path_factory.mktemp("fuzz-curate")
        path = folder / "pairs.jsonl"
        path.write_bytes(content)
        with Store(folder / "store.sqlite") as store:
            try:
                pairs.import_pairs(store, path, "imported")
            except UserError as e:
                assert re.match(rf"{re.escape(str(path))}:\d+: \S", str(e)), str(e)
                outcomes["file:line error"] = outcomes.get("file:line error", 0) + 1
                return
            result = curation.curate(store, cfg, folder / "curate", title="fuzz", quiet=True)
        outcomes["curated"] = outcomes.get("curated", 0) + 1
        out = folder / "curate"
        assert len(result.rows) >= 2 and (out / "report.md").is_file() and (out / "train.jsonl").is_file()
        for line in (out / "train.jsonl").read_text(encoding="utf-8").split("\n")[:-1]:
            json.loads(line)  # every kept pair is one line of JSON (U+2028, U+0085 inside are text)
        shown = [i for i, r in enumerate(result.rows.responses) if r and r.strip()]
        data = map_data((out / "map.html").read_text(encoding="utf-8"))
        assert len(data["x"]) == len(shown) and len(data["prompt"]) == len(shown)
        assert (out / "map-source.png").is_file() and (out / "map-topic.png").is_file()

    one()
    assert sum(outcomes.values()) == EXAMPLES["curate"]
    assert outcomes.get("curated", 0) >= EXAMPLES["curate"] // 4, outcomes  # most files get through to the map
    print(f"fuzz curate: {EXAMPLES['curate']} pairs files, {outcomes}")


# --- collect sources ---------------------------------------------------------------------------

clean_value = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | valid_text,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(valid_text, inner, max_size=3),
                           max_leaves=6)  # fmt: skip
good_row = st.fixed_dictionaries({"prompt": valid_text}, optional={"id": clean_value, "meta": clean_value})
SOURCE_BAD = {"jsonl": [*UNFIT, "not json", "not an object", "no prompt"], "json": [*UNFIT, "not an object",
              "no prompt"], "csv": ["not utf-8", "fields"]}  # fmt: skip


@st.composite
def source_file(draw: st.DrawFn) -> tuple[str, bytes, list[int | str | None]]:
    """(format, content, per row: its line when it must be refused, else None) of a JSONL, JSON or
    CSV prompt source whose rows are good or not text in one of the ways SOURCE_BAD names."""
    fmt = draw(st.sampled_from(sorted(SOURCE_BAD)))
    kinds = draw(st.lists(st.sampled_from(["good", "good", *SOURCE_BAD[fmt]]), min_size=1, max_size=10))
    lines: list[bytes] = []
    for kind in kinds:
        if fmt == "csv" and kind == "good":
            buf = io.StringIO()
            csv.writer(buf).writerow([draw(valid_text), draw(valid_text)])
            lines.append(buf.getvalue().encode())
        elif fmt == "csv" and kind == "not utf-8":  # in a cell
            lines.append(b"caf" + draw(st.sampled_from([b"\xe9", b"\xff", b"\xed\xa0\x80"])) + b",x\r\n")
        elif fmt == "csv":  # a row with one field too many
            lines.append(b"a,b,c\r\n")
        elif kind == "good":
            lines.append(json.dumps(draw(good_row)).encode())
        elif kind in UNFIT:
            lines.append(draw(unfit_line(kind, draw(good_row), "prompt")))
        elif kind == "not json":
            lines.append(b"{oops " + draw(st.binary(max_size=20)).replace(b"\n", b" "))
        elif kind == "not an object":
            lines.append(json.dumps(draw(st.lists(clean_value, max_size=3) | valid_text | st.integers())).encode())
        else:  # no prompt, or one that is not text
            prompt = draw(st.none() | st.integers() | st.lists(valid_text, max_size=2))
            lines.append(json.dumps({"prompt": prompt} if prompt is not None else {}).encode())
    if fmt == "jsonl":
        return (
            fmt,
            b"".join(line + b"\n" for line in lines),
            [i + 1 if k != "good" else None for i, k in enumerate(kinds)],
        )
    if fmt == "json":  # one element a line, from line 2: "[" is line 1
        elements: list[int | str | None] = [
            f"{i + 2} (element {i})" if k != "good" else None for i, k in enumerate(kinds)
        ]
        return fmt, b"[\n" + b",\n".join(lines) + b"\n]\n", elements
    content, line = b"prompt,x\r\n", 1
    where: list[int | str | None] = []
    for kind, row in zip(kinds, lines, strict=True):  # a record ends on the line after its last break
        content += row
        line += len(re.findall(rb"\r\n|\r|\n", row))
        where.append(line if kind != "good" else None)
    return fmt, content, where


def test_hostile_sources_are_skipped_and_counted_or_fail_with_file_and_line(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    outcomes: dict[str, int] = {}
    quiet = Console(quiet=True)

    @settings(max_examples=EXAMPLES["sources"], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])  # fmt: skip
    @given(source_file(), st.sampled_from(["skip", "fail"]))
    def one(source: tuple[str, bytes, list[int | str | None]], on_error: str) -> None:
        fmt, content, bad = source
        folder = tmp_path_factory.mktemp("fuzz-source")
        path = folder / f"prompts.{fmt}"
        path.write_bytes(content)
        refused = [f"{path}:{where}: " for where in bad if where is not None]
        cfg = CollectConfig.model_validate({"sources": [{"name": "s", "format": fmt, "path": path, "on_error": on_error}],
                                            "teachers": [{"model": "m", "base_url": "http://127.0.0.1:9/v1"}]})  # fmt: skip
        with Store(folder / "store.sqlite") as store:
            try:
                stats = load_sources(store, cfg, 0, quiet)["s"]
            except DataError as e:  # the CLI's exit 2; anything else would be its exit 1
                assert on_error == "fail" and refused and str(e).startswith(refused[0]), (str(e), refused)
                outcomes["file:line error"] = outcomes.get("file:line error", 0) + 1
                return
            assert on_error == "skip" or not refused, refused
            stored = store.db.execute("SELECT meta FROM prompts").fetchall()
        assert (stats.rows, stats.bad_rows) == (len(bad), len(refused)), (stats, bad)
        assert stats.kept + stats.duplicates + stats.too_short == len(bad) - len(refused) == len(stored) + (
            stats.duplicates + stats.too_short)  # fmt: skip
        assert [e[: len(w)] for e, w in zip(stats.bad_examples, refused, strict=False)] == refused[:5]
        for (meta,) in stored:
            json.loads(meta)  # every row stored reads back
        outcomes["skipped" if refused else "clean"] = outcomes.get("skipped" if refused else "clean", 0) + 1

    one()
    assert sum(outcomes.values()) == EXAMPLES["sources"]
    assert min(outcomes.get(k, 0) for k in ("file:line error", "skipped")) >= EXAMPLES["sources"] // 10, outcomes
    print(f"fuzz sources: {EXAMPLES['sources']} files, {outcomes}")


# --- serve -------------------------------------------------------------------------------------

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "n", "stream", "stream_options", "stop",
          "seed", "logprobs", "top_logprobs", "echo", "suffix", "best_of", "user", "logit_bias", "response_format",
          "tools", "tool_choice"]  # fmt: skip
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)  # fmt: skip

# JSON Schemas as a client may write them, and as a hostile one may: regex patterns (shorthand
# classes, escapes GBNF lacks, huge or broken quantifiers, non-strings), $ref of any kind,
# properties/items that are not schemas, counts of any size (the grammar is written out from them)
PATTERN_BITS = ["^", "$", "\\d", "\\w", "\\s", "\\D", "\\W", "\\S", "\\b", "\\p{L}", "\\.", "\\-", "\\\\",
                "\\", "[a-z]", "[^\\d]", "[", "]", "(", ")", "(?:", "|", "*", "+", "?", "{3}", "{2,5}", "{1,}",
                "{99999999999}", "{0,3000}", "{-5}", "{x}", ".", "a", '"', "é", "\\u00e9"]  # fmt: skip
anchored = st.lists(st.sampled_from(PATTERN_BITS), min_size=1, max_size=8).map(lambda bits: "^" + "".join(bits) + "$")
pattern = anchored | anchored | st.lists(st.sampled_from(PATTERN_BITS), max_size=8).map("".join) | json_scalar
count = st.integers(0, 8) | st.integers(-(10**12), 10**12) | st.sampled_from([1000, 1001, 30_000, 10**9]) | json_scalar
ref = st.sampled_from(["#/$defs/a", "#/properties/a", "#", "#/nowhere", "https://example.com/s.json", "a.json"])
patterned = st.fixed_dictionaries({"type": st.just("string"), "pattern": pattern})
schema_leaf = st.one_of(
    patterned,
    st.fixed_dictionaries(
        {"type": st.just("string")},
        optional={"pattern": pattern, "minLength": count, "maxLength": count, "format": st.text(max_size=9)},
    ),
    st.fixed_dictionaries({"type": st.sampled_from(["integer", "number", "boolean", "null", "x"]) | json_scalar}),
    st.fixed_dictionaries({"$ref": ref | json_scalar}),
    st.fixed_dictionaries({"enum": st.lists(json_scalar, max_size=4)}),
    st.fixed_dictionaries({"const": json_scalar}),
    st.booleans(),
    json_scalar,
)
schema = st.recursive(schema_leaf, lambda inner: st.one_of(
    st.fixed_dictionaries({"type": st.just("object")}, optional={
        "properties": st.dictionaries(st.text(max_size=6), inner, max_size=4) | st.lists(inner, max_size=2),
        "required": st.lists(st.text(max_size=6), max_size=3) | json_scalar,
        "additionalProperties": st.booleans() | inner, "$defs": st.fixed_dictionaries({"a": inner})}),
    st.fixed_dictionaries({"type": st.just("array")}, optional={
        "items": inner | st.lists(inner, max_size=3), "prefixItems": st.lists(inner, max_size=3) | inner,
        "minItems": count, "maxItems": count}),
    st.sampled_from(["oneOf", "anyOf", "allOf"]).flatmap(
        lambda key: st.fixed_dictionaries({key: st.lists(inner, max_size=3) | inner})),
), max_leaves=8)  # fmt: skip
# a schema with a pattern at its top or one level down, as often as any other
schema = patterned | st.fixed_dictionaries({"type": st.just("object"), "properties": st.fixed_dictionaries(
    {"a": patterned})}) | st.booleans() | schema  # fmt: skip
response_format = st.one_of(
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": st.fixed_dictionaries({"name": st.just("answer"), "schema": schema})}),
    st.fixed_dictionaries({"type": st.sampled_from(["json_object", "text", "json_schema", "x"])}),
    json_value,
)  # fmt: skip
tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": st.sampled_from(["f", "get_weather", "bad name", ""]), "parameters": schema})})  # fmt: skip
tools = st.lists(tool, min_size=1, max_size=3) | json_value
tool_choice = st.sampled_from(["auto", "none", "required", "x"]) | st.fixed_dictionaries(
    {"type": st.just("function"), "function": st.fixed_dictionaries({"name": st.sampled_from(["f", "g"])})}
)
# token ids of any length, 5,000 digits included (past int()'s limit), and keys that are no ids
bias_key = st.integers(0, 1100).map(str) | st.integers(4000, 6000).map(lambda n: "7" * n) | st.text(max_size=8)
logit_bias = st.dictionaries(bias_key, st.floats(-100, 100), max_size=3) | json_value
small_int = st.integers(-3, 40)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool", "x"]) | hostile_text,
     "content": hostile_text | st.none() | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                          "text": hostile_text}), max_size=3)},
)  # fmt: skip
plausible = {
    "model": st.just("tiny-chat") | hostile_text,
    "messages": st.lists(message, max_size=4) | json_value,
    "prompt": hostile_text | st.lists(hostile_text, max_size=3) | st.lists(st.integers(-5, 70_000), max_size=30)
    | st.lists(st.lists(st.integers(-5, 70_000), max_size=10), max_size=3),
    "max_tokens": small_int | json_value, "max_completion_tokens": small_int, "n": st.integers(-1, 17),
    "temperature": st.floats(-1, 3) | json_value, "top_p": st.floats(-1, 2), "top_k": st.integers(-2, 2**70),
    "min_p": st.floats(), "repeat_penalty": st.floats(), "seed": st.integers(-(2**70), 2**70),
    "stream": st.booleans() | json_value, "stop": hostile_text | st.lists(hostile_text, max_size=6) | json_value,
    "logprobs": st.booleans() | small_int, "top_logprobs": st.integers(-1, 200), "echo": st.booleans(),
    "logit_bias": logit_bias, "response_format": response_format, "tools": tools, "tool_choice": tool_choice,
}  # fmt: skip


# values the server accepts, so that a body reaches the engine (with hostile texts in it)
roles = st.sampled_from(["system", "developer", "user", "assistant"])
accepted = {
    "model": st.just("tiny-chat"),
    "messages": st.lists(st.fixed_dictionaries({"role": roles, "content": valid_text}), min_size=1, max_size=3),
    "prompt": valid_text.filter(bool) | st.lists(st.integers(0, 200), min_size=1, max_size=20),
    "max_tokens": st.integers(0, 24), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50), "min_p": st.floats(0, 1), "repeat_penalty": st.floats(0.5, 2),
    "n": st.integers(1, 3), "stream": st.booleans(), "stop": valid_text | st.lists(valid_text, max_size=4),
    "seed": st.integers(-(2**63), 2**63 - 1), "echo": st.booleans(), "logit_bias": logit_bias,
    "response_format": response_format, "tools": tools, "tool_choice": tool_choice,
}  # fmt: skip


@st.composite
def request_body(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    keys = draw(st.lists(st.sampled_from(FIELDS), max_size=10, unique=True))
    shape = draw(st.sampled_from(["accepted", "accepted", "structured", "structured", "wild", "wild", "json", "bytes"]))
    if shape == "json":
        return path, json.dumps(draw(json_value)).encode()
    if shape == "bytes":
        return path, draw(st.binary(max_size=200))
    if shape == "structured":  # a chat answered under a grammar built from a random schema, or refused
        structure = st.fixed_dictionaries({"response_format": response_format}) | st.fixed_dictionaries(
            {"tools": tools}, optional={"tool_choice": tool_choice}
        )
        extra = st.fixed_dictionaries({}, optional={"logit_bias": logit_bias})
        body = {"model": "tiny-chat", "messages": draw(accepted["messages"]), "max_tokens": draw(st.integers(1, 16)),
                **draw(structure), **draw(extra)}  # fmt: skip
        return "/v1/chat/completions", json.dumps(body, allow_nan=True).encode()
    if shape == "accepted":  # values the server takes, so that the engine runs on them
        needed = ["model", "messages" if path.endswith("chat/completions") else "prompt", "max_tokens"]
        body = {k: draw(accepted[k]) for k in dict.fromkeys([*needed, *keys]) if k in accepted}
    else:
        body = {k: draw(plausible.get(k, json_value)) for k in keys}
    return path, json.dumps(body, allow_nan=True).encode()


@pytest.fixture(scope="module", params=["llama.cpp", "transformers"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    model = trained_export() / "model-q8_0.gguf" if request.param == "llama.cpp" else trained_tiny()
    log = tmp_path_factory.mktemp("fuzz-serve") / "server.log"
    with running_server(log, "--read-timeout", "5", model=model, key=None) as server:
        yield server.url
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def test_random_bodies_never_get_a_500_and_never_stop_the_server(served: str) -> None:
    seen: dict[int, int] = {}

    @settings(max_examples=EXAMPLES["serve"], deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
    @given(request_body())
    def one(request: tuple[str, bytes]) -> None:
        path, body = request
        r = httpx.post(f"{served}{path}", content=body, headers={"content-type": "application/json"}, timeout=120)
        seen[r.status_code] = seen.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text, body[:2000])
        if r.status_code >= 400:
            error = r.json()["error"]
            assert isinstance(error["message"], str) and error["message"], r.text
        elif r.headers["content-type"].startswith("text/event-stream"):
            events = [e for e in r.text.split("\n\n") if e.strip()]
            assert events[-1] == "data: [DONE]" and not any('"error"' in e[:20] for e in events), r.text[-2000:]
        else:
            answer = r.json()
            assert answer["choices"] and all(math.isfinite(v) for v in answer["usage"].values())
        assert httpx.get(f"{served}/health", timeout=10).status_code == 200

    one()
    assert sum(seen.values()) == EXAMPLES["serve"]
    assert seen.get(200, 0) >= 5, seen  # the fuzz reached the engine, not only the validators
    print(f"fuzz serve: {sum(seen.values())} bodies, statuses {dict(sorted(seen.items()))}")
