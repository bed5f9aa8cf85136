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

Temperature T: both distributions are tempered alike (p^(1/T), renormalised) and the KD term is multiplied
by T², as Hinton et al. (2015) do, so that its gradients keep their size when T changes. Cross-entropy is
always at T = 1. With ``ceWeight`` w: loss = (1 - w)·KD + w·CE (``sft`` is CE alone).

Unlikelihood (``unlikelihoodWeight`` u > 0; token-level, Welleck et al. 2020): at each position t, the
candidates are the distinct tokens that came earlier in t's own response, the label at t excepted, and the
term is -Σ log(1 - q_t(c)) over them, at T = 1; u times its mean over the positions is added to the loss
of every kind. Greedy answers of a small student trained on few answers loop ("a big team's a big team's
…"); the term makes putting mass back on what was already said cost something where the data did not say
it. Responses are told apart by `answers` (the response each position belongs to; by default each row of
`labels` is one response). When the labels are the student's own tokens (`own_tokens`: an on-policy step),
the label is exempt no longer where it completes a 4-gram already said in its response: such a label is
a candidate too (sequence-level unlikelihood, Welleck et al. 2020), since it is the student's loop itself.

The teacher signal is one of:

- `SparseTeacher`: the teacher's stored top-k logprobs (at T = 1) and the log of the mass outside them
  (the "tail"). Both distributions are taken over the same k + 1 buckets: the teacher's top-k tokens and
  the tail. The student is projected onto them at T = 1 (its log-softmax at the teacher's top-k ids, and
  the log of the rest of its mass), then each side is tempered over the buckets: p_i^(1/T) renormalised.
  So a student identical to the teacher gives 0 at every T. This is the divergence between the tempered
  (k + 1)-bucket projections, not between the tempered full distributions (a tail's mass at T cannot be
  had from its mass at 1); with a tail of one token (k = V - 1) or none (k = V) the two are the same.
  Stored values are float16 rounded at T = 1, so the teacher's buckets are renormalised to sum to one.
- a tensor of full teacher logits [B, T, V] (a local teacher run beside the student): the exact
  divergence over the vocabulary, both sides at softmax(logits / T).

Masked slots: a top-k slot with id -1 (an alternative whose id is unknown, or one the teacher did not
send; `sparse_logprobs`) is absent from both sides' buckets: it takes no mass, contributes nothing and
gets no gradient. Its probability belongs to the tail, where the stored tail already puts it. A position
with every slot masked (nothing of the teacher's distribution is known, e.g. an end-of-sequence label
added after the teacher stopped) contributes no KD but counts for CE and in the mean's denominator (so
that the loss stays a mean over labelled tokens, which is how the training loop weights micro-batches);
`LossBreakdown.kd_tokens` counts the positions that did have a KD term. When the known ids cover the
whole vocabulary (k = V), the tail bucket is empty and left out on both sides.

Numerics: everything is computed in float32 (bf16 or float16 inputs are upcast). The teacher's logprobs
are floored at the storage floor (-60, probability 1e-26) so that -inf never meets a product or a
difference. The student's tail is log(1 - top-k mass), computed with log1mexp, where that is accurate;
where the tail is below 1e-3 it is summed over the tokens outside the teacher's ids instead, because
float32 rounding of the top-k mass (about 1e-6 at worst) would swamp it, and tempering at T = 4 turns a
tail of 1e-12 into 1e-3. It is floored at the storage floor too.

