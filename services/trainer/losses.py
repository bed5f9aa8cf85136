"""Distillation losses: functions of tensors, for one batch of student logits.

Position t of the student's logits predicts ``labels[:, t]`` (the data pipeline has already shifted);
``labels == -100`` marks positions that do not count (prompt tokens, padding). Every loss is the mean over
the positions that count; a batch where none count gives a zero loss (and ``tokens == 0``), never NaN.

Kinds (`LossSpec.kind`):

- ``sft``: cross-entropy on the teacher's response tokens (sequence-level KD, Kim & Rush 2016). Works
  with any teacher; the teacher's logprobs are not used.
- ``forward_kl``: KL(teacher ‖ student), mode-covering.
- ``reverse_kl``: KL(student ‖ teacher), mode-seeking.
- ``jsd``: the generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024), with P the teacher
  and Q the student:
  JSD(β) = β·KL(P ‖ M) + (1 - β)·KL(Q ‖ M),  M = β·P + (1 - β)·Q.
  The formula itself vanishes at both ends (M becomes Q at β = 0 and P at β = 1), but JSD(β)/β tends to
  KL(P ‖ Q) as β → 0 and JSD(β)/(1 - β) to KL(Q ‖ P) as β → 1: as in GKD and TRL's GKDTrainer, β = 0
  *is* forward KL and β = 1 *is* reverse KL, computed as such (no log 0 at the ends).

Temperature T: both distributions are taken at T (logits / T) and the KD term is multiplied by T², as
Hinton et al. (2015) do, so that its gradients keep their size when T changes. Cross-entropy is always at
T = 1. With ``ceWeight`` w: loss = (1 - w)·KD + w·CE (``sft`` is CE alone).

The teacher signal is one of:

- `SparseTeacher`: the teacher's stored top-k logprobs and the log of the mass outside them (the
  "tail"). The teacher's distribution is taken over k + 1 buckets: its top-k tokens and the tail. The
  student's distribution is projected onto the same buckets: its log-softmax at the teacher's top-k ids,
  and the log of the rest of its mass. The divergence is between these two (k + 1)-bucket distributions,
  which for a tail of one token (k = V - 1) is the exact divergence over the vocabulary. Stored values are
  float16 rounded at T = 1, so the teacher's buckets are renormalised to sum to one. Temperature on stored
  logprobs: p_i^(1/T) renormalised over the k + 1 buckets. For the top-k tokens that is exact; the tail is
  treated as a single token, which is an approximation (the true tail at T is Σ p_j^(1/T) over the tokens
  it holds, which a single number cannot give).
- a tensor of full teacher logits [B, T, V] (a local teacher run beside the student): the exact
  divergence over the vocabulary.

Numerics: everything is computed in float32 (bf16 or float16 inputs are upcast). The teacher's logprobs
are floored at the storage floor (-60, probability 1e-26) so that -inf never meets a product or a
difference. The student's tail is log(1 - top-k mass), computed with log1mexp; a top-k mass that rounds
to 1 gives the floor too (tails below float32's resolution, about 1e-7, are rounding noise anyway).

Cost: the student's log-softmax over the vocabulary is computed once, over the positions that count, and
reused for CE and KD (a second pass is needed only for CE when T ≠ 1). The sparse path adds only [N, k]
work on top: nothing else of vocabulary size is materialised.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from stillhouse.common.jobspec import LossKind, LossSpec
from stillhouse.storage.sparse_logprobs import LOGPROB_FLOOR

IGNORE_INDEX = -100

_LOG_2 = math.log(2.0)
# The tail of the student is floored here: a top-k mass within this of 1 is rounding noise in float32.
_MIN_TAIL_MASS = math.exp(LOGPROB_FLOOR)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-k logprobs at each position of a batch (at T = 1, as stored).

    ids: LongTensor [B, T, K] token ids in the teacher's (= the student's) vocabulary.
    logprobs: [B, T, K] their natural-log probabilities (any float dtype; -inf and the -60 floor allowed).
    tail_logprob: [B, T] log of the probability mass outside the top K.
    """

    ids: Tensor
    logprobs: Tensor
    tail_logprob: Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 3 or self.logprobs.shape != self.ids.shape:
            raise ValueError(
                f"ids and logprobs must both have shape [B, T, K]; got {tuple(self.ids.shape)} and "
                f"{tuple(self.logprobs.shape)}"
            )
        if self.tail_logprob.shape != self.ids.shape[:2]:
            raise ValueError(
                f"tail_logprob must have shape [B, T] = {tuple(self.ids.shape[:2])}; "
                f"got {tuple(self.tail_logprob.shape)}"
            )

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


