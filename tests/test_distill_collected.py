"""KD on the logprobs collect stored: the teacher's byte tokens matched to the student's ids
(by hand, and end to end through `serve` on 127.0.0.1), the matched rows equal to the teacher's
own distribution, and a student with another tokenizer refused with the aligned share."""

from __future__ import annotations

import itertools
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import run_cli, write_config, write_jsonl
from distill4all.config import DistillConfig
from distill4all.store.logprobs import ResponseLogprobs
from distill4all.train.collected import align
from distill4all.train.distill import kd_loss
from test_train import ENV

NEG = -np.inf


def teacher(tokens: list[bytes], tops: list[list[tuple[bytes, float]]]) -> ResponseLogprobs:
    k = max(len(t) for t in tops)
    top = np.full((len(tokens), k), NEG, dtype=np.float32)
    for i, alts in enumerate(tops):
        top[i, : len(alts)] = [lp for _, lp in alts]
    sampled = [dict(alts).get(tok, -9.0) for tok, alts in zip(tokens, tops, strict=True)]
    return ResponseLogprobs(1, k, tokens, np.asarray(sampled, np.float32), [[b for b, _ in a] for a in tops], top)


VOCAB = {b"Hel": 1, b"lo": 2, b" wor": 3, b"ld": 4, b"<e>": 5, b"Hello": 6, b" word": 7, b"!": 8}


def test_positions_align_where_both_start_a_token_with_the_same_bytes() -> None:
    student = [b"Hel", b"lo", b" wor", b"ld", b"<e>"]
    t = teacher(
        [b"Hello", b" wor", b"ld"],
        [[(b"Hello", -0.1), (b"Hi", -2.5)],
         [(b" wor", -0.2), (b"\xff\xfe", -1.0), (b" word", -3.0)],  # no student token has the middle one
         [(b"!", -0.3), (b"ld", -1.5)]],  # the sampled token, not the teacher's best
    )  # fmt: skip
    got = align(student, [VOCAB[b] for b in student], b"Hello world", t, VOCAB, k=3)
    assert (got.answer_tokens, got.aligned) == (4, 2)  # <e> lies past the answer: not counted
    for unaligned in (0, 1, 4):  # the student's own token, certain: KD there is the cross-entropy
        assert got.ids[unaligned, 0] == [1, 2, 3, 4, 5][unaligned] and got.logprobs[unaligned, 0] == 0
        assert np.all(got.logprobs[unaligned, 1:] == NEG)
    assert got.ids[2, :2].tolist() == [3, 7] and got.logprobs[2, :2].tolist() == pytest.approx([-0.2, -3.0])
    assert got.logprobs[2, 2] == NEG  # fewer known tokens than k: padded
    assert got.ids[3, :2].tolist() == [8, 4] and got.logprobs[3, :2].tolist() == pytest.approx([-0.3, -1.5])
    assert got.empty == 0
    cut = align(student, [VOCAB[b] for b in student], b"Hello world", t, VOCAB, k=3, finished=False)
    assert cut.empty == 1 and np.all(cut.logprobs[4] == NEG)  # a cut answer's end-of-turn: no KD term
    assert np.array_equal(cut.logprobs[:4], got.logprobs[:4]) and (cut.answer_tokens, cut.aligned) == (4, 2)


def test_the_sampled_token_is_kept_when_the_top_k_leaves_it_out() -> None:
    t = teacher([b"Hel"], [[(b"Hello", -0.1), (b"!", -2.0)]])
    t = ResponseLogprobs(1, 2, t.tokens, np.asarray([-4.0], np.float32), t.top_tokens, t.top_logprobs)
    got = align([b"Hel"], [1], b"Hel", t, VOCAB, k=2)
    assert got.aligned == 1
    assert got.ids[0].tolist() == [6, 1] and got.logprobs[0].tolist() == pytest.approx([-0.1, -4.0])


