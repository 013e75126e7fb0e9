"""What OpenAI clients ask of `serve` beyond plain text, with the official openai client over real
HTTP: JSON answers (`response_format`), tool calls, `logit_bias`, parameters refused by name, and
the tokenizer endpoints lm-eval reads — lm-evaluation-harness itself scoring the GGUF alone."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from runtime_models import trained_tiny
from test_server import Server, running_server

SMOLLM2 = Path("smollm2-135m-instruct")  # the real chat model, served from its GGUF by name
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 40}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("smol") / "server.log"
    with running_server(log, "--n-ctx", "1024", model=SMOLLM2) as server:
        yield server


@pytest.fixture(scope="module")
def hf_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("hf") / "server.log"
    with running_server(log, model=trained_tiny()) as server:
        yield server


def ask(server: Server, **kwargs: object) -> openai.types.chat.ChatCompletion:
    return server.client().chat.completions.create(model="tiny-chat", temperature=0, **kwargs)  # type: ignore[call-overload, no-any-return]


def test_json_object_and_json_schema_answers_are_json(smol: Server) -> None:
    cat = [{"role": "user", "content": "Describe a cat as a JSON object with its name and age."}]
    answer = ask(smol, messages=cat, max_tokens=128, response_format={"type": "json_object"})
    assert answer.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(answer.choices[0].message.content or ""), dict)

    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "age": {"type": "integer"},
            "indoor": {"type": "boolean"},
            "color": {"enum": ["black", "white", "orange", "grey"]},
        },
        "required": ["name", "age", "indoor", "color"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "cat", "schema": schema, "strict": True}}
    answer = ask(smol, messages=cat, max_tokens=128, response_format=fmt)
    obj = json.loads(answer.choices[0].message.content or "")
    assert set(obj) == {"name", "age", "indoor", "color"}
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 20
    colors = ["black", "white", "orange", "grey"]
    assert isinstance(obj["age"], int) and isinstance(obj["indoor"], bool) and obj["color"] in colors


def test_a_required_tool_call_comes_back_as_tool_calls_and_its_result_is_answered(smol: Server) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = ask(smol, messages=messages, max_tokens=64, tools=[WEATHER], tool_choice="required")
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city"} and isinstance(arguments["city"], str)

    # The call and the tool's answer go back in; the model answers in text.
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]  # fmt: skip
    answer = ask(smol, messages=messages, max_tokens=48, tools=[WEATHER])
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    message = answer.choices[0].message
    assert message.content or message.tool_calls

    named = ask(smol, messages=messages[:1], max_tokens=64, tools=[WEATHER],
                tool_choice={"type": "function", "function": {"name": "get_weather"}})  # fmt: skip
    assert (named.choices[0].message.tool_calls or [])[0].function.name == "get_weather"
    none = ask(smol, messages=messages[:1], max_tokens=16, tools=[WEATHER], tool_choice="none")
    assert none.choices[0].message.tool_calls is None and none.choices[0].message.content


def first_token(server: Server, messages: list[dict[str, str]], **kwargs: object) -> int:
    answer = ask(server, messages=messages, max_tokens=1, logprobs=True, **kwargs)
    (lp,) = (answer.choices[0].logprobs and answer.choices[0].logprobs.content) or []
    ids = server.post("/tokenize", json={"prompt": bytes(lp.bytes or []).decode(), "add_special_tokens": False})
    (token,) = ids.json()["tokens"]
    return int(token)


@pytest.mark.parametrize("engine", ["llama.cpp", "transformers"])
def test_logit_bias_minus_100_on_the_greedy_first_token_changes_it(
    engine: str, smol: Server, hf_server: Server
) -> None:
    server = smol if engine == "llama.cpp" else hf_server
    messages = [{"role": "user", "content": "Name a large animal."}]
    greedy = first_token(server, messages)
    other = first_token(server, messages, logit_bias={str(greedy): -100})
    assert other != greedy
    assert first_token(server, messages, logit_bias={str(other): 100}) == other


def test_what_cannot_be_honoured_is_refused_by_name(smol: Server, hf_server: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    refused = [
        (hf_server, {"response_format": {"type": "json_object"}}, "response_format"),
        (hf_server, {"tools": [WEATHER]}, "tools"),
        (smol, {"reasoning_effort": "low"}, "reasoning_effort"),
        (smol, {"extra_body": {"functions": [WEATHER["function"]]}}, "functions"),
        (smol, {"tools": [WEATHER], "stream": True}, "stream"),
        (smol, {"logit_bias": {"99999999": 5}}, "logit_bias"),
        (smol, {"tool_choice": "required"}, "tool_choice"),
        (smol, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ]
    for server, kwargs, param in refused:
        with pytest.raises(openai.BadRequestError) as e:
            ask(server, messages=messages, max_tokens=4, **kwargs)
        assert e.value.status_code == 400 and param in str(e.value.message), (param, e.value.message)
        assert isinstance(e.value.body, dict) and e.value.body.get("param") == param, (param, e.value.body)
    # parameters that change nothing pass
    assert ask(smol, messages=messages, max_tokens=2, user="u1", metadata={"k": "v"}, store=False).choices


def test_chat_logprobs_one_answer_may_hold_are_bounded(smol: Server) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:  # 16 answers of up to ~1,000 tokens with 128 alternatives each
        ask(smol, messages=messages, logprobs=True, top_logprobs=128, n=16)
    assert isinstance(e.value.body, dict) and e.value.body.get("param") == "top_logprobs", e.value.body
    assert ask(smol, messages=messages, logprobs=True, top_logprobs=128, n=16, max_tokens=4).choices


def test_tokenizer_endpoints_agree_with_the_model(smol: Server) -> None:
    text = "Grüße, 東京! def f(x): return x  # ok"
    got = smol.post("/tokenize", json={"prompt": text}).json()
    plain = smol.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert got["count"] == len(got["tokens"]) and got["max_model_len"] == 1024
    back = smol.post("/detokenize", json={"tokens": plain["tokens"]}).json()["prompt"]
    assert back == text
    info = httpx.get(f"{smol.url}/tokenizer_info", headers={"Authorization": "Bearer test-key-9f2c"}).json()
    assert info["eos_token"] == "<|im_end|>" and "<|im_start|>" in (info["chat_template"] or "")
    chat = smol.post("/tokenize", json={"messages": [{"role": "user", "content": "Hi"}]}).json()["tokens"]
    start = smol.post("/tokenize", json={"prompt": "<|im_start|>", "add_special_tokens": False}).json()["tokens"]
    assert chat[0] == start[0] and len(start) == 1
    assert smol.post("/detokenize", json={"tokens": [10**9]}).status_code == 400
    assert httpx.get(f"{smol.url}/tokenizer_info").status_code == 401  # the key guards them too


TASK = """task: d4a_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
"""
QUESTIONS = [
    {"question": "What color is the sky on a clear day?", "choices": ["blue", "green", "red"], "answer": 0},
    {"question": "How many legs does a spider have?", "choices": ["six", "eight", "ten"], "answer": 1},
    {"question": "Which is a fruit?", "choices": ["carrot", "potato", "apple"], "answer": 2},
    {"question": "What do bees make?", "choices": ["honey", "milk", "silk"], "answer": 0},
]


def test_lm_eval_scores_the_gguf_alone_and_matches_our_own_log_likelihoods(tmp_path: Path) -> None:
    """lm-eval's local-completions with its remote tokenizer: nothing but `serve model.gguf`."""
    from distill4all.runtime.engine import load_engine
    from runtime_models import trained_export

    gguf = trained_export() / "model-q8_0.gguf"
    data = tmp_path / "mc.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "d4a_mc.yaml").write_text(TASK.format(data=data))
    with running_server(tmp_path / "server.log", model=gguf, key=None) as server:
        args = (f"model=tiny-chat,base_url={server.url}/v1/completions,tokenizer_backend=remote,"
                "num_concurrent=1,max_retries=1,max_length=256")  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OPENAI_API_KEY": "none"}
        p = subprocess.run(
            [sys.executable, "-m", "lm_eval", "--model", "local-completions", "--model_args", args,
             "--tasks", "d4a_mc", "--include_path", str(tasks), "--output_path", str(tmp_path / "out"),
             "--log_samples"],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    (samples,) = (tmp_path / "out").rglob("samples_d4a_mc_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == len(QUESTIONS)

    engine = load_engine(str(gguf))
    scored = 0
    for row in rows:
        for request, resp in zip(row["arguments"].values(), row["resps"], strict=True):
            context, continuation = request["arg_0"], request["arg_1"]  # " blue": lm-eval's delimiter added
            ids = engine.tokenize(context, add_special=False)
            whole = engine.tokenize(context + continuation, add_special=False)
            assert whole[: len(ids)] == ids
            ours = sum(engine.token_logprobs(whole)[len(ids) - 1 :])
            assert float(resp[0][0]) == pytest.approx(ours, abs=1e-4), (context, continuation)
            scored += 1
    assert scored == 3 * len(QUESTIONS)
    engine.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The tiny chat model's GGUF: llama.cpp follows grammars on it as on any other."""
    log = tmp_path_factory.mktemp("tiny") / "server.log"
    with running_server(log) as server:
        yield server


def schema_format(schema: object) -> dict[str, object]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}


def tool(name: str, parameters: object) -> dict[str, object]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def string_with(**keywords: object) -> dict[str, object]:
    return {"type": "object", "properties": {"a": {"type": "string", **keywords}}, "required": ["a"]}


def test_grammars_llama_cpp_cannot_parse_are_refused_and_regex_shorthand_is_followed(tiny: Server) -> None:
    """A grammar llama.cpp failed to parse became a NULL sampler (segfault, exit 139), and one
    nested past its parser's stack another: every path that builds one is a 400 naming the field."""
    chat = "/v1/chat/completions"
    ok: dict[str, object] = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}],
                             "max_tokens": 40, "temperature": 0}  # fmt: skip
    five = tiny.post(chat, json={**ok, "response_format": schema_format({"type": "string", "pattern": r"^\d{5}$"})})
    assert five.status_code == 200, five.text
    assert re.fullmatch(r"\d{5}", json.loads(five.json()["choices"][0]["message"]["content"]))
    for pattern in (r"^[A-Z]\w+$", r"^\S\s\D\W[\d\-.]\.$"):  # shorthand classes, escaped punctuation
        r = tiny.post(chat, json={**ok, "tools": [tool("f", string_with(pattern=pattern))], "tool_choice": "required"})
        assert r.status_code == 200, (pattern, r.text)
        call = (r.json()["choices"][0]["message"].get("tool_calls") or [None])[0]
        if call is not None:  # cut short by max_tokens, an answer is text
            assert re.fullmatch(pattern[1:-1], json.loads(call["function"]["arguments"])["a"]), (pattern, call)

    unparsable = {"type": "string", "pattern": r"^a\bc$"}  # \b reaches GBNF, which has no such escape
    deep = {"type": "string", "maxLength": 30000}  # 30,000 nested groups: llama.cpp's parser overflowed
    refused = [
        ({"response_format": schema_format(unparsable)}, "response_format.json_schema.schema"),
        ({"response_format": schema_format(deep)}, "response_format.json_schema.schema.maxLength"),
        ({"tools": [tool("g", {"type": "object"}), tool("f", string_with(pattern=r"^a\bc$"))]},
         "tools.1.function.parameters"),
        ({"tools": [tool("f", string_with(pattern=r"^a\bc$"))], "tool_choice": "auto"}, "tools.0.function.parameters"),
        ({"tools": [tool("g", {"type": "object"}), tool("f", string_with(maxLength=30000))],
          "tool_choice": {"type": "function", "function": {"name": "f"}}},
         "tools.1.function.parameters.properties.a.maxLength"),
    ]  # fmt: skip
    for extra, param in refused:
        r = tiny.post(chat, json={**ok, **extra})
        assert r.status_code == 400, (param, r.status_code, r.text)
        assert r.json()["error"]["param"] == param and r.json()["error"]["message"], r.text
        assert tiny.proc.poll() is None, param
    assert tiny.post(chat, json={**ok, "response_format": {"type": "json_object"}}).status_code == 200

    # the Python API checks a grammar before llama.cpp's sampler sees it too
    code = ("from distill4all.runtime.engine import SamplingParams, load_engine\n"
            "from distill4all.runtime.structured import StructureError\n"
            f"e = load_engine({str(tiny.gguf)!r})\n"
            "try:\n    e.chat([{'role': 'user', 'content': 'ping'}], SamplingParams(grammar='root ::= \"\\\\d\"'))\n"
            "except StructureError as err:\n    print('refused:', err)\n")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "refused: llama.cpp cannot parse" in p.stdout, (p.returncode, p.stdout, p.stderr)


