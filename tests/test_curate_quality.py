"""Curation measured on a labelled set written apart from the rules (tests/data/curation/): 316
pairs — clean answers (some sharing a prompt), structured answers ending without a full stop,
refusals in many wordings, near-misses that only sound like refusals, truncations, copies of an
eval set of its own and near-topic pairs — curated through the CLI like any pairs file."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from conftest import run_cli, store_query, write_config

DATA = Path(__file__).parent / "data" / "curation"


@pytest.fixture(scope="module")
def curated(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, object]], dict[str, list[str]]]:
    """Each labelled pair and the rules that dropped it (empty: kept), each rule followed by its detail."""
    tmp = tmp_path_factory.mktemp("quality")
    rows = [json.loads(line) for line in (DATA / "labelled.jsonl").read_text().splitlines()]
    pairs = tmp / "pairs.jsonl"
    # the label travels as a source name: one per row, so no source is judged homogeneous as a whole
    pairs.write_text("".join(json.dumps({**r, "source": f"row{i}"}) + "\n" for i, r in enumerate(rows)))
    curate = {"embed": {"model": "minilm-static"}, "map": {"max_points": 400},
              "decontaminate": {"data": [str(DATA / "eval_items.jsonl")]}, "auto_exclude_homogeneous": False}  # fmt: skip
    config = write_config(tmp / "run.yaml", {"name": "q", "run_dir": "run", "curate": curate})
    r = run_cli("curate", pairs, "--out", tmp / "run", "--config", config)
    assert r.code == 0, r.output
    decided = store_query(
        tmp / "run",
        "SELECT p.source, d.rules, d.details FROM decisions d JOIN responses r ON r.id = d.response_id"
        " JOIN prompts p ON p.id = r.prompt_id",
    )
    assert decided
    # the rules, then the details as one JSON text
    rules = {src: [*json.loads(rules), json.dumps(json.loads(details or "{}"))] for src, rules, details in decided}
    for line in (tmp / "run" / "curate" / "train.jsonl").read_text().splitlines():
        out = json.loads(line)
        rules[out["source"]].append(line)  # a kept pair: its curated row last
    return rows, rules


def _by_label(
    curated: tuple[list[dict[str, object]], dict[str, list[str]]],
) -> dict[str, list[tuple[dict[str, object], list[str]]]]:
    rows, rules = curated
    out: dict[str, list[tuple[dict[str, object], list[str]]]] = defaultdict(list)
    for i, row in enumerate(rows):
        out[str(row["label"])].append((row, rules[f"row{i}"]))
    return out


def test_refusals_are_caught_and_answers_that_only_sound_like_one_are_kept(curated: tuple) -> None:  # type: ignore[type-arg]
    labels = _by_label(curated)
    caught = [row for row, rules in labels["refusal"] if "refusal" in rules]
    missed = [row["response"] for row, rules in labels["refusal"] if "refusal" not in rules]
    recall = len(caught) / len(labels["refusal"])
    good = [
        (row, rules) for label in ("clean", "structured", "near_miss", "near_topic") for row, rules in labels[label]
    ]
    false = [(row["label"], row["response"]) for row, rules in good if "refusal" in rules]
    print(f"refusal recall {recall:.1%} ({len(caught)}/{len(labels['refusal'])}); "
          f"good pairs dropped as refusals {len(false)}/{len(good)}")  # fmt: skip
    assert recall >= 0.95, missed
    assert len(false) <= 0.01 * len(good), false
    near = [row["response"] for row, rules in labels["near_miss"] if "refusal" in rules]
    assert not near, near  # "I cannot stress enough…" and its kind are answers


def test_structured_answers_are_not_read_as_cut_and_cut_ones_are(curated: tuple) -> None:  # type: ignore[type-arg]
    labels = _by_label(curated)
    cut_as = [
        (row["response"], rules) for row, rules in labels["structured"] if any(r.startswith("truncated") for r in rules)
    ]
    assert not cut_as, cut_as
    truncated = labels["truncated"]
    missed = [row["response"] for row, rules in truncated if not any(r.startswith("truncated") for r in rules)]
    assert len(missed) <= 0.1 * len(truncated), missed


def test_eval_copies_are_caught_naming_their_item_and_near_topic_pairs_are_kept(curated: tuple) -> None:  # type: ignore[type-arg]
    labels = _by_label(curated)
    copies = labels["eval_copy"]
    # dropped for it, or (when another rule dropped the pair first) found and noted
    caught = [row for row, rules in copies if '"eval.copy"' in rules[-1]]
    named = [row for row, rules in copies if f"eval item {row['eval_id']}:" in rules[-1]]
    assert len(named) >= 0.95 * len(copies)  # the report names the item each pair copies
    assert len(caught) >= 0.95 * len(copies), [row["prompt"] for row, rules in copies if "eval.copy" not in rules]
    near = [row["prompt"] for row, rules in labels["near_topic"] if "eval.copy" in rules]
    assert not near, near
    clean = [row["prompt"] for row, rules in labels["clean"] if "eval.copy" in rules]
    assert not clean, clean


def test_distinct_answers_to_one_prompt_are_all_kept(curated: tuple) -> None:  # type: ignore[type-arg]
    labels = _by_label(curated)
    prompts = Counter(str(row["prompt"]) for row, _ in labels["clean"])
    shared = [(row["prompt"], rules) for row, rules in labels["clean"] if prompts[str(row["prompt"])] > 1]
    assert len(shared) >= 8
    assert all(not any(r.startswith("dup.") for r in rules) for _, rules in shared), shared


def test_reasoning_is_stored_apart_and_reasoning_only_answers_are_named(curated: tuple) -> None:  # type: ignore[type-arg]
    labels = _by_label(curated)
    for label in ("reasoning", "reasoning_inline"):
        for row, rules in labels[label]:
            assert not [r for r in rules if not r.startswith("{")], (label, rules)  # kept
            out = json.loads(rules[-1])
            assert "<think>" not in out["response"] and out["response"].strip() and out["reasoning"].strip()
            if label == "reasoning":
                assert out["reasoning"] == str(row["reasoning_content"]).strip()
                assert out["response"] == row["response"]
            else:
                assert out["reasoning"] in str(row["response"]) and out["response"] in str(row["response"])
    for _, rules in labels["reasoning_no_content"]:
        assert rules[0] == "reasoning.no-answer", rules  # not an empty answer: an answer all reasoning
    for _, rules in labels["reasoning_cut"]:
        assert rules[0] == "truncated.reasoning", rules
