"""The student's lead over another model on the same answers, with a paired bootstrap interval."""

from __future__ import annotations

import numpy as np
import pytest

from stillhouse.trainer.paired_lead import per_token_lead
from stillhouse.trainer.run_config import PairedLead

TOKENS = np.array([30.0, 45.0, 12.0, 60.0, 25.0, 38.0, 50.0, 20.0])


def test_the_same_figures_lead_by_nothing_with_no_doubt():
    figures = TOKENS * 0.5
    assert per_token_lead(figures, figures, TOKENS) == PairedLead(difference=0.0, low=0.0, high=0.0)


def test_the_lead_is_the_difference_of_the_per_token_figures_and_its_interval_holds_it():
    student, other = TOKENS * 0.6, TOKENS * np.linspace(0.3, 0.7, len(TOKENS))
    lead = per_token_lead(student, other, TOKENS)
    assert lead.difference == pytest.approx(student.sum() / TOKENS.sum() - other.sum() / TOKENS.sum())
    assert lead.low < lead.difference < lead.high


def test_ahead_on_every_answer_is_a_clear_lead():
    lead = per_token_lead(TOKENS * 0.7, TOKENS * 0.5, TOKENS)
    assert lead.low > 0 and lead.difference == pytest.approx(0.2)


def test_ahead_on_half_the_answers_and_behind_on_the_rest_is_no_clear_lead():
    swing = np.where(np.arange(len(TOKENS)) % 2 == 0, 0.2, -0.2) * TOKENS
    lead = per_token_lead(TOKENS * 0.5 + swing, TOKENS * 0.5, TOKENS)
    assert lead.low < 0 < lead.high


def test_answers_are_resampled_whole():
    # Two answers of many tokens each, one far ahead and one far behind: counted per token the lead
    # would look sure, but with two answers nothing is.
    tokens = np.array([1000.0, 1000.0, 1000.0])
    lead = per_token_lead(np.array([900.0, 100.0, 500.0]), np.array([100.0, 900.0, 500.0]), tokens)
    assert lead.low < -0.2 and lead.high > 0.2


def test_the_interval_is_the_same_for_the_same_seed():
    student, other = TOKENS * np.linspace(0.4, 0.6, len(TOKENS)), TOKENS * 0.5
    assert per_token_lead(student, other, TOKENS) == per_token_lead(student, other, TOKENS)


def test_fewer_than_two_answers_or_no_tokens_have_no_lead():
    assert per_token_lead(np.array([3.0]), np.array([1.0]), np.array([5.0])) is None
    assert per_token_lead(np.zeros(3), np.zeros(3), np.zeros(3)) is None