def test_hostile_schemas_are_a_400_naming_the_field(tiny: Server) -> None:
    chat = "/v1/chat/completions"
    ok: dict[str, object] = {"model": "tiny-chat", "messages": [{"role": "user", "content": "ping"}],
                             "max_tokens": 8, "temperature": 0}  # fmt: skip
    where = "response_format.json_schema.schema"
    cases = [
        (False, where),
        ({"$ref": 5}, f"{where}.$ref"),
        ({"$ref": "https://example.com/schema.json"}, f"{where}.$ref"),  # nothing is fetched
        ({"properties": {"a": [1]}}, f"{where}.properties.a"),
        ({"type": "string", "pattern": 5}, f"{where}.pattern"),
        ({"type": "string", "pattern": "^*$"}, where),
        ({"type": "string", "minLength": 10**9}, f"{where}.minLength"),  # was a 5 GB grammar string
        ({"type": "array", "items": {"type": "string"}, "maxItems": -(10**9)}, f"{where}.maxItems"),
        ({"type": "string", "pattern": "^a{99999999999}$"}, f"{where}.pattern"),
        ({"oneOf": [{"type": "string", "maxLength": 1000}] * 60}, where),  # 60,000 repetitions in all
    ]
    for schema, param in cases:
        t0 = time.monotonic()
        r = tiny.post(chat, json={**ok, "response_format": schema_format(schema)})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (schema, r.status_code, r.text[:500])
        assert time.monotonic() - t0 < 10, schema
    for parameters, param in [({"type": "object", "properties": {"a": {"$ref": 5}}}, "properties.a.$ref"),
                              ({"type": "object", "properties": {"a": [1]}}, "properties.a"),
                              (string_with(pattern=5), "properties.a.pattern")]:  # fmt: skip
        r = tiny.post(chat, json={**ok, "tools": [tool("f", parameters)]})
        assert r.status_code == 400 and r.json()["error"]["param"] == f"tools.0.function.parameters.{param}", r.text
    anything = tiny.post(chat, json={**ok, "response_format": schema_format(True)})  # `true`: any JSON at all
    assert anything.status_code == 200, anything.text
    if anything.json()["choices"][0]["finish_reason"] == "stop":
        json.loads(anything.json()["choices"][0]["message"]["content"])
    assert tiny.proc.poll() is None
