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
    """Summed KD loss over n positions: student_logits (n, V), teacher_ids / teacher_logprobs (n, k)."""
    z = student_logits.float()
    ids = teacher_ids.long()
    lp = teacher_logprobs.float()
    t = cfg.temperature
    if cfg.tail == "rest":
        return _forward_kl_rest(z, ids, lp).sum()
    teacher = F.log_softmax(lp / t, dim=-1)
    if cfg.loss == "forward_kl":
        student = F.log_softmax(z / t, dim=-1).gather(1, ids)
        loss = (teacher.exp() * (teacher - student)).sum(-1)
    else:
        student = F.log_softmax(z.gather(1, ids) / t, dim=-1)
        if cfg.loss == "reverse_kl":
            loss = (student.exp() * (student - teacher)).sum(-1)
        else:
            mid = torch.logsumexp(torch.stack([teacher, student]), dim=0) - torch.log(torch.tensor(2.0))
            loss = 0.5 * (teacher.exp() * (teacher - mid)).sum(-1) + 0.5 * (student.exp() * (student - mid)).sum(-1)
    return (loss * t * t).sum()


def _forward_kl_rest(z: torch.Tensor, ids: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    student = F.log_softmax(z, dim=-1).gather(1, ids)
    p = lp.exp()
    head = (p * (lp - student)).sum(-1)
    p_rest = (1.0 - p.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - student.exp().sum(-1)).clamp_min(_TINY)
    # 0 · log 0 = 0: a teacher whose top-k holds all its mass adds nothing for the rest
    tail = torch.where(p_rest > _TINY, p_rest * (torch.log(p_rest.clamp_min(_TINY)) - torch.log(q_rest)), 0.0)
    return head + tail