@dataclass(frozen=True)
class LossBreakdown:
    """`loss` is the scalar to call backward on; `kd` and `ce` are its parts per token (detached, for
    reporting; `kd` is 0 for `sft`); `tokens` is the number of positions that counted."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    tokens: int


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    spec: LossSpec,
    teacher: SparseTeacher | Tensor | None,
) -> LossBreakdown:
    """The loss `spec` asks for, averaged over the positions where ``labels != -100``. `student_logits`
    [B, T, V] (any float dtype), `labels` [B, T]; `teacher` a `SparseTeacher`, full teacher logits
    [B, T, V], or None (only for `sft`, which ignores it)."""
    if student_logits.dim() != 3 or labels.shape != student_logits.shape[:2]:
        raise ValueError(
            f"student_logits must be [B, T, V] and labels [B, T]; got {tuple(student_logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    vocab = student_logits.shape[-1]
    if spec.kind is not LossKind.SFT:
        _check_teacher(teacher, student_logits.shape, spec.kind)

    # Only the positions that count go through the vocabulary-sized work.
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    tokens = positions.numel()
    logits = _rows(student_logits.reshape(-1, vocab), positions)
    targets = _rows(flat_labels, positions)
    denominator = max(tokens, 1)

    temperature = spec.temperature
    sparse = isinstance(teacher, SparseTeacher) and spec.kind is not LossKind.SFT
    teacher_ids = _rows(teacher.ids.reshape(-1, teacher.k), positions).long() if sparse else None
    if spec.kind is LossKind.SFT or temperature == 1.0:
        log_q = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        # One gather for the teacher's top k and the label: each gather's backward is a [N, V] pass.
        label_column = targets.unsqueeze(-1)
        columns = label_column if teacher_ids is None else torch.cat([teacher_ids, label_column], dim=-1)
        picked = log_q.gather(-1, columns)
        ce = -picked[:, -1].sum() / denominator
        student_top = picked[:, :-1]
    else:
        # CE stays at T = 1. It needs a graph only when it is part of the loss (ceWeight > 0).
        with torch.set_grad_enabled(torch.is_grad_enabled() and spec.ce_weight > 0):
            logits32 = logits.float()
            ce = (logits32.logsumexp(dim=-1) - logits32.gather(-1, targets.unsqueeze(-1)).squeeze(-1)).sum()
            ce = ce / denominator
        log_q = F.log_softmax(logits.float() / temperature, dim=-1)
        student_top = log_q.gather(-1, teacher_ids) if teacher_ids is not None else None
    if spec.kind is LossKind.SFT:
        return LossBreakdown(loss=ce, kd=torch.zeros_like(ce).detach(), ce=ce.detach(), tokens=tokens)

    if sparse:
        assert isinstance(teacher, SparseTeacher) and student_top is not None
        teacher_buckets = _sparse_teacher_buckets(teacher, positions, temperature)
        kd_per_token = _divergence(_student_buckets(student_top), teacher_buckets, spec)
    else:
        assert isinstance(teacher, Tensor)
        teacher_logits = _rows(teacher.reshape(-1, vocab), positions).detach()
        log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1).clamp_min(LOGPROB_FLOOR)
        kd_per_token = _divergence(log_q, log_p, spec)

    kd = kd_per_token.sum() * temperature**2 / denominator
    loss = (1.0 - spec.ce_weight) * kd + spec.ce_weight * ce if spec.ce_weight > 0 else kd
    return LossBreakdown(loss=loss, kd=kd.detach(), ce=ce.detach(), tokens=tokens)


def _check_teacher(teacher: SparseTeacher | Tensor | None, student_shape: torch.Size, kind: LossKind) -> None:
    if teacher is None:
        raise ValueError(f"loss kind `{kind.value}` learns from the teacher's logprobs, but none were given")
    if isinstance(teacher, SparseTeacher):
        if teacher.ids.shape[:2] != student_shape[:2]:
            raise ValueError(
                f"teacher logprobs cover [B, T] = {tuple(teacher.ids.shape[:2])}, the student's logits "
                f"{tuple(student_shape[:2])}"
            )
        if teacher.k == 0:
            raise ValueError(
                f"loss kind `{kind.value}` needs the teacher's top-k logprobs, but k = 0 (the teacher gave "
                "none): set teacher.topLogprobs or use kind `sft`"
            )
        if teacher.ids.numel() and int(teacher.ids.max()) >= student_shape[-1]:
            raise ValueError(
                f"teacher token id {int(teacher.ids.max())} is outside the student's vocabulary of "
                f"{student_shape[-1]} tokens: teacher and student need the same tokenizer"
            )
        return
    if teacher.shape != student_shape:
        raise ValueError(
            f"full teacher logits must have the student's shape [B, T, V] = {tuple(student_shape)}; "
            f"got {tuple(teacher.shape)} (teacher and student need the same vocabulary)"
        )


def _rows(values: Tensor, positions: Tensor) -> Tensor:
    """The rows of `values` at `positions`; `values` itself when every row is kept (no copy)."""
    if positions.numel() == values.shape[0]:
        return values
    return values.index_select(0, positions)


def _sparse_teacher_buckets(teacher: SparseTeacher, positions: Tensor, temperature: float) -> Tensor:
    """The teacher's log-probabilities over its k + 1 buckets (top k, then the tail) at `temperature`,
    explicitly renormalised: [N, k + 1]."""
    logprobs = _rows(teacher.logprobs.reshape(-1, teacher.k), positions).float()
    tail = _rows(teacher.tail_logprob.reshape(-1, 1), positions).float()
    buckets = torch.cat([logprobs, tail], dim=-1).detach()
    # -inf (no mass) would make NaN of an all-(-inf) row in logsumexp and of 0 · log 0 below.
    buckets = buckets.clamp_min(LOGPROB_FLOOR) / temperature
    return (buckets - buckets.logsumexp(dim=-1, keepdim=True)).clamp_min(LOGPROB_FLOOR)


def _student_buckets(top: Tensor) -> Tensor:
    """The student's log-probabilities over the teacher's k + 1 buckets, from those at the teacher's
    top-k ids [N, k]: [N, k + 1]."""
    tail = _log1mexp(top.logsumexp(dim=-1, keepdim=True).clamp_max(-_MIN_TAIL_MASS))
    return torch.cat([top, tail], dim=-1)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012). Each branch gets only inputs it
    is finite on, so that neither puts NaN into the other's gradient."""
    near_zero = x > -_LOG_2
    small = torch.log(-torch.expm1(x.clamp_min(-_LOG_2)))
    large = torch.log1p(-torch.exp(x.clamp_max(-_LOG_2)))
    return torch.where(near_zero, small, large)


def _divergence(log_q: Tensor, log_p: Tensor, spec: LossSpec) -> Tensor:
    """Per-position divergence over the last dimension between the student `log_q` and the teacher
    `log_p` (both finite): [N]."""
    if spec.kind is LossKind.FORWARD_KL or (spec.kind is LossKind.JSD and spec.beta == 0.0):
        return _kl(log_p, log_q)
    if spec.kind is LossKind.REVERSE_KL or (spec.kind is LossKind.JSD and spec.beta == 1.0):
        return _kl(log_q, log_p)
    if spec.kind is LossKind.JSD:
        beta = spec.beta
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        return beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a ‖ b) per row, from log-probabilities."""
    return (log_a.exp() * (log_a - log_b)).sum(dim=-1)
