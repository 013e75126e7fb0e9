"""Sparse knowledge-distillation losses: the student against the teacher's top-k next tokens.

With the teacher's log-probabilities l_1..l_k on its k most likely tokens (under its full softmax)
and the student's logits z over the whole vocabulary, per position:

  forward_kl, tail "rest"         KL over k + 1 buckets, the k tokens and "everything else":
                                  Σ p_i (l_i − log q_i) + p_r (log p_r − log q_r), with p_i = exp(l_i),
                                  p_r = 1 − Σ p_i and q_r = 1 − Σ q_i. Exact for what is known of the
                                  teacher; a student equal to its teacher scores 0.
  forward_kl, tail "renormalize"  KL(p' ‖ q) with p' the teacher's top-k renormalized and q the
                                  student's full softmax at those tokens (DistillKit's form): its
                                  minimum puts all the student's mass on the k tokens; the teacher
                                  itself scores −log Σ p_i.
  reverse_kl                      KL(s' ‖ p'), both renormalized over the k tokens.
  jsd                             the Jensen–Shannon divergence (β = 0.5) of s' and p'.

Temperature T divides both sides' logits (the teacher's renormalized top-k: l / T) and the loss
is scaled by T² so gradients keep their size (Hinton et al., 2015). Every loss is summed over
positions; the caller divides by the global batch's target count, as for the cross-entropy.

Written here rather than taken from TRL: its `GKDTrainer.generalized_jsd_loss` wants the teacher's
full logits in memory at every step (equal vocabularies, a teacher forward per step), while a
cached top-k costs k·6 bytes per token once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distill4all.config import DistillConfig

_TINY = 1e-12


def kd_loss(
    student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logprobs: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """Summed KD loss over n positions: student_logits (n, V), teacher_ids / teacher_logprobs (n, k).
    An entry whose logprob is -inf is padding (a position with fewer than k known tokens) and takes
    no part; a row with none known adds nothing."""
    z = student_logits.float()
    ids = teacher_ids.long()
    lp = teacher_logprobs.float()
    known = torch.isfinite(lp)
    rows = known.any(-1)
    lp = torch.where(known, lp, 0.0)  # finite everywhere, so that no 0 · inf reaches the gradient
    known[:, 0] |= ~rows  # an empty row is computed on a stand-in entry (logprob 0), then weighted 0
    t = cfg.temperature
    if cfg.tail == "rest":
        return (_forward_kl_rest(z, ids, lp, known) * rows).sum()
    teacher = _masked_log_softmax(lp / t, known)
    if cfg.loss == "forward_kl":
        student = F.log_softmax(z / t, dim=-1).gather(1, ids)
        loss = _expect(teacher, teacher - student, known)
    else:
        student = _masked_log_softmax(z.gather(1, ids) / t, known)
        if cfg.loss == "reverse_kl":
            loss = _expect(student, student - teacher, known)
        else:
            mid = torch.logsumexp(torch.stack([teacher, student]), dim=0) - torch.log(torch.tensor(2.0))
            loss = 0.5 * _expect(teacher, teacher - mid, known) + 0.5 * _expect(student, student - mid, known)
    return (loss * rows * t * t).sum()


def _masked_log_softmax(x: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """log_softmax over the known entries; the others get 0 (they are never read unmasked)."""
    out = F.log_softmax(x.masked_fill(~known, float("-inf")), dim=-1)
    return torch.where(known, out, 0.0)


def _expect(logp: torch.Tensor, values: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    """Σ exp(logp) · values over the known entries of each row."""
    return torch.where(known, logp.exp() * values, 0.0).sum(-1)


def _forward_kl_rest(z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor, known: torch.Tensor) -> torch.Tensor:
    student = F.log_softmax(z, dim=-1).gather(1, ids)
    p = torch.where(known, lp.exp(), 0.0)
    head = (p * (lp - student)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - torch.where(known, student.exp(), 0.0).sum(-1)).clamp_min(_TINY)
    # 0 · log 0 = 0: a teacher whose top-k holds all its mass adds nothing for the rest
    tail = torch.where(p_rest > _TINY, p_rest * (torch.log(p_rest.clamp_min(_TINY)) - torch.log(q_rest)), 0.0)
    return head + tail
