"""Properties of the distillation losses over stored top-k logprobs (`SparseTeacher`): a student identical
to the teacher gets 0 at every temperature, masked slots are absent from both sides, and the gradients
are those of the divergence written out plainly over the same distributions."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stillhouse.common.datasets.sparse_logprobs import LOGPROB_FLOOR
from stillhouse.common.jobspec import LossSpec
from stillhouse.trainer.losses import SparseTeacher, distillation_loss

KINDS = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.1), ("jsd", 0.5), ("jsd", 0.9)]


def loss_spec(kind: str, temperature: float, beta: float = 0.5, ce_weight: float = 0.0) -> LossSpec:
    return LossSpec.model_validate(
        {"kind": kind, "temperature": temperature, "beta": beta, "ceWeight": ce_weight}
    )


def stored_top_k(teacher_logits: torch.Tensor, k: int, masked: torch.Tensor) -> SparseTeacher:
    """The teacher's top-k as stored (`sparse_logprobs` conventions): the last `masked[b, t]` slots of a
    position are masked (id -1 at the floor), and the tail holds every token outside the known ids; a
    position with every slot masked has a tail of 0."""
    log_p = teacher_logits.double().log_softmax(-1)
    top = log_p.topk(k, dim=-1)
    slot = torch.arange(k)
    is_masked = slot >= (k - masked).unsqueeze(-1)
    ids = torch.where(is_masked, -1, top.indices)
    logprobs = torch.where(is_masked, LOGPROB_FLOOR, top.values)
    known_mask = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, top.indices, ~is_masked)
    tail = log_p.masked_fill(known_mask, -math.inf).logsumexp(-1)
    tail = torch.where(masked == k, 0.0, tail.clamp_min(LOGPROB_FLOOR))
    return SparseTeacher(ids, logprobs.float(), tail.float())


def dense_divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """The divergence per row between two full distributions, written out plainly."""
    p, q = log_p.exp(), log_q.exp()
    forward = (p * (log_p - log_q)).sum(-1)
    reverse = (q * (log_q - log_p)).sum(-1)
    if kind == "forward_kl":
        return forward
    if kind == "reverse_kl":
        return reverse
    log_m = (beta * p + (1 - beta) * q).log()
    return beta * (p * (log_p - log_m)).sum(-1) + (1 - beta) * (q * (log_q - log_m)).sum(-1)


@settings(max_examples=80, deadline=None)
@given(
    kind_beta=st.sampled_from(KINDS),
    temperature=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
    k=st.sampled_from([1, 5, 20]),
    extra_vocab=st.integers(0, 40),
    sharpness=st.floats(0.1, 12.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_a_student_identical_to_the_teacher_gets_zero(
    kind_beta: tuple[str, float], temperature: float, k: int, extra_vocab: int, sharpness: float, seed: int
):
    kind, beta = kind_beta
    vocab = k + extra_vocab
    generator = torch.Generator().manual_seed(seed)
    batch, steps = 2, 7
    logits = sharpness * torch.randn(batch, steps, vocab, generator=generator)
    masked = torch.randint(0, k + 1, (batch, steps), generator=generator)
    masked[0, 0] = 0  # at least one position with a known distribution
    masked[1, -1] = k  # and one where nothing is known (an end-of-sequence label)
    labels = logits.argmax(-1)
    labels[0, 1] = -100
    teacher = stored_top_k(logits, k, masked)
    student = logits.clone().requires_grad_()

    result = distillation_loss(student, labels, loss_spec(kind, temperature, beta), teacher)

    counted = labels != -100
    assert result.tokens == int(counted.sum())
    assert result.kd_tokens == int((counted & (masked < k)).sum())
    assert abs(result.kd.item()) <= 1e-6
    assert abs(result.loss.item()) <= 1e-6
    result.loss.backward()
    assert student.grad.abs().max().item() <= 1e-5  # zero is the minimum


@pytest.mark.parametrize(("kind", "beta"), KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("left_out", [0, 1])
def test_gradients_match_the_dense_divergence_when_the_top_k_is_the_vocabulary(
    kind: str, beta: float, temperature: float, left_out: int
):
    # k = V (no tail) or k = V - 1 (a tail of one token): the buckets are the whole vocabulary, so the
    # loss is the divergence between softmax(teacher / T) and softmax(student / T), times T².
    generator = torch.Generator().manual_seed(3)
    batch, steps, vocab = 2, 5, 9
    teacher_logits = 3 * torch.randn(batch, steps, vocab, generator=generator)
    student_logits = 2 * torch.randn(batch, steps, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[1, :2] = -100
    teacher = stored_top_k(teacher_logits, vocab - left_out, torch.zeros(batch, steps, dtype=torch.long))

    sparse_logits = student_logits.clone().requires_grad_()
    sparse = distillation_loss(sparse_logits, labels, loss_spec(kind, temperature, beta, 0.3), teacher)
    sparse.loss.backward()

    dense_logits = student_logits.double().requires_grad_()
    counted = labels != -100
    log_p = (teacher_logits.double().log_softmax(-1) / temperature).log_softmax(-1)[counted]
    log_q = (dense_logits / temperature).log_softmax(-1)[counted]
    kd = dense_divergence(log_p, log_q, kind, beta).mean() * temperature**2
    ce = -dense_logits.log_softmax(-1)[counted].gather(-1, labels[counted].unsqueeze(-1)).mean()
    (0.7 * kd + 0.3 * ce).backward()

    assert sparse.kd.item() == pytest.approx(kd.item(), rel=1e-4, abs=1e-6)
    torch.testing.assert_close(sparse_logits.grad.double(), dense_logits.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kind", "beta"), KINDS)
@pytest.mark.parametrize("temperature", [0.5, 4.0])
@pytest.mark.parametrize("student", ["spread", "confident", "confident, one position unknown"])
def test_gradients_match_the_plain_bucket_divergence_with_a_wide_tail_and_masked_slots(
    kind: str, beta: float, temperature: float, student: str
):
    # k = 4 of V = 30 with some slots masked: the buckets are the known ids and the rest of the
    # vocabulary, each side projected at T = 1 and then tempered over the buckets. A confident student
    # has tails of about 1e-13, too small for 1 - top-k mass in float32.
    generator = torch.Generator().manual_seed(11)
    batch, steps, vocab, k = 2, 6, 30, 4
    teacher_logits = 4 * torch.randn(batch, steps, vocab, generator=generator)
    student_logits = 2 * torch.randn(batch, steps, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    masked = torch.randint(0, k, (batch, steps), generator=generator)
    if student != "spread":
        teacher_logits[..., 7] += 30.0
        student_logits[..., 7] += 30.0
    if student == "confident, one position unknown":
        masked[0, 2] = k
    teacher = stored_top_k(teacher_logits, k, masked)

    sparse_logits = student_logits.clone().requires_grad_()
    sparse = distillation_loss(sparse_logits, labels, loss_spec(kind, temperature, beta), teacher)
    sparse.loss.backward()

    dense_logits = student_logits.double().requires_grad_()
    total = torch.zeros((), dtype=torch.float64)
    for b in range(batch):
        for t in range(steps):
            ids = teacher.ids[b, t][teacher.ids[b, t] >= 0]
            outside = torch.ones(vocab, dtype=torch.bool).index_fill(0, ids, False)
            p = teacher_logits[b, t].double().softmax(-1)
            q = dense_logits[b, t].softmax(-1)
            buckets_p = torch.cat([p[ids], p[outside].sum().unsqueeze(0)])
            buckets_q = torch.cat([q[ids], q[outside].sum().unsqueeze(0)])
            log_p = (buckets_p.log() / temperature).log_softmax(-1)
            log_q = (buckets_q.log() / temperature).log_softmax(-1)
            total = total + dense_divergence(log_p, log_q, kind, beta)
    (total * temperature**2 / (batch * steps)).backward()

    expected = total.item() * temperature**2 / (batch * steps)
    assert sparse.loss.item() == pytest.approx(expected, rel=1e-4, abs=1e-7)
    torch.testing.assert_close(sparse_logits.grad.double(), dense_logits.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("kind", "beta"), KINDS)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_a_masked_slot_is_the_same_as_no_slot(kind: str, beta: float, temperature: float):
    # The top 3 with its third slot masked gives the loss and gradients of the top 2 with the same tail:
    # nothing is gathered at id -1, and token 0 (where a clamped -1 would point) gets no extra gradient.
    generator = torch.Generator().manual_seed(5)
    vocab = 12
    teacher_logits = 2 * torch.randn(1, 4, vocab, generator=generator)
    student_logits = torch.randn(1, 4, vocab, generator=generator)
    labels = torch.tensor([[1, 2, 3, 4]])
    two = stored_top_k(teacher_logits, 2, torch.zeros(1, 4, dtype=torch.long))
    three = SparseTeacher(
        torch.cat([two.ids, torch.full((1, 4, 1), -1)], dim=-1),
        torch.cat([two.logprobs, torch.full((1, 4, 1), LOGPROB_FLOOR)], dim=-1),
        two.tail_logprob,
    )
    results, gradients = [], []
    for teacher in (two, three):
        logits = student_logits.clone().requires_grad_()
        result = distillation_loss(logits, labels, loss_spec(kind, temperature, beta), teacher)
        result.loss.backward()
        results.append(result.loss.item())
        gradients.append(logits.grad)
    assert results[1] == pytest.approx(results[0], rel=1e-6)
    torch.testing.assert_close(gradients[1], gradients[0], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(("kind", "beta"), KINDS)
def test_a_position_with_every_slot_masked_counts_for_ce_only(kind: str, beta: float):
    vocab = 8
    logits = torch.randn(1, 2, vocab, generator=torch.Generator().manual_seed(2)).requires_grad_()
    teacher = SparseTeacher(
        ids=torch.tensor([[[3, 1], [-1, -1]]]),
        logprobs=torch.tensor([[[-0.5, -1.5], [LOGPROB_FLOOR, LOGPROB_FLOOR]]]),
        tail_logprob=torch.tensor([[math.log(1 - math.exp(-0.5) - math.exp(-1.5)), 0.0]]),
    )
    labels = torch.tensor([[3, 5]])
    both = distillation_loss(logits, labels, loss_spec(kind, 2.0, beta, 0.5), teacher)
    first = distillation_loss(
        logits[:, :1], labels[:, :1], loss_spec(kind, 2.0, beta, 0.5), teacher_at(teacher, 0)
    )

    assert both.tokens == 2 and both.kd_tokens == 1
    assert both.kd.item() == pytest.approx(first.kd.item() / 2, rel=1e-6)  # KD is 0 at the second
    ce_second = -logits[0, 1].log_softmax(-1)[5].item()
    assert both.ce.item() == pytest.approx((first.ce.item() + ce_second) / 2, rel=1e-6)
    both.loss.backward()
    assert torch.isfinite(logits.grad).all()


def teacher_at(teacher: SparseTeacher, position: int) -> SparseTeacher:
    where = slice(position, position + 1)
    return SparseTeacher(teacher.ids[:, where], teacher.logprobs[:, where], teacher.tail_logprob[:, where])


@pytest.mark.parametrize(("temperature", "old_figure"), [(2.0, 4.8), (4.0, 44.0)])
def test_a_student_identical_to_a_long_tailed_teacher_used_to_get_kl_4_8_at_t_2(
    temperature: float, old_figure: float
):
    # A language-model-like teacher (Zipf over a 49k vocabulary, stored top 5) and a student with the
    # same logits. Tempering the student over the vocabulary but the teacher's tail as one token gave
    # forward KL of the order of the 4.8 (T = 2) and 44 (T = 4); tempering both buckets alike
    # gives 0.
    generator = torch.Generator().manual_seed(13)
    positions, vocab, k = 16, 49_152, 5
    ranks = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(positions)]) + 1
    logits = -1.1 * ranks.double().log() + 0.3 * torch.randn(positions, vocab, generator=generator)
    logits = logits.float().unsqueeze(0)
    labels = logits.argmax(-1)
    teacher = stored_top_k(logits, k, torch.zeros(1, positions, dtype=torch.long))
    spec = loss_spec("forward_kl", temperature)

    new = distillation_loss(logits, labels, spec, teacher).kd.item()

    log_q = (logits[0].double() / temperature).log_softmax(-1)
    student_top = log_q.gather(-1, teacher.ids[0])
    student_buckets = torch.cat([student_top, (1 - student_top.exp().sum(-1)).log().unsqueeze(-1)], -1)
    teacher_buckets = torch.cat([teacher.logprobs[0], teacher.tail_logprob[0].unsqueeze(-1)], -1).double()
    teacher_buckets = (teacher_buckets / temperature).log_softmax(-1)
    old = dense_divergence(teacher_buckets, student_buckets, "forward_kl", 0.5).mean() * temperature**2

    assert old.item() > old_figure  # the setting shows the old bias ...
    assert abs(new) <= 1e-6  # ... which is gone
