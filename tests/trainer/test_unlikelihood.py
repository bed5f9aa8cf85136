"""Token-level unlikelihood (`loss.unlikelihoodWeight`): each distinct earlier token of the same response,
the label excepted, costs -log(1 - q) at a position."""

from __future__ import annotations

import math

import pytest
import torch

from stillhouse.common.jobspec import LossSpec
from stillhouse.trainer.data import collate
from stillhouse.trainer.losses import SparseTeacher, distillation_loss

# Two responses packed into one row: [5, 6, 5, 7, 6] and [9, 9, 5]. The candidates at each position are
# the distinct earlier tokens of its own response but its label.
LABELS = torch.tensor([[5, 6, 5, 7, 6, 9, 9, 5]])
ANSWERS = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1]])
CANDIDATES = [[], [5], [6], [5, 6], [5, 7], [], [], [9]]
VOCAB = 12


def spec(kind: str = "sft", **fields: object) -> LossSpec:
    return LossSpec.model_validate({"kind": kind, "unlikelihoodWeight": 1.0, **fields})


def random_logits(seed: int = 0) -> torch.Tensor:
    return torch.randn(
        1, LABELS.shape[1], VOCAB, generator=torch.Generator().manual_seed(seed)
    ).requires_grad_()


def by_hand(logits: torch.Tensor) -> float:
    """The mean over positions of -Σ log(1 - q) over `CANDIDATES`."""
    q = logits.detach()[0].float().softmax(dim=-1)
    total = sum(-math.log1p(-float(q[t, c])) for t, tokens in enumerate(CANDIDATES) for c in tokens)
    return total / LABELS.shape[1]


@pytest.mark.parametrize(
    ("kind", "fields", "teacher"),
    [
        ("sft", {}, None),
        ("forward_kl", {}, "sparse"),
        ("reverse_kl", {"temperature": 2.0}, "sparse"),
        ("jsd", {"temperature": 2.0}, "full"),
        ("forward_kl", {"temperature": 1.0}, "full"),
    ],
)
def test_the_term_is_the_sum_over_distinct_earlier_tokens_of_the_same_response(kind, fields, teacher):
    logits = random_logits()
    signal = {
        None: None,
        "full": torch.randn(1, LABELS.shape[1], VOCAB),
        "sparse": SparseTeacher(
            torch.arange(3).expand(1, LABELS.shape[1], 3),
            torch.full((1, LABELS.shape[1], 3), math.log(0.2)),
            torch.full((1, LABELS.shape[1]), math.log(0.4)),
        ),
    }[teacher]
    weighted = distillation_loss(
        logits, LABELS, spec(kind, unlikelihoodWeight=0.5, **fields), signal, ANSWERS
    )
    plain = distillation_loss(logits, LABELS, spec(kind, unlikelihoodWeight=0.0, **fields), signal, ANSWERS)
    assert weighted.unlikelihood.item() == pytest.approx(by_hand(logits), rel=1e-5)
    assert weighted.loss.item() == pytest.approx(plain.loss.item() + 0.5 * by_hand(logits), rel=1e-5)
    assert weighted.ce.item() == pytest.approx(plain.ce.item(), rel=1e-6)
    assert weighted.kd.item() == pytest.approx(plain.kd.item(), rel=1e-6)


def test_without_answers_each_row_is_one_response():
    logits = random_logits()
    packed = distillation_loss(logits, LABELS, spec(), None, ANSWERS).unlikelihood.item()
    one_row = distillation_loss(logits, LABELS, spec(), None).unlikelihood.item()
    # As one response, the second one's tokens also see the first's: position 5 (9) then has 5, 6 and 7.
    assert one_row > packed
    split = torch.cat([logits[:, :5], torch.cat([logits[:, 5:], logits[:, :2]], dim=1)])
    labels = torch.tensor([[5, 6, 5, 7, 6], [9, 9, 5, -100, -100]])
    assert distillation_loss(split, labels, spec(), None).unlikelihood.item() == pytest.approx(
        packed, rel=1e-6
    )


def test_the_gradient_lowers_earlier_tokens_only():
    logits = random_logits()
    distillation_loss(logits, LABELS, spec(), None, ANSWERS).loss.backward()
    with_term = logits.grad.clone()
    logits.grad = None
    distillation_loss(logits, LABELS, spec(unlikelihoodWeight=0.0), None, ANSWERS).loss.backward()
    difference = with_term - logits.grad
    # At position 3 (label 7), tokens 5 and 6 were said before: the term pushes their logits down.
    assert difference[0, 3, 5] > 0 and difference[0, 3, 6] > 0
    # Position 0 has no earlier token: nothing changes there.
    assert torch.allclose(difference[0, 0], torch.zeros(VOCAB), atol=1e-7)