Cost: the student's log-softmax over the vocabulary is computed once, over the positions that count, and
reused for CE and KD (a second pass is needed only for CE with full teacher logits at T ≠ 1). The sparse
path adds [N, k + 1] work, and for the positions with a small student tail, two passes over their
vocabulary row forward and two backward (in row chunks of bounded size, saving nothing beyond the
log-softmax that autograd keeps anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR, MASKED_ID
from stillhouse.common.jobspec import LossKind, LossSpec

IGNORE_INDEX = -100

_LOG_2 = math.log(2.0)
# A student tail taken as 1 - top-k mass is off by float32 rounding of that mass (about 1e-6 at worst):
# below this (log) tail, the relative error would matter once tempered, so the tail is summed exactly.
_EXACT_TAIL_BELOW = math.log(1e-3)
# Rows of the student's log-softmax handled at once when its tail is summed: the copy it needs stays
# below 2^26 float32 values (256 MiB).
_TAIL_CHUNK_VALUES = 1 << 26
# Sequence-level unlikelihood's unit: a label that repeats the 4 tokens ending at it (Welleck et al. 2020).
REPEATED_NGRAM = 4
# An earlier token the student is sure of costs at most -log(1e-6) ≈ 13.8 in unlikelihood, not infinity.
_MOST_CERTAIN_REPEAT = math.log1p(-1e-6)


@dataclass(frozen=True)
class SparseTeacher:
    """The teacher's top-k logprobs at each position of a batch (at T = 1, as stored).

    ids: LongTensor [B, T, K] token ids in the teacher's (= the student's) vocabulary; -1 marks a masked
    slot (see the module docstring), placed after the known slots of its position.
    logprobs: [B, T, K] their natural-log probabilities (any float dtype; -inf and the -60 floor allowed).
    tail_logprob: [B, T] log of the probability mass outside the known top-k ids.
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
    """`loss` is the scalar to call backward on; `kd`, `ce` and `unlikelihood` are its parts per token
    (detached, for reporting, before weighting; `kd` is 0 for `sft`, `unlikelihood` 0 unless weighted);
    `tokens` is the number of positions that counted, and `kd_tokens` those of them with a KD term (a
    position whose teacher slots are all masked has none)."""

    loss: Tensor
    kd: Tensor
    ce: Tensor
    tokens: int
    kd_tokens: int = 0
    unlikelihood: Tensor | None = None


def distillation_loss(
    student_logits: Tensor,
    labels: Tensor,
    spec: LossSpec,
    teacher: SparseTeacher | Tensor | None,
    answers: Tensor | None = None,
    own_tokens: bool = False,
) -> LossBreakdown:
    """The loss `spec` asks for, averaged over the positions where ``labels != -100``. `student_logits`
    [B, T, V] (any float dtype), `labels` [B, T]; `teacher` a `SparseTeacher`, full teacher logits
    [B, T, V], or None (only for `sft`, which ignores it); `answers` [B, T]: the response each position
    belongs to, for unlikelihood (default: one per row); `own_tokens`: the labels are the student's own
    generations, whose repeated 4-grams unlikelihood penalises too."""
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

    sparse = isinstance(teacher, SparseTeacher) and spec.kind is not LossKind.SFT
    teacher_ids = _rows(teacher.ids.reshape(-1, teacher.k), positions).long() if sparse else None
    earlier = (
        _EarlierTokens.of(
            targets, _rows(_answer_ids(labels, answers), positions), REPEATED_NGRAM if own_tokens else None
        )
        if spec.unlikelihood_weight > 0
        else None
    )
    student = _student_terms(logits, targets, spec, teacher_ids, earlier, denominator)
    ce = student.ce
    unlikelihood = (
        earlier.unlikelihood(student.earlier_logprobs) / denominator
        if earlier is not None
        else torch.zeros_like(ce)
    )
    if spec.kind is LossKind.SFT:
        return LossBreakdown(
            loss=ce + spec.unlikelihood_weight * unlikelihood if earlier is not None else ce,
            kd=torch.zeros_like(ce).detach(),
            ce=ce.detach(),
            tokens=tokens,
            unlikelihood=unlikelihood.detach(),
        )

    kd_sum, kd_tokens = _kd_sum(student, teacher, teacher_ids, positions, spec)
    kd = kd_sum * spec.temperature**2 / denominator
    loss = (1.0 - spec.ce_weight) * kd + spec.ce_weight * ce if spec.ce_weight > 0 else kd
    if earlier is not None:
        loss = loss + spec.unlikelihood_weight * unlikelihood
    return LossBreakdown(
        loss=loss,
        kd=kd.detach(),
        ce=ce.detach(),
        tokens=tokens,
        kd_tokens=kd_tokens,
        unlikelihood=unlikelihood.detach(),
    )


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
        if teacher.ids.numel() and int(teacher.ids.min()) < MASKED_ID:
            raise ValueError(
                f"teacher token id {int(teacher.ids.min())} is negative: ids are 0 or more, or {MASKED_ID} "
                "for a masked slot"
            )
        return
    if teacher.shape != student_shape:
        raise ValueError(
            f"full teacher logits must have the student's shape [B, T, V] = {tuple(student_shape)}; "
            f"got {tuple(teacher.shape)} (teacher and student need the same vocabulary)"
        )


def _answer_ids(labels: Tensor, answers: Tensor | None) -> Tensor:
    """The response of each position, flattened: `answers` as given, or the row's index."""
    if answers is None:
        rows = torch.arange(labels.shape[0], device=labels.device)
        return rows.unsqueeze(1).expand(labels.shape).reshape(-1)
    if answers.shape != labels.shape:
        raise ValueError(
            f"answers must have the labels' shape {tuple(labels.shape)}; got {tuple(answers.shape)}"
        )
    return answers.reshape(-1)


@dataclass(frozen=True)
class _EarlierTokens:
    """For each of N positions, a window of the W positions before it: `tokens` [N, W] are their labels,
    and `candidate` [N, W] marks the unlikelihood candidates: in the same response, the first occurrence
    of their token in it (so that each distinct token counts once), and not the position's own label.
    W is the longest response's length less one (responses are contiguous runs of positions).

    With `repeated_ngram` n, one more column holds each position's own label, a candidate where the n
    labels ending there already stood, in that order, earlier in the same response."""

    tokens: Tensor
    candidate: Tensor

    @classmethod
    def of(cls, targets: Tensor, answers: Tensor, repeated_ngram: int | None = None) -> _EarlierTokens:
        count = targets.numel()
        window = int(torch.unique_consecutive(answers, return_counts=True)[1].max()) - 1 if count else 0
        index = torch.arange(count, device=targets.device).unsqueeze(1)
        before = index - torch.arange(1, window + 1, device=targets.device)
        earlier = before.clamp_min(0)
        same_answer = (before >= 0) & (answers[earlier] == answers.unsqueeze(1))
        tokens = targets[earlier]
        same_token = same_answer & (tokens == targets.unsqueeze(1))
        first = ~same_token.any(dim=1)
        candidate = same_answer & first[earlier] & ~same_token
        if repeated_ngram is None:
            return cls(tokens, candidate)
        repeated = _repeats_ngram(same_token, answers, repeated_ngram)
        return cls(
            torch.cat([tokens, targets.unsqueeze(1)], 1), torch.cat([candidate, repeated.unsqueeze(1)], 1)
        )

    def unlikelihood(self, logprobs: Tensor) -> Tensor:
        """-Σ log(1 - q) over the candidates, given the student's log-probabilities of `tokens`."""
        terms = -_log1mexp(logprobs.clamp_max(_MOST_CERTAIN_REPEAT))
        return torch.where(self.candidate, terms, 0.0).sum()


def _repeats_ngram(same_token: Tensor, answers: Tensor, n: int) -> Tensor:
    """[N] whether the n labels ending at each position stood, in that order, earlier in its response.
    `same_token[i, w]`: label i equals label i - w - 1 of the same response."""
    match = same_token
    for back in range(1, n):
        shifted = torch.zeros_like(same_token)
        shifted[back:] = same_token[:-back] & (answers[back:] == answers[:-back]).unsqueeze(1)
        match = match & shifted
    return match.any(dim=1)


def _rows(values: Tensor, positions: Tensor) -> Tensor:
    """The rows of `values` at `positions`; `values` itself when every row is kept (no copy)."""
    if positions.numel() == values.shape[0]:
        return values
    return values[positions]  # not index_select, which is far slower on the CPU for wide rows


@dataclass(frozen=True)
class _StudentTerms:
    """What the loss needs of the student's logits at the positions that count: `log_q` [N, V] its
    log-softmax (at T, or at 1 where the sparse path tempers the buckets instead), `ce` the mean
    cross-entropy at T = 1, `teacher_top` [N, k] its log-probabilities at the teacher's ids (sparse path
    only) and `earlier_logprobs` [N, W] those of the unlikelihood window's tokens at T = 1."""

    log_q: Tensor
    ce: Tensor
    teacher_top: Tensor
    earlier_logprobs: Tensor


def _student_terms(
    logits: Tensor,
    targets: Tensor,
    spec: LossSpec,
    teacher_ids: Tensor | None,
    earlier: _EarlierTokens | None,
    denominator: int,
) -> _StudentTerms:
    k = teacher_ids.shape[-1] if teacher_ids is not None else 0
    if spec.kind is LossKind.SFT or teacher_ids is not None or spec.temperature == 1.0:
        # At T = 1: the sparse path tempers the buckets, not the logits.
        log_q = F.log_softmax(logits, dim=-1, dtype=torch.float32)
        # One gather for the teacher's top k, the label and the earlier tokens: each gather's backward is
        # a [N, V] pass. Masked slots (-1) gather column 0; `_sparse_divergence` leaves them out.
        columns = [targets.unsqueeze(-1)]
        if teacher_ids is not None:
            columns.insert(0, teacher_ids.clamp_min(0))
        if earlier is not None:
            columns.append(earlier.tokens)
        picked = log_q.gather(-1, torch.cat(columns, dim=-1))
        return _StudentTerms(
            log_q=log_q,
            ce=-picked[:, k].sum() / denominator,
            teacher_top=picked[:, :k],
            earlier_logprobs=picked[:, k + 1 :],
        )
    # CE and unlikelihood stay at T = 1. CE needs a graph only when it is part of the loss.
    logits32 = logits.float()
    with torch.set_grad_enabled(torch.is_grad_enabled() and (spec.ce_weight > 0 or earlier is not None)):
        log_partition = logits32.logsumexp(dim=-1, keepdim=True)
    with torch.set_grad_enabled(torch.is_grad_enabled() and spec.ce_weight > 0):
        ce = (log_partition - logits32.gather(-1, targets.unsqueeze(-1))).sum() / denominator
    earlier_logprobs = (
        logits32.gather(-1, earlier.tokens) - log_partition
        if earlier is not None
        else targets.new_zeros((targets.numel(), 0), dtype=torch.float32)
    )
    return _StudentTerms(
        log_q=F.log_softmax(logits32 / spec.temperature, dim=-1),
        ce=ce,
        teacher_top=logits32.new_zeros((targets.numel(), 0)),
        earlier_logprobs=earlier_logprobs,
    )


def _kd_sum(
    student: _StudentTerms,
    teacher: SparseTeacher | Tensor | None,
    teacher_ids: Tensor | None,
    positions: Tensor,
    spec: LossSpec,
) -> tuple[Tensor, int]:
    """The KD divergence summed over the positions that count, and how many of them had a term."""
    if isinstance(teacher, SparseTeacher):
        assert teacher_ids is not None
        return _sparse_divergence(student.log_q, student.teacher_top, teacher_ids, teacher, positions, spec)
    assert isinstance(teacher, Tensor)
    vocab = student.log_q.shape[-1]
    teacher_logits = _rows(teacher.reshape(-1, vocab), positions).detach()
    log_p = F.log_softmax(teacher_logits.float() / spec.temperature, dim=-1).clamp_min(LOGPROB_FLOOR)
    return _divergence(student.log_q, log_p, spec).sum(), positions.numel()


def _sparse_divergence(
    log_q: Tensor,
    student_top: Tensor,
    teacher_ids: Tensor,
    teacher: SparseTeacher,
    positions: Tensor,
    spec: LossSpec,
) -> tuple[Tensor, int]:
    """The summed divergence over the k + 1 buckets of the positions with at least one known slot, and
    how many those are. `log_q` [N, V]: the student's log-softmax at T = 1; `student_top` [N, k]: its
    values at the teacher's ids (anything at masked slots); `teacher_ids` [N, k]: those ids, -1 where
    masked."""
    known = teacher_ids != MASKED_ID
    compared = known.any(dim=-1).nonzero().squeeze(1)
    known = _rows(known, compared)
    ids = _rows(teacher_ids, compared)
    student_top = _rows(student_top, compared)
    student_tail = _student_tail(log_q, compared, ids, known, student_top)
    teacher_logprobs = _rows(_rows(teacher.logprobs.reshape(-1, teacher.k), positions), compared)
    teacher_tail = _rows(_rows(teacher.tail_logprob.reshape(-1, 1), positions), compared)
    # The tail is a bucket unless the known ids are the whole vocabulary (ids are distinct).
    present = torch.cat([known, known.sum(dim=-1, keepdim=True) < log_q.shape[-1]], dim=-1)

    # -inf (no mass) would make NaN of 0 · log 0 below.
    teacher_buckets = torch.cat([teacher_logprobs, teacher_tail], dim=-1).float().detach()
    teacher_buckets = teacher_buckets.clamp_min(LOGPROB_FLOOR)
    student_buckets = torch.cat([student_top, student_tail.unsqueeze(-1)], dim=-1)

    log_p = _tempered(teacher_buckets, present, spec.temperature)
    log_q_buckets = _tempered(student_buckets, present, spec.temperature)
    return _divergence(log_q_buckets, log_p, spec, present).sum(), compared.numel()


def _student_tail(log_q: Tensor, rows: Tensor, ids: Tensor, known: Tensor, student_top: Tensor) -> Tensor:
    """The log of the student's mass outside the known `ids` [n, k] of `rows` of `log_q` [N, V], floored
    at the storage floor: [n]. As log(1 - mass at the ids) where that is accurate, summed over the
    vocabulary where it is not (small tails)."""
    known_mass = torch.where(known, student_top, -math.inf).logsumexp(dim=-1)
    tail = _log1mexp(known_mass.clamp_max(-math.exp(LOGPROB_FLOOR))).clamp_min(LOGPROB_FLOOR)
    small = (tail < _EXACT_TAIL_BELOW).nonzero().squeeze(1)
    if small.numel() == 0:
        return tail
    # A masked slot points at a known id of its row, so that only known ids leave the tail.
    first_known = ids.gather(-1, known.int().argmax(dim=-1, keepdim=True))
    outside_ids = torch.where(known, ids, first_known)[small]
    return tail.index_put((small,), _LogMassOutside.apply(log_q, rows[small], outside_ids))


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends (Mächler 2012). Each branch gets only inputs it
    is finite on, so that neither puts NaN into the other's gradient."""
    near_zero = x > -_LOG_2
    small = torch.log(-torch.expm1(x.clamp_min(-_LOG_2)))
    large = torch.log1p(-torch.exp(x.clamp_max(-_LOG_2)))
    return torch.where(near_zero, small, large)


class _LogMassOutside(torch.autograd.Function):
    """log Σ_{j ∉ ids[r]} exp(log_q[rows[r], j]) for each r, floored at the storage floor: [R]. Summed
    directly, not as log(1 - mass at ids), which float32 cannot resolve below a tail of about 1e-6 (and
    tempering at T = 4 turns a tail of 1e-12 into 1e-3). No shift by the maximum is needed: log_q ≤ 0,
    and a tail above the floor has a token above e^-71, far from float32's underflow. Row chunks bound
    the copy it needs; nothing of vocabulary size is saved but `log_q` itself (which log-softmax keeps
    anyway)."""

    @staticmethod
    def forward(ctx: Any, log_q: Tensor, rows: Tensor, ids: Tensor) -> Tensor:
        mass = torch.empty(rows.numel(), dtype=log_q.dtype, device=log_q.device)
        chunk = max(1, _TAIL_CHUNK_VALUES // max(log_q.shape[-1], 1))
        every_row = rows.numel() == log_q.shape[0]
        for start in range(0, rows.numel(), chunk):
            part = slice(start, start + chunk)
            values = log_q[part] if every_row else log_q[rows[part]]
            mass[part] = values.exp().scatter_(-1, ids[part], 0.0).sum(dim=-1)
        log_tail = mass.log()
        ctx.save_for_backward(log_q, rows, ids, log_tail)
        return log_tail.clamp_min(LOGPROB_FLOOR)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        log_q, rows, ids, log_tail = ctx.saved_tensors
        # d log_tail / d log_q[j] = q_j / tail outside the ids, 0 at them; 0 where the floor holds.
        scale = torch.where(log_tail > LOGPROB_FLOOR, grad * (-log_tail.clamp_min(LOGPROB_FLOOR)).exp(), 0.0)
        rows_grad = _rows(log_q, rows).exp().mul_(scale.unsqueeze(-1)).scatter_(-1, ids, 0.0)
        if rows.numel() == log_q.shape[0]:
            return rows_grad, None, None
        return torch.zeros_like(log_q).index_put_((rows,), rows_grad), None, None


def _tempered(buckets: Tensor, present: Tensor, temperature: float) -> Tensor:
    """Log-probabilities `buckets` [N, k + 1] at `temperature`: p^(1/T) renormalised over the buckets
    that are `present`; the absent ones hold 0 (a placeholder that `present` keeps out of every sum)."""
    scaled = torch.where(present, buckets / temperature, -math.inf)
    normalised = scaled - scaled.logsumexp(dim=-1, keepdim=True)
    return torch.where(present, normalised, 0.0)


def _divergence(log_q: Tensor, log_p: Tensor, spec: LossSpec, present: Tensor | None = None) -> Tensor:
    """Per-position divergence over the last dimension between the student `log_q` and the teacher
    `log_p` (both finite), over the entries that are `present` (all when None): [N]."""
    if spec.kind is LossKind.FORWARD_KL or (spec.kind is LossKind.JSD and spec.beta == 0.0):
        return _kl(log_p, log_q, present)
    if spec.kind is LossKind.REVERSE_KL or (spec.kind is LossKind.JSD and spec.beta == 1.0):
        return _kl(log_q, log_p, present)
    if spec.kind is LossKind.JSD:
        beta = spec.beta
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        return beta * _kl(log_p, log_m, present) + (1.0 - beta) * _kl(log_q, log_m, present)
    raise ValueError(f"unknown loss kind {spec.kind!r}")


def _kl(log_a: Tensor, log_b: Tensor, present: Tensor | None) -> Tensor:
    """KL(a ‖ b) per row, from log-probabilities, over the `present` entries (all when None)."""
    terms = log_a.exp() * (log_a - log_b)
    if present is not None:
        terms = torch.where(present, terms, 0.0)
    return terms.sum(dim=-1)
