"""Label values from users stay a bounded set."""

from __future__ import annotations

import pytest

from stillhouse.common.metric_labels import OTHER, BoundedLabelValues


def test_the_first_values_stay_and_later_new_ones_are_other() -> None:
    label = BoundedLabelValues(limit=2, max_length=8)
    assert [label(v) for v in ["gpt-4o", "deepseek-chat", "gpt-4o", "llama", "deepseek-chat"]] == [
        "gpt-4o",
        "deepseek",
        "gpt-4o",
        OTHER,
        "deepseek",
    ]


def test_a_limit_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="limit must be at least 1, got 0"):
        BoundedLabelValues(limit=0)