def test_a_token_the_student_is_sure_of_costs_a_bounded_amount():
    logits = torch.full((1, 2, VOCAB), -50.0)
    logits[0, :, 5] = 50.0  # q(5) = 1 in float32 at both positions; position 1's label is 6
    logits.requires_grad_()
    result = distillation_loss(logits, torch.tensor([[5, 6]]), spec(), None)
    assert math.isfinite(result.loss.item())
    assert result.unlikelihood.item() == pytest.approx(-math.log(1e-6) / 2, rel=1e-3)
    result.loss.backward()
    assert torch.isfinite(logits.grad).all()


def test_positions_that_do_not_count_are_neither_candidates_nor_terms():
    logits = random_logits()
    labels = LABELS.clone()
    labels[0, 1] = -100  # token 6 at position 1 no longer counts
    result = distillation_loss(logits, labels, spec(), None, ANSWERS)
    q = logits.detach()[0].softmax(dim=-1)
    candidates = [[], None, [], [5], [5, 7], [], [], [9]]  # position 2's label is 5, its only earlier token
    total = sum(-math.log1p(-float(q[t, c])) for t, tokens in enumerate(candidates) if tokens for c in tokens)
    assert result.unlikelihood.item() == pytest.approx(total / 7, rel=1e-5)


def test_a_packed_batch_numbers_its_examples():
    class Example:
        def __init__(self, prompt: list[int], response: list[int]):
            self.prompt_ids, self.response_ids, self.teacher = prompt, response, None
            self.positions = len(prompt) + len(response) - 1

    examples = [Example([1, 2], [3, 4, 5]), Example([1], [6, 7]), Example([1, 2, 3], [8])]
    batch = collate(examples, [[0, 1], [2]], pad_token_id=0, teacher_k=None, length=8)
    answers = batch.answer_ids()
    labelled = batch.labels != -100
    assert batch.labels[labelled].tolist() == [3, 4, 5, 6, 7, 8]
    assert answers[labelled].tolist() == [1, 1, 1, 2, 2, 3]


def test_the_weight_is_bounded_in_the_spec():
    with pytest.raises(ValueError, match="unlikelihoodWeight"):
        LossSpec.model_validate({"unlikelihoodWeight": -1})
    with pytest.raises(ValueError, match="unlikelihoodWeight"):
        LossSpec.model_validate({"unlikelihoodWeight": 11})


# The student's own tokens (an on-policy step): two responses packed into one row. The first says
# 1 2 3 4 twice and then 1 2 3 again; the second, 1 2 3 4 2 3 4, repeats only a 3-gram (2 3 4), and its
# 1 2 3 4 stood only in the other response.
OWN_LABELS = torch.tensor([[1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 1, 2, 3, 4, 2, 3, 4]])
OWN_ANSWERS = torch.tensor([[0] * 11 + [1] * 7])
# Where the 4 labels ending at a position stood earlier in the same response.
REPEATED_AT = [7, 8, 9, 10]


def test_on_own_tokens_a_label_that_completes_a_repeated_4gram_is_penalised_too():
    logits = torch.randn(1, OWN_LABELS.shape[1], VOCAB, generator=torch.Generator().manual_seed(3))
    teacher_text = distillation_loss(logits, OWN_LABELS, spec(), None, OWN_ANSWERS)
    own = distillation_loss(logits, OWN_LABELS, spec(), None, OWN_ANSWERS, own_tokens=True)
    q = logits[0].softmax(dim=-1)
    labels = OWN_LABELS[0].tolist()
    extra = sum(-math.log1p(-float(q[t, labels[t]])) for t in REPEATED_AT) / len(labels)
    assert own.unlikelihood.item() == pytest.approx(teacher_text.unlikelihood.item() + extra, rel=1e-5)


def test_the_repeated_label_gets_a_gradient_that_lowers_it():
    logits = torch.zeros(1, OWN_LABELS.shape[1], VOCAB, requires_grad=True)
    plain = distillation_loss(logits, OWN_LABELS, spec(), None, OWN_ANSWERS)
    own = distillation_loss(logits, OWN_LABELS, spec(), None, OWN_ANSWERS, own_tokens=True)
    (gradient_plain,) = torch.autograd.grad(plain.loss, logits)
    (gradient_own,) = torch.autograd.grad(own.loss, logits)
    labels = OWN_LABELS[0].tolist()
    for t, label in enumerate(labels):
        difference = float(gradient_own[0, t, label] - gradient_plain[0, t, label])
        if t in REPEATED_AT:
            assert difference > 0  # descending the loss lowers the repeated label's logit more
        else:
            assert difference == pytest.approx(0.0, abs=1e-7)
