"""Knowledge distillation in train: the KD losses against a hand computation, a local teacher's
top-k cached before training, a student equal to its teacher at zero KL, the tokenizer rule, and
resume mid-KD on the same loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli
from distill4all.config import DistillConfig
from distill4all.train.distill import kd_loss
from test_train import ENV, config, kill_past_checkpoint, losses, pairs  # noqa: F401  (pairs: a fixture)


def _softmax(xs: list[float]) -> list[float]:
    m = max(xs)
    e = [math.exp(x - m) for x in xs]
    return [v / sum(e) for v in e]


def _log(xs: list[float]) -> list[float]:
    return [math.log(x) for x in xs]


def _hand(z: list[float], ids: list[int], lp: list[float], loss: str, tail: str, t: float) -> float:
    """One position, written out from the definitions in train/distill.py."""
    if tail == "rest":
        q = _softmax(z)
        p = [math.exp(x) for x in lp]
        p_r, q_r = 1 - sum(p), 1 - sum(q[i] for i in ids)
        return sum(pi * (li - math.log(q[i])) for pi, li, i in zip(p, lp, ids, strict=True)) + p_r * math.log(p_r / q_r)
    pt = _softmax([x / t for x in lp])
    if loss == "forward_kl":
        q = _softmax([x / t for x in z])
        return t * t * sum(a * (math.log(a) - math.log(q[i])) for a, i in zip(pt, ids, strict=True))
    s = _softmax([z[i] / t for i in ids])
    if loss == "reverse_kl":
        return t * t * sum(b * (math.log(b) - math.log(a)) for a, b in zip(pt, s, strict=True))
    m = [(a + b) / 2 for a, b in zip(pt, s, strict=True)]
    kl = lambda x, y: sum(a * math.log(a / b) for a, b in zip(x, y, strict=True))  # noqa: E731
    return t * t * (0.5 * kl(pt, m) + 0.5 * kl(s, m))


@pytest.mark.parametrize(
    ("loss", "tail", "t"),
    [("forward_kl", "rest", 1.0), ("forward_kl", "renormalize", 1.0), ("forward_kl", "renormalize", 2.0),
     ("reverse_kl", "renormalize", 1.5), ("jsd", "renormalize", 1.0)],
)  # fmt: skip
def test_kd_loss_equals_a_hand_computation(loss: str, tail: str, t: float) -> None:
    z = [[1.0, -0.5, 2.0, 0.3, -1.2, 0.0], [0.2, 0.1, -0.3, 1.7, 0.9, -2.0]]
    ids = [[2, 0, 3], [3, 4, 0]]
    lp = [_log([0.6, 0.2, 0.1]), _log([0.5, 0.3, 0.15])]  # a teacher with 10 % and 5 % outside its top-3
    cfg = DistillConfig(loss=loss, tail=tail, temperature=t)  # type: ignore[arg-type]
    got = kd_loss(torch.tensor(z), torch.tensor(ids), torch.tensor(lp), cfg).item()
    want = sum(_hand(z[n], ids[n], lp[n], loss, tail, t) for n in range(2))
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)  # float32 against float64
    assert got > 0


def test_a_student_equal_to_its_teacher_scores_zero_only_in_the_exact_forms() -> None:
    torch.manual_seed(0)
    z = torch.randn(5, 50) * 3
    full = torch.log_softmax(z, -1)
    top = torch.topk(full, 8, dim=-1)
    exact = kd_loss(z, top.indices, top.values, DistillConfig(tail="rest"))
    assert abs(exact.item()) < 1e-5
    for loss in ("reverse_kl", "jsd"):
        both = kd_loss(z, top.indices, top.values, DistillConfig(loss=loss))  # type: ignore[arg-type]
        assert abs(both.item()) < 1e-5
    # DistillKit's form: the truncated teacher is not the teacher, by −log of its top-k mass
    renorm = kd_loss(z, top.indices, top.values, DistillConfig(tail="renormalize"))
    assert renorm.item() == pytest.approx(-top.values.exp().sum(-1).log().sum().item(), rel=1e-4)


def distill_config(tmp_path: Path, data: Path, name: str = "kd", **distill: object) -> Path:
    return config(tmp_path, data, name=name, max_steps=6, distill={"top_k": 16, "tail": "rest", **distill})


def metric_rows(run_dir: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in (run_dir / "train" / "metrics.jsonl").read_text().splitlines()]


def test_kd_with_a_local_teacher_starts_at_zero_and_logs_both_parts(tmp_path: Path, pairs: Path) -> None:  # noqa: F811
    cfg = distill_config(tmp_path, pairs, weight=1.0)  # the teacher is the base model: the LoRA student equals it
    r = run_cli("run", cfg, env=ENV)
    assert r.code == 0, r.output
    assert "teacher tiny top-16" in r.stderr
    rows = [row for row in metric_rows(tmp_path / "kd") if "loss" in row]
    assert len(rows) == 6 and all("ce_loss" in row and "kd_loss" in row for row in rows)
    assert rows[0]["kd_loss"] < 1e-5  # LoRA's B starts at 0: the student is its teacher
    assert rows[0]["loss"] == pytest.approx(rows[0]["kd_loss"])  # weight 1: KD alone
    teacher = tmp_path / "kd" / "train" / "teacher" / "train"
    ids = np.load(teacher / "ids.npy")
    targets = np.load(tmp_path / "kd" / "train" / "data" / "train" / "targets.npy")
    assert ids.shape == (int((targets != -100).sum()), 16)  # one row per trained position
    assert not (teacher / "chunks").exists()
    counts = json.loads((tmp_path / "kd" / "manifest.json").read_text())["stages"]["train"]["counts"]
    assert counts["distill_top_k"] == 16 and counts["distill_bytes_per_token"] == 96


def test_a_teacher_with_another_tokenizer_is_refused_with_the_aligned_share(tmp_path: Path, pairs: Path) -> None:  # noqa: F811
    from test_export import sentencepiece_llama

    other = sentencepiece_llama(tmp_path / "sp")
    r = run_cli("run", distill_config(tmp_path, pairs, teacher=str(other)), env=ENV)
    assert r.code == 2, r.output
    line = r.stderr.strip().splitlines()[-1]
    assert "of the student's vocabulary the same ids, below distill.min_aligned 95%" in line
    assert "distillation across tokenizers is not supported" in line


@pytest.mark.slow
def test_resume_mid_kd_continues_the_same_loss_curve(tmp_path: Path, pairs: Path) -> None:  # noqa: F811
    kd = {"distill": {"top_k": 8, "weight": 0.5, "loss": "forward_kl", "tail": "renormalize", "temperature": 2.0}}
    whole = config(tmp_path, pairs, name="whole", epochs=5, **kd)
    killed = config(tmp_path, pairs, name="killed", epochs=5, **kd)
    assert run_cli("run", whole, env=ENV).code == 0
    kill_past_checkpoint(killed, tmp_path / "killed", step=10)
    r = run_cli("run", killed, env=ENV)
    assert r.code == 0 and "resuming at step" in r.stderr, r.output
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    kd_curve = [row["kd_loss"] for row in metric_rows(tmp_path / "whole") if "kd_loss" in row]
    assert kd_curve == [row["kd_loss"] for row in metric_rows(tmp_path / "killed") if "kd_loss" in row]
    assert kd_curve[-1] < kd_curve[0] or kd_curve[0] < 1e-6