def test_nothing_aligns_after_the_texts_part() -> None:
    student = [b"Hel", b"lo", b" wor", b"ld"]
    t = teacher([b"Hel", b"lo", b" word"], [[(b"Hel", -0.1)], [(b"lo", -0.1)], [(b" word", -0.1)]])
    got = align(student, [1, 2, 3, 4], b"Hello world", t, VOCAB, k=2)
    assert got.aligned == 2  # " wor" starts where " word" does but is not its bytes, and "ld" follows text that differs
    none = align(student, [1, 2, 3, 4], b"Hello world", None, VOCAB, k=2)  # an answer without logprobs
    assert (none.answer_tokens, none.aligned) == (4, 0) and np.all(none.logprobs[:, 0] == 0)


@pytest.mark.parametrize(("loss", "tail"), [("forward_kl", "rest"), ("forward_kl", "renormalize"),
                                            ("reverse_kl", "renormalize"), ("jsd", "renormalize")])  # fmt: skip
def test_padding_entries_take_no_part_in_any_loss(loss: str, tail: str) -> None:
    torch.manual_seed(1)
    z = torch.randn(3, 12, requires_grad=True)
    ids = torch.tensor([[4, 1], [7, 2], [0, 9]])
    lp = torch.log(torch.tensor([[0.6, 0.3], [0.5, 0.2], [0.9, 0.05]]))
    cfg = DistillConfig(loss=loss, tail=tail)  # type: ignore[arg-type]
    plain = kd_loss(z, ids, lp, cfg)
    padded_ids = torch.cat([ids, torch.tensor([[4], [4], [3]])], dim=1)  # any id: a pad entry's id is never read
    padded = kd_loss(z, padded_ids, torch.cat([lp, torch.full((3, 1), float("-inf"))], dim=1), cfg)
    assert padded.item() == pytest.approx(plain.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(padded, z)
    (want,) = torch.autograd.grad(plain, z)
    assert torch.isfinite(grad).all() and torch.allclose(grad, want, atol=1e-6)
    empty_row = torch.full((1, 3), float("-inf"))  # no known entry: the row adds nothing, and no NaN
    with_empty = torch.cat([z, torch.randn(1, 12)]).requires_grad_()
    both = kd_loss(with_empty, torch.cat([padded_ids, ids[:1, :1].repeat(1, 3)]), torch.cat([
        torch.cat([lp, torch.full((3, 1), float("-inf"))], dim=1), empty_row]), cfg)  # fmt: skip
    assert both.item() == pytest.approx(plain.item(), rel=1e-6)
    (grad,) = torch.autograd.grad(both, with_empty)
    assert torch.isfinite(grad).all() and torch.all(grad[3] == 0) and torch.allclose(grad[:3], want, atol=1e-6)
    certain = kd_loss(z, torch.tensor([[4, 0]]), torch.tensor([[0.0, float("-inf")]]), cfg)  # one-hot: CE
    ce = -torch.log_softmax(z[0], -1)[4]
    assert certain.item() == pytest.approx(ce.item() if loss == "forward_kl" else 0.0, abs=1e-5)


# --- end to end: the tiny model serves as the teacher, collects, and is the student's start -----


PROMPTS = [f"Tell me about the {w}." for w in ("sea", "sky", "moon", "rain", "snow", "sand", "wind", "fire")] * 3


@pytest.fixture(scope="module")
def collected(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A run that collected 24 answers of the tiny model with their top-16 through its own `serve`."""
    from distill4all.teacher.local import local_teacher

    root = tmp_path_factory.mktemp("collected")
    prompts = [f"{p} ({i})" for i, p in enumerate(PROMPTS)]
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in prompts])
    with local_teacher(str(tiny_model), log_path=root / "serve.log") as (url, model):
        teacher = {"name": "t", "model": model, "base_url": url, "max_tokens": 12, "temperature": 0.0, "logprobs": 16}
        data = {"name": "c", "run_dir": "run", "seed": 3,
                "collect": {"sources": [{"name": "qs", "path": "prompts.jsonl"}], "teachers": [teacher]}}  # fmt: skip
        r = run_cli("run", write_config(root / "collect.yaml", data), "--no-report", cwd=root)
        assert r.code == 0, r.output
    yield root


def train_config(root: Path, name: str, **train: Any) -> Path:
    """Training on the copied run's collected pairs (its store holds their logprobs)."""
    section = {
        "base_model": "tiny", "data": "run/collect/pairs.jsonl", "template": "chat", "val_fraction": 0.1,
        "global_batch_size": 8, "micro_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3, "warmup_steps": 1,
        "eval_every": 2, "checkpoint_every": 2, "max_length": 96, "precision": "fp32",
        "distill": {"top_k": 16, "tail": "rest", "weight": 1.0, "min_aligned": 0.0}, **train,
    }  # fmt: skip
    return write_config(root / f"{name}.yaml", {"name": "c", "run_dir": "run", "seed": 3, "train": section})


def test_collected_rows_are_the_teachers_own_distribution_at_the_students_positions(
    collected: Path, tmp_path: Path, tiny_model: Path
) -> None:
    from transformers import AutoModelForCausalLM

    root = tmp_path / "r"
    shutil.copytree(collected, root)
    r = run_cli("run", train_config(root, "kd"), "--no-report", env=ENV, cwd=root)
    assert r.code == 0, r.output
    assert "collected top-16 logprobs for" in r.stderr
    counts = json.loads((root / "run" / "manifest.json").read_text())["stages"]["train"]["counts"]
    assert counts["distill_source"] == "collected" and counts["distill_top_k"] == 16
    meta = json.loads((root / "run" / "train" / "teacher" / "train" / "meta.json").read_text())
    assert meta["with_logprobs"] == meta["examples"] > 0
    assert counts["distill_aligned"] == round(meta["aligned"] / meta["answer_tokens"], 4) > 0.3
    print(f"\ntiny model: {meta['aligned']} of {meta['answer_tokens']} answer tokens aligned")

    # Run the teacher over the student's own tokens: at every aligned position the stored rows are
    # its log-probabilities of those very ids (float16), so the ids and positions are the right ones.
    data = root / "run" / "train" / "data" / "train"
    tokens, targets, offsets = (np.load(data / f"{n}.npy") for n in ("input_ids", "targets", "offsets"))
    ids = np.load(root / "run" / "train" / "teacher" / "train" / "ids.npy")
    lps = np.load(root / "run" / "train" / "teacher" / "train" / "logprobs.npy").astype(np.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    row, checked, empty = 0, 0, 0
    for a, b in itertools.pairwise(offsets):
        with torch.no_grad():
            full = torch.log_softmax(model(torch.tensor(tokens[a:b])[None]).logits[0].float(), -1).numpy()
        for pos in np.flatnonzero(targets[a:b] != -100):
            known = np.isfinite(lps[row])
            if known.sum() > 1:  # aligned (an unaligned row holds the target alone, certain)
                assert np.abs(full[pos, ids[row, known]] - lps[row, known]).max() < 0.02
                checked += 1
            elif known.any():  # unaligned: the target alone, certain (KD is the cross-entropy there)
                assert ids[row, 0] == targets[a + pos] and lps[row, 0] == 0
            else:  # the end of turn after an answer cut at max_tokens: no KD term
                empty += 1
            row += 1
    assert row == len(ids) and checked > 0 and empty == meta["empty"] > 0


def test_a_student_with_another_tokenizer_is_refused_with_the_aligned_share(collected: Path, tmp_path: Path) -> None:
    from test_export import sentencepiece_llama

    root = tmp_path / "r"
    shutil.copytree(collected, root)
    other = sentencepiece_llama(tmp_path / "sp")
    cfg = train_config(root, "other", base_model=str(other), template="paper", distill={"top_k": 16})
    r = run_cli("run", cfg, "--no-report", env=ENV, cwd=root)
    assert r.code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "the collected logprobs align with" in line and "below distill.min_aligned 95%" in line, line
    assert "answers carry logprobs" in line and "distillation across tokenizers is not supported" in line
