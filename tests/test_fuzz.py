"""Property tests with Hypothesis: hostile text through curation, hostile bodies through `serve`.

Curation: random pairs files (any Unicode — lone surrogates, NULs, RTL marks, HTML/JS, Markdown,
matplotlib mathtext, the dedup batch separator, huge texts — as JSON escapes, raw bytes that are
not UTF-8, broken lines) through the import, the filters, dedup, the data map (HTML and PNG) and
the report: the only error allowed is a UserError naming the file and line.

Serving: random JSON bodies (valid field names with values of any type and size, random keys,
random nesting) to both engines: every answer is a 2xx or a 4xx with an OpenAI error body, and the
server is alive after each. Example counts are fixed per test (EXAMPLES) so CI time stays bounded.
"""

from __future__ import annotations

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

from distill4all.config import CurateConfig
from distill4all.curate import curation, pairs
from distill4all.errors import UserError
from distill4all.store import Store
from runtime_models import trained_export, trained_tiny
from test_server import running_server

EXAMPLES = {"curate": 30, "serve": 200}

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


@st.composite
def pair_line(draw: st.DrawFn, broken: bool) -> bytes:
    """One line of a pairs file: a pair of texts of any kind, or (in a broken file) anything at all."""
    kind = draw(st.sampled_from(["pair", "pair", "json", "bytes"])) if broken else "pair"
    if kind == "json":
        fields = st.dictionaries(st.sampled_from(["prompt", "response", "source", "x"]), json_scalar, max_size=4)
        return json.dumps(draw(json_scalar | fields)).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=40)).replace(b"\n", b" ")
    text = hostile_text if broken else valid_text
    prompt = draw(text if broken else text.filter(lambda t: bool(t.strip())))  # a blank prompt is a row error
    row = {"prompt": prompt, "response": draw(text), "source": draw(text)}
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


# --- serve -------------------------------------------------------------------------------------

FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
          "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty", "n", "stream", "stream_options", "stop",
          "seed", "logprobs", "top_logprobs", "echo", "suffix", "best_of", "user", "logit_bias"]  # fmt: skip
json_value = st.recursive(json_scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
    st.text(max_size=6), inner, max_size=4), max_leaves=12)  # fmt: skip
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
    "seed": st.integers(-(2**63), 2**63 - 1), "echo": st.booleans(),
}  # fmt: skip


@st.composite
def request_body(draw: st.DrawFn) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
    keys = draw(st.lists(st.sampled_from(FIELDS), max_size=10, unique=True))
    shape = draw(st.sampled_from(["accepted", "accepted", "wild", "wild", "json", "bytes"]))
    if shape == "json":
        return path, json.dumps(draw(json_value)).encode()
    if shape == "bytes":
        return path, draw(st.binary(max_size=200))
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
