"""Distillation losses against values worked out by hand on a three-token vocabulary, and the properties
that tie the sparse (top-k + tail) path to the exact one over full logits."""

from __future__ import annotations

import math

import pytest
import torch

from stillhouse.common.jobspec import LossSpec
from stillhouse.trainer.losses import LossBreakdown, SparseTeacher, distillation_loss

# One position that counts and one masked position, V = 3. Teacher p and student q at the first:
P = (0.1, 0.6, 0.3)
Q = (0.5, 0.25, 0.25)
LABEL = 0  # the token the teacher generated there: CE = -log q[0] = log 2

FORWARD_KL = 0.1 * math.log(0.1 / 0.5) + 0.6 * math.log(0.6 / 0.25) + 0.3 * math.log(0.3 / 0.25)
REVERSE_KL = 0.5 * math.log(0.5 / 0.1) + 0.25 * math.log(0.25 / 0.6) + 0.25 * math.log(0.25 / 0.3)
# JSD(0.5): M = (0.3, 0.425, 0.275).
JSD_HALF = 0.5 * (
    0.1 * math.log(0.1 / 0.3) + 0.6 * math.log(0.6 / 0.425) + 0.3 * math.log(0.3 / 0.275)
) + 0.5 * (0.5 * math.log(0.5 / 0.3) + 0.25 * math.log(0.25 / 0.425) + 0.25 * math.log(0.25 / 0.275))
# JSD(0.25): M = 0.25 P + 0.75 Q = (0.4, 0.3375, 0.2625).
JSD_QUARTER = 0.25 * (
    0.1 * math.log(0.1 / 0.4) + 0.6 * math.log(0.6 / 0.3375) + 0.3 * math.log(0.3 / 0.2625)
) + 0.75 * (0.5 * math.log(0.5 / 0.4) + 0.25 * math.log(0.25 / 0.3375) + 0.25 * math.log(0.25 / 0.2625))


def spec(kind: str, **fields: object) -> LossSpec:
    return LossSpec.model_validate({"kind": kind, **fields})


