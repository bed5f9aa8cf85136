"""The student's lead over a control in words: lower KL and higher top-1 agreement are ahead, and an
interval that spans 0 is no clear difference."""

from __future__ import annotations

import pytest

from stillhouse.common.headline import lead_sentence


@pytest.mark.parametrize(
    ("metric", "low", "high", "verdict"),
    [
        ("kl", -0.3, -0.1, "ahead"),
        ("kl", 0.1, 0.3, "behind"),
        ("kl", -0.1, 0.1, "no clear difference"),
        ("top1_agreement", 0.01, 0.03, "ahead"),
        ("top1_agreement", -0.03, -0.01, "behind"),
        ("top1_agreement", -0.01, 0.01, "no clear difference"),
    ],
)
def test_each_metric_is_ahead_behind_or_not_clearly_either(metric, low, high, verdict):
    sentence = lead_sentence(
        {metric: {"difference": (low + high) / 2, "low": low, "high": high}}, "the control"
    )
    assert sentence.startswith("Against the control, paired over the held-out answers: ")
    assert sentence.endswith(f"{low:+.3f} to {high:+.3f}: {verdict}).")


def test_no_lead_is_no_sentence():
    assert lead_sentence({}, "the control") == ""
