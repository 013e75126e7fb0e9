"""Eval: both perplexities against independent transformers computations, GGUF vs HF, clipping
and NaN semantics, paired statistics, the judge over real HTTP, and the stage in a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config, write_jsonl
from distill4all.evaluate.compare import figure_values, paired, summarize
from distill4all.evaluate.data import Item, load_items, pick
from distill4all.evaluate.judge import count, parse_verdict
from distill4all.evaluate.perplexity import conditioned_context, conditioned_perplexity, faithful_perplexity
from distill4all.runtime.engine import load_engine
from runtime_models import exported, trained_tiny
from servers import Background

LONG = " ".join(f"word{i % 97} and more text number {i}." for i in range(50))  # 512 < tokens < 2048
ITEMS = [
    Item("short", "Rewrite the sentence to be clearer.", "If you have any questions, let me know.", "Ask me anything."),
    Item("no-input", "Name three primary colors.", "", "Red, blue and yellow."),
    Item("long", "Continue the list.", "word0 and", LONG),
]


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return trained_tiny()


@pytest.fixture(scope="module")
def hf(model_dir: Path) -> tuple[object, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return tok, model


def reference_faithful(tok: object, model: object, item: Item, stride: int = 512) -> float:
    """The original eval_self_instruct.py loop, written out with transformers' own loss."""
    prompt = item.instruction + " " + item.input
    gt = prompt + " " + item.output
    inp = tok(prompt, return_tensors="pt")  # type: ignore[operator]
    gt_input = tok(gt, return_tensors="pt")  # type: ignore[operator]
    nlls, prev_end_loc = [], 0
    seq_len = gt_input["input_ids"].size(1)
    end_loc = 0
    for begin_loc in range(inp["input_ids"].size(1), seq_len, stride):
        end_loc = min(begin_loc + stride, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = gt_input["input_ids"][:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            nlls.append(model(input_ids, labels=target_ids).loss * trg_len)  # type: ignore[operator]
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return float(torch.exp(torch.stack(nlls).sum() / end_loc))


def reference_conditioned(tok: object, model: object, item: Item) -> float:
    user = item.instruction if not item.input else f"{item.instruction}\n\n{item.input}"
    ctx = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
    c = tok(ctx, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    t = tok(item.output, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    ids = torch.tensor([c + t])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].double(), -1)  # type: ignore[operator]
    picked = [logp[len(c) - 1 + i, tok_id].item() for i, tok_id in enumerate(t)]
    return math.exp(-sum(picked) / len(picked))


def test_both_metrics_equal_a_straightforward_transformers_computation(
    model_dir: Path, hf: tuple[object, object]
) -> None:
    tok, model = hf
    engine = load_engine(str(model_dir))
    assert len(engine.tokenize(ITEMS[2].output)) > 512  # the long item spans several windows
    for item in ITEMS:
        ours, ref = faithful_perplexity(engine, item), reference_faithful(tok, model, item)
        assert ours == pytest.approx(ref, rel=1e-4), item.id
        ours, ref = conditioned_perplexity(engine, item), reference_conditioned(tok, model, item)
        assert ours == pytest.approx(ref, rel=1e-4), item.id
    # the two metrics measure different things: the corrected one sees the prompt
    assert faithful_perplexity(engine, ITEMS[0]) != pytest.approx(conditioned_perplexity(engine, ITEMS[0]), rel=1e-2)


def test_gguf_f32_matches_the_hf_path(model_dir: Path) -> None:
    folder = exported(model_dir, "test-export-f32", "--base-type", "f32", "--no-report")
    hf_engine, gguf_engine = load_engine(str(model_dir)), load_engine(str(folder / "model-f32.gguf"))
    assert gguf_engine.backend == "llama.cpp"
    for item in ITEMS:
        for metric in (faithful_perplexity, conditioned_perplexity):
            a, b = metric(hf_engine, item), metric(gguf_engine, item)
            assert b == pytest.approx(a, rel=2e-3), (item.id, metric.__name__)  # f32 kernels differ in summation order
    gguf_engine.close()


def test_edge_cases_give_nan_as_the_original_did(model_dir: Path) -> None:
    engine = load_engine(str(model_dir))
    empty = Item("e", "Say nothing.", "", "")
    assert math.isnan(faithful_perplexity(engine, empty)) and math.isnan(conditioned_perplexity(engine, empty))
    # a last window of one token has no prediction in it: transformers' loss is NaN, and so the item
    n_prompt = len(engine.tokenize("Count: "))
    spans = {o: len(engine.tokenize("Count:  " + o)) - n_prompt for o in (" ".join(["one"] * k) for k in range(1, 40))}
    output = next(o for o, n in spans.items() if n > 4 and n % 4 == 1)
    item = Item("one", "Count:", "", output)
    assert math.isnan(faithful_perplexity(engine, item, stride=4))
    assert not math.isnan(faithful_perplexity(engine, item, stride=512))


def test_clipping_and_nan_follow_the_figure_script() -> None:
    values = [float("nan"), float("inf"), 250.0, 42.0, 1.5]
    fig = figure_values(values)
    assert list(fig) == [0.0, 100.0, 100.0, 42.0, 1.5]  # NaN → 0 (nan_to_num's default), inf → 100
    reference = np.clip(np.nan_to_num(np.array(values), 100), 0, 100)  # exactly the original call
    assert np.array_equal(fig, reference)
    s = summarize(values)
    assert (s.n, s.n_nan, s.share_clipped, s.median) == (5, 1, 0.4, 42.0)


def test_paired_statistics_back_a_stochastically_lower_model() -> None:
    rng = np.random.default_rng(0)
    base = list(rng.uniform(10, 90, 120))
    better = [b * 0.8 for b in base]
    p = paired("better", better, "base", base)
    assert p.share_lower == 1.0 and p.p_lower < 1e-6 and p.median_difference < 0
    same = paired("same", base, "base", base)
    assert same.share_lower == 0.5 and same.p_lower == 1.0
    with_nan = paired("x", [float("nan"), *better[1:]], "base", base)
    assert with_nan.n == 119  # NaN pairs are dropped from the test, not zeroed


def test_verdicts_and_both_order_counting() -> None:
    assert parse_verdict("Reasoning... so [[A]]") == "A" and parse_verdict("[[B]] then [[C]]") == "C"
    assert parse_verdict("no verdict") == "?"
    verdicts = {
        "win": {"model-first": "A", "baseline-first": "B"},
        "win-tie": {"model-first": "A", "baseline-first": "C"},
        "loss": {"model-first": "B", "baseline-first": "A"},
        "bias": {"model-first": "A", "baseline-first": "A"},  # always the first: position bias
        "tie": {"model-first": "C", "baseline-first": "C"},
        "broken": {"model-first": "?", "baseline-first": "A"},
    }
    r = count("m", "b", verdicts)
    assert (r.wins, r.losses, r.ties, r.inconsistent, r.invalid, r.n) == (2, 1, 3, 1, 1, 6)
    assert r.win_rate == pytest.approx((2 + 1.5) / 6)


def test_items_load_both_formats_and_subset_is_seeded(tmp_path: Path) -> None:
    si = write_jsonl(tmp_path / "si.jsonl", [
        {"id": "a", "motivation_app": "Mail", "instruction": "Do it.", "instances": [{"input": "x", "output": "y"}, {"input": "z", "output": "w"}]},
        {"id": "b", "motivation_app": "Docs", "instruction": "Again.", "instances": [{"input": "", "output": "ok"}]},
    ])  # fmt: skip
    items = load_items(si)
    assert [(i.id, i.input, i.output) for i in items] == [("a", "x", "y"), ("b", "", "ok")]  # first instance only
    flat = write_jsonl(tmp_path / "flat.jsonl", [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(30)])
    many = load_items(flat)
    assert pick(many, 10, 1) == pick(many, 10, 1) != pick(many, 10, 2) and len(pick(many, 10, 1)) == 10
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "no output"}])
    r = run_cli("eval", "--data", bad, "--model", "x=tiny", "--out", tmp_path / "o")
    assert r.code == 2 and f"{bad}:1: not an eval item" in r.stderr