def student_logits(dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[1, 2, 3]: Q at the first position (logits are log-probabilities plus a constant, which softmax
    ignores); the masked second position holds values that would overflow anything that looked at it."""
    logits = torch.tensor([[[math.log(q) + 3.0 for q in Q], [1e4, -1e4, 0.0]]], dtype=dtype)
    return logits.requires_grad_()


LABELS = torch.tensor([[LABEL, -100]])


def full_teacher() -> torch.Tensor:
    return torch.tensor([[[math.log(p) - 1.0 for p in P], [float("-inf"), 0.0, float("-inf")]]])


def sparse_teacher(ids: list[int], dtype: torch.dtype = torch.float32) -> SparseTeacher:
    """The teacher's top-k at the first position, `ids` in order, with the rest as the tail; the masked
    position has nothing but -inf."""
    logprobs = [math.log(P[i]) for i in ids]
    tail = 1.0 - sum(P[i] for i in ids)
    k = len(ids)
    return SparseTeacher(
        ids=torch.tensor([[ids, [0] * k]]),
        logprobs=torch.tensor([[logprobs, [float("-inf")] * k]], dtype=dtype),
        tail_logprob=torch.tensor(
            [[math.log(tail) if tail > 0 else float("-inf"), float("-inf")]], dtype=dtype
        ),
    )


def compute(
    kind: str, teacher: object, logits: torch.Tensor | None = None, **fields: object
) -> LossBreakdown:
    return distillation_loss(
        student_logits() if logits is None else logits, LABELS, spec(kind, **fields), teacher
    )


@pytest.mark.parametrize(
    ("kind", "fields", "expected"),
    [
        ("forward_kl", {}, FORWARD_KL),
        ("reverse_kl", {}, REVERSE_KL),
        ("jsd", {"beta": 0.5}, JSD_HALF),
        ("jsd", {"beta": 0.25}, JSD_QUARTER),
        ("jsd", {"beta": 0.0}, FORWARD_KL),
        ("jsd", {"beta": 1.0}, REVERSE_KL),
    ],
)
def test_divergences_over_full_logits_match_hand_computed_values(kind: str, fields: dict, expected: float):
    result = compute(kind, full_teacher(), **fields)
    assert result.tokens == 1
    assert result.kd.item() == pytest.approx(expected, rel=1e-5)
    assert result.loss.item() == pytest.approx(expected, rel=1e-5)
    assert result.ce.item() == pytest.approx(math.log(2), rel=1e-5)


def test_sft_is_cross_entropy_on_the_counted_tokens_and_ignores_the_teacher():
    result = compute("sft", None)
    assert result.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    assert result.kd.item() == 0.0 and result.tokens == 1
    result.loss.backward()


def test_sft_averages_per_token_not_per_sequence():
    # Two sequences: one with two counted tokens (q = 1/2 and 1/4 of the label), one with one (q = 1/4).
    logits = torch.log(
        torch.tensor([[[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]], [[0.25, 0.5, 0.25], [1.0, 1.0, 1.0]]])
    )
    labels = torch.tensor([[0, 0], [2, -100]])
    result = distillation_loss(logits, labels, spec("sft"), None)
    assert result.tokens == 3
    assert result.loss.item() == pytest.approx((math.log(2) + math.log(4) + math.log(4)) / 3, rel=1e-6)


def test_sparse_top1_projects_the_student_onto_the_teachers_buckets():
    # Teacher top-1 is token 1 (0.6), tail 0.4; the student's mass in the same buckets is 0.25 and 0.75.
    forward = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)
    reverse = 0.25 * math.log(0.25 / 0.6) + 0.75 * math.log(0.75 / 0.4)
    assert compute("forward_kl", sparse_teacher([1])).kd.item() == pytest.approx(forward, rel=1e-5)
    assert compute("reverse_kl", sparse_teacher([1])).kd.item() == pytest.approx(reverse, rel=1e-5)


def test_sparse_teacher_buckets_are_renormalised():
    # Stored logprobs are rounded: values that sum to 1.2 are read as (0.6, 0.4) / 1 after renormalising.
    teacher = SparseTeacher(
        ids=torch.tensor([[[1], [0]]]),
        logprobs=torch.tensor([[[math.log(0.72)], [0.0]]]),
        tail_logprob=torch.tensor([[math.log(0.48), 0.0]]),
    )
    forward = 0.6 * math.log(0.6 / 0.25) + 0.4 * math.log(0.4 / 0.75)
    assert compute("forward_kl", teacher).kd.item() == pytest.approx(forward, rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_with_a_one_token_tail_equals_the_exact_loss(kind: str):
    # k = V - 1: the tail is exactly the one token left out, so the buckets are the whole vocabulary.
    exact = compute(kind, full_teacher(), beta=0.3)
    sparse = compute(kind, sparse_teacher([1, 2]), beta=0.3)
    assert sparse.kd.item() == pytest.approx(exact.kd.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_sparse_and_full_agree_on_random_logits_when_the_tail_is_one_token(kind: str, temperature: float):
    generator = torch.Generator().manual_seed(7)
    batch, steps, vocab = 3, 6, 11
    teacher_logits = 3 * torch.randn(batch, steps, vocab, generator=generator)
    logits = torch.randn(batch, steps, vocab, generator=generator)
    labels = torch.randint(0, vocab, (batch, steps), generator=generator)
    labels[0, :2] = -100
    log_p = teacher_logits.log_softmax(-1)
    top = log_p.topk(vocab - 1, dim=-1)
    left_out = torch.ones_like(log_p, dtype=torch.bool).scatter(-1, top.indices, False)
    sparse = SparseTeacher(top.indices, top.values, log_p[left_out].view(batch, steps))
    loss_spec = spec(kind, temperature=temperature, beta=0.7, ceWeight=0.25)

    exact_logits = logits.clone().requires_grad_()
    exact = distillation_loss(exact_logits, labels, loss_spec, teacher_logits)
    exact.loss.backward()
    sparse_logits = logits.clone().requires_grad_()
    from_sparse = distillation_loss(sparse_logits, labels, loss_spec, sparse)
    from_sparse.loss.backward()

    assert from_sparse.tokens == exact.tokens == batch * steps - 2
    assert from_sparse.loss.item() == pytest.approx(exact.loss.item(), rel=1e-5)
    torch.testing.assert_close(sparse_logits.grad, exact_logits.grad, rtol=1e-4, atol=1e-6)


def test_sparse_with_the_whole_vocabulary_and_no_tail_equals_the_exact_loss():
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        logits = student_logits()
        result = compute(kind, sparse_teacher([1, 2, 0]), logits=logits)  # tail = -inf
        assert result.kd.item() == pytest.approx(compute(kind, full_teacher()).kd.item(), rel=1e-4, abs=1e-6)
        result.loss.backward()
        assert torch.isfinite(logits.grad).all()


def test_forward_kl_gradient_is_student_minus_teacher():
    # d KL(p || softmax(z)) / dz = q - p, here over one counted token.
    for teacher in (full_teacher(), sparse_teacher([1, 2])):
        logits = student_logits()
        compute("forward_kl", teacher, logits=logits).loss.backward()
        expected = torch.tensor([[[0.5 - 0.1, 0.25 - 0.6, 0.25 - 0.3], [0.0, 0.0, 0.0]]])
        torch.testing.assert_close(logits.grad, expected, rtol=1e-5, atol=1e-6)


def test_temperature_softens_both_sides_and_scales_kd_by_t_squared():
    # At T = 2 each distribution is proportional to the square root of its probabilities.
    p_norm = math.sqrt(0.1) + math.sqrt(0.6) + math.sqrt(0.3)
    q_norm = math.sqrt(0.5) + 2 * math.sqrt(0.25)
    p2 = [math.sqrt(p) / p_norm for p in P]
    q2 = [math.sqrt(q) / q_norm for q in Q]
    forward = 4 * sum(p * math.log(p / q) for p, q in zip(p2, q2, strict=True))
    result = compute("forward_kl", full_teacher(), temperature=2.0)
    assert result.kd.item() == pytest.approx(forward, rel=1e-5)
    assert result.ce.item() == pytest.approx(math.log(2), rel=1e-5)  # CE stays at T = 1

    # Sparse top-1: each side is projected onto the buckets (token 1, tail) at T = 1, then tempered over
    # them: the teacher's (0.6, 0.4) become (√0.6, √0.4) renormalised, the student's (0.25, 0.75) likewise.
    def tempered(top: float) -> tuple[float, float]:
        norm = math.sqrt(top) + math.sqrt(1 - top)
        return math.sqrt(top) / norm, math.sqrt(1 - top) / norm

    teacher_top, teacher_tail = tempered(0.6)
    student_top, student_tail = tempered(Q[1])
    sparse_forward = 4 * (
        teacher_top * math.log(teacher_top / student_top)
        + teacher_tail * math.log(teacher_tail / student_tail)
    )
    sparse = compute("forward_kl", sparse_teacher([1]), temperature=2.0)
    assert sparse.kd.item() == pytest.approx(sparse_forward, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_ce_weight_mixes_cross_entropy_into_the_loss(temperature: float):
    kd = compute("reverse_kl", full_teacher(), temperature=temperature).kd.item()
    mixed = compute("reverse_kl", full_teacher(), temperature=temperature, ceWeight=0.3)
    assert mixed.kd.item() == pytest.approx(kd, rel=1e-6)
    assert mixed.loss.item() == pytest.approx(0.7 * kd + 0.3 * math.log(2), rel=1e-5)
    all_ce = compute("reverse_kl", full_teacher(), temperature=temperature, ceWeight=1.0)
    assert all_ce.loss.item() == pytest.approx(math.log(2), rel=1e-5)


def test_jsd_tends_to_forward_and_reverse_kl_at_the_ends_once_scaled():
    near_zero = compute("jsd", full_teacher(), beta=1e-3).kd.item() / 1e-3
    near_one = compute("jsd", full_teacher(), beta=1 - 1e-3).kd.item() / 1e-3
    assert near_zero == pytest.approx(FORWARD_KL, rel=1e-2)
    assert near_one == pytest.approx(REVERSE_KL, rel=1e-2)


@pytest.mark.parametrize("kind", ["sft", "forward_kl", "reverse_kl", "jsd"])
def test_a_batch_with_no_counted_tokens_gives_zero_loss(kind: str):
    logits = student_logits()
    result = distillation_loss(logits, torch.full((1, 2), -100), spec(kind), sparse_teacher([1]))
    assert result.tokens == 0
    assert result.loss.item() == 0.0 and result.kd.item() == 0.0 and result.ce.item() == 0.0
    result.loss.backward()
    assert (logits.grad == 0).all()


def test_masked_positions_contribute_nothing():
    original = compute("forward_kl", full_teacher()).loss.item()
    teacher = full_teacher()
    teacher[0, 1] = torch.tensor([5.0, -3.0, 2.0])
    logits = student_logits().detach()
    logits[0, 1] = torch.tensor([-7.0, 4.0, 0.5])
    assert compute("forward_kl", teacher, logits=logits).loss.item() == pytest.approx(original, rel=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_floor_and_infinite_logprobs_float16_and_bf16_stay_finite(kind: str):
    # A confident teacher as stored: float16, top-2 at the -60 floor, an empty (-inf) tail; a bf16
    # student whose logits put almost all mass on one token.
    teacher = SparseTeacher(
        ids=torch.tensor([[[0, 1, 2], [0, 1, 2]]]),
        logprobs=torch.tensor([[[0.0, -60.0, float("-inf")], [0.0, -60.0, -60.0]]], dtype=torch.float16),
        tail_logprob=torch.tensor([[float("-inf"), -60.0]], dtype=torch.float16),
    )
    logits = torch.tensor(
        [[[80.0, -80.0, 0.0], [-80.0, 80.0, 0.0]]], dtype=torch.bfloat16, requires_grad=True
    )
    result = distillation_loss(
        logits, torch.tensor([[0, 1]]), spec(kind, temperature=2.0, ceWeight=0.5), teacher
    )
    assert torch.isfinite(result.loss) and result.loss.dtype == torch.float32
    result.loss.backward()
    assert torch.isfinite(logits.grad.float()).all()
    assert logits.grad.dtype == torch.bfloat16


def test_bf16_student_logits_are_computed_in_float32():
    float32 = compute("jsd", sparse_teacher([1]), logits=student_logits().detach().bfloat16().float())
    bf16 = compute("jsd", sparse_teacher([1]), logits=student_logits(torch.bfloat16))
    assert bf16.loss.dtype == torch.float32
    assert bf16.loss.item() == pytest.approx(float32.loss.item(), rel=1e-6)


def test_float16_teacher_values_give_the_float32_loss_within_their_rounding():
    exact = compute("forward_kl", sparse_teacher([1])).kd.item()
    half = compute("forward_kl", sparse_teacher([1], dtype=torch.float16)).kd.item()
    assert half == pytest.approx(exact, rel=2e-3)


def test_logit_losses_without_teacher_logprobs_are_refused():
    empty = SparseTeacher(
        ids=torch.zeros(1, 2, 0, dtype=torch.long),
        logprobs=torch.zeros(1, 2, 0),
        tail_logprob=torch.zeros(1, 2),
    )
    with pytest.raises(ValueError, match="k = 0"):
        compute("forward_kl", empty)
    with pytest.raises(ValueError, match="none were given"):
        compute("reverse_kl", None)
    assert compute("sft", empty).loss.item() == pytest.approx(math.log(2), rel=1e-6)


def test_mismatched_teacher_shapes_and_vocabularies_are_refused():
    with pytest.raises(ValueError, match="same vocabulary"):
        compute("forward_kl", torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="outside the student's vocabulary of 3"):
        compute(
            "forward_kl", SparseTeacher(torch.tensor([[[3], [0]]]), torch.zeros(1, 2, 1), torch.zeros(1, 2))
        )
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        SparseTeacher(torch.zeros(1, 2, 1, dtype=torch.long), torch.zeros(1, 2, 1), torch.zeros(1, 3))