class JudgeStub:
    """A stand-in judge API: prefers the longer answer, says tie when they are equally long."""

    async def handle(
        self, method: str, path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, str], bytes]:
        if method == "GET":
            return 200, {}, json.dumps({"data": [{"id": "judge"}]}).encode()
        text = json.loads(body)["messages"][-1]["content"]
        a = text.split("[The start of assistant A's answer]\n", 1)[1].split("\n[The end of assistant A's answer]")[0]
        b = text.split("[The start of assistant B's answer]\n", 1)[1].split("\n[The end of assistant B's answer]")[0]
        verdict = "[[A]]" if len(a) > len(b) else "[[B]]" if len(b) > len(a) else "[[C]]"
        reply = {"choices": [{"message": {"content": f"Because. {verdict}"}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 50, "completion_tokens": 3}}  # fmt: skip
        return 200, {"Content-Type": "application/json"}, json.dumps(reply).encode()


def test_eval_stage_in_a_run_with_a_judge_over_http(model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "items.jsonl", [
        {"id": f"i{k}", "instruction": q, "input": "", "output": a}
        for k, (q, a) in enumerate([("What is the capital of France?", "Paris is the capital of France."),
                                    ("Say hello.", "Hello! How can I help you today?"), ("ping", "pong pong"),
                                    ("Name a color.", "Blue.")])
    ])  # fmt: skip
    judge = Background(JudgeStub().handle)
    try:
        config = write_config(tmp_path / "run.yaml", {
            "name": "ev", "run_dir": "run",
            "eval": {"data": [str(tmp_path / "missing.jsonl"), str(data)], "include": [], "baseline": "base",
                     "models": [{"name": "base", "model": "tiny"}, {"name": "trained", "model": str(model_dir)}],
                     "judge": {"judge": {"name": "judge", "model": "judge", "base_url": judge.url, "price": {"input": 1, "output": 1}},
                               "answer_max_tokens": 12}},
        })  # fmt: skip
        r = run_cli("run", config)
    finally:
        judge.stop()
    assert r.code == 0, r.output
    out = tmp_path / "run" / "eval"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["items"] == 4 and summary["data"] == str(data)  # the first path that exists
    assert set(summary["summaries"]["faithful"]) == {"base", "trained"}
    assert summary["paired"]["conditioned"][0]["model"] == "trained"
    # the trained model knows these answers; the random one does not
    assert (
        summary["summaries"]["conditioned"]["trained"]["median"] < summary["summaries"]["conditioned"]["base"]["median"]
    )
    rows = [json.loads(x) for x in (out / "perplexity-trained.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["i0", "i1", "i2", "i3"] and all("faithful" in r for r in rows)
    (j,) = summary["judge"]
    assert j["n"] == 4 and j["wins"] + j["losses"] + j["ties"] == 4
    for name in ("figure3-faithful.png", "figure3-conditioned.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["stages"]["eval"]["counts"]["items"] == 4 and manifest["costs"]["judge_usd"] > 0
    import sqlite3

    db = sqlite3.connect(out / "judge.sqlite")
    assert db.execute("SELECT COUNT(*) FROM responses WHERE teacher = 'judge'").fetchone()[0] == 8  # both orders
    assert db.execute("SELECT COUNT(DISTINCT teacher) FROM responses").fetchone()[0] == 3  # 2 answerers + judge


@pytest.mark.slow
def test_judge_is_the_real_smollm2_served_locally(model_dir: Path, tmp_path: Path) -> None:
    """A judge with no base_url is `distill4all serve` on 127.0.0.1, started for the stage: every
    pair is judged in both orders, and each verdict (or its absence) is counted once."""
    data = write_jsonl(tmp_path / "items.jsonl", [
        {"id": f"i{k}", "instruction": q, "input": "", "output": a}
        for k, (q, a) in enumerate([("What is the capital of France?", "Paris."), ("Name a colour.", "Blue.")])
    ])  # fmt: skip
    config = write_config(tmp_path / "run.yaml", {
        "name": "ev", "run_dir": "run",
        "eval": {"data": str(data), "include": [], "baseline": "base", "metrics": ["conditioned"],
                 "models": [{"name": "base", "model": "tiny"}, {"name": "trained", "model": str(model_dir)}],
                 "judge": {"judge": {"name": "smol", "model": "smollm2-135m-instruct", "max_tokens": 32},
                           "answer_max_tokens": 8}},
    })  # fmt: skip
    r = run_cli("run", config)
    assert r.code == 0, r.output
    out = tmp_path / "run" / "eval"
    (j,) = json.loads((out / "summary.json").read_text())["judge"]
    assert j["n"] == 2 and j["wins"] + j["losses"] + j["ties"] == 2 and j["invalid"] <= 2
    import sqlite3

    db = sqlite3.connect(out / "judge.sqlite")
    judged = db.execute("SELECT text, finish_reason FROM responses WHERE teacher = 'smol'").fetchall()
    assert len(judged) == 4 and all(text for text, _ in judged)  # both orders, real answers
    assert list((out).rglob("teacher-smol.log")), "the local judge server's log is kept"


def test_conditioned_context_uses_the_models_template(model_dir: Path) -> None:
    engine = load_engine(str(model_dir))
    rendered = engine.render_chat([{"role": "user", "content": ITEMS[1].instruction}])
    assert rendered.endswith("<|im_start|>assistant\n")
    assert conditioned_context(engine, ITEMS[1]) == engine.tokenize(rendered, add_special=False)


def test_results_with_unicode_line_separators_resume(tmp_path: Path) -> None:
    """A model's output may hold U+2028 or U+0085: written raw (ensure_ascii=False), they are text
    inside a JSONL line, not line ends, so resuming reads each result whole."""
    from distill4all.evaluate.runner import _read_done

    path = tmp_path / "results.jsonl"
    rows = [{"id": "a", "output": "one\u2028two\x85three\u2029"}, {"id": "b", "output": "plain"}]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) + '{"id": "c", "outp', "utf-8")
    assert _read_done(path) == {"a": rows[0], "b": rows[1]}  # and the torn last line is cut off
    assert path.read_text("utf-8").endswith('"plain"}\n')


def test_the_conditioned_boundary_is_where_training_put_it(tmp_path: Path) -> None:
    """On a LLaMA-style SentencePiece tokenizer, the context and the scored output are exactly the
    ids training built before and after its loss mask (EOS aside): for the paper's layout (no
    template, or the paper template) and for a chat template (Alpaca here, as alpaca-lora's)."""
    from transformers import AutoTokenizer

    from distill4all.evaluate.perplexity import conditioned_ids
    from distill4all.train.data import Example
    from distill4all.train.templates import IGNORE, load_template
    from test_export import sentencepiece_llama_with_bos

    model_dir = sentencepiece_llama_with_bos(tmp_path / "sp")
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = load_engine(str(model_dir))
    items = [Item("a", "Name a color.", "", "Blue, like the sky."),
             Item("b", "Translate:", "l'été", " Summer, with a leading space.")]  # fmt: skip
    for layout, installed in (("paper", False), ("paper", True), ("alpaca", True)):
        template = load_template(layout, tok, max_length=256)
        if installed:  # else: the model has no chat template at all, which is the paper's layout
            engine.use_chat_template(template.jinja)
        for item in items:
            user = item.instruction if not item.input else f"{item.instruction}\n\n{item.input}"
            example = Example(
                ({"role": "user", "content": user}, {"role": "assistant", "content": item.output}), "s", 0
            )
            enc = template.encode([example])[0]
            first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
            assert enc.input_ids[-1] == tok.eos_token_id
            assert conditioned_ids(engine, item) == (enc.input_ids[:first], enc.input_ids[first:-1]), (layout, item.id)
    engine.use_chat_template(load_template("paper", tok, max_length=256).jinja)
    for item in items:  # chat and serve prompt a paper-trained model with the same ids
        user = item.instruction if not item.input else f"{item.instruction}\n\n{item.input}"
        assert engine.chat_ids([{"role": "user", "content": user}]) == conditioned_ids(engine, item)[0]
    engine.use_chat_template(load_template("alpaca", tok, max_length=256).jinja)
    alone = engine.tokenize(items[0].output, add_special=False)
    assert conditioned_ids(engine, items[0])[1] != alone  # after "### Response:\n" the answer has no `▁`
