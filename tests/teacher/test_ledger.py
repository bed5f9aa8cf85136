"""Prices, the ledger, the budget rule and the cost estimate, on numbers worked out by hand."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from stillhouse.common.config import ConfigFileError
from stillhouse.common.datasets.sparse_logprobs import SparseLogprobs
from stillhouse.teacher.backends.openai_capture import with_end_label
from stillhouse.teacher.calls import ChatMessage, TeacherAnswer
from stillhouse.teacher.estimate import (
    approximate_token_count,
    call_estimate_usd,
    estimate_cost,
    prompt_tokens,
)
from stillhouse.teacher.ledger import Budget, Ledger, Price, PriceTable
from stillhouse.teacher.v1 import teacher_pb2

TABLE = """
models:
  deepseek-chat: {prompt: 0.27, completion: 1.10}
  "gpt-4o-mini*": {prompt: 0.15, completion: 0.60}
  "gpt-4o*": {prompt: 2.50, completion: 10.00}
  "*-mini": {prompt: 9.0, completion: 9.0}
"""


def answer(prompt_tokens: int, completion_tokens: int, *, cached: bool = False) -> TeacherAnswer:
    return TeacherAnswer(
        text="ok",
        finish_reason="stop",
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        latency_seconds=0.1,
        cached=cached,
    )


@pytest.fixture
def table(tmp_path: Path) -> PriceTable:
    path = tmp_path / "prices.yaml"
    path.write_text(TABLE)
    return PriceTable.load(path)


# Prices


def test_prices_are_found_by_exact_name_then_by_the_first_matching_pattern(table: PriceTable) -> None:
    assert table.price("deepseek-chat") == Price(0.27, 1.10)
    assert table.price("gpt-4o-mini-2024-07-18") == Price(0.15, 0.60)
    assert table.price("gpt-4o-2024-08-06") == Price(2.50, 10.00)
    # Both "gpt-4o*" and "*-mini" match; the one written first wins.
    assert table.price("gpt-4o-mini") == Price(0.15, 0.60)
    assert table.price("o3-mini") == Price(9.0, 9.0)


def test_a_model_the_table_does_not_know_is_free(table: PriceTable) -> None:
    assert table.price("HuggingFaceTB/SmolLM2-135M-Instruct") == Price(0.0, 0.0)
    assert not table.has_price("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert table.has_price("gpt-4o") and not table.has_price("GPT-4O")


def test_the_shipped_table_loads_and_prices_common_teachers() -> None:
    shipped = PriceTable.load()
    assert shipped.price("deepseek-chat").completion_usd_per_million > 0
    assert (
        shipped.price("gpt-4o-mini").prompt_usd_per_million < shipped.price("gpt-4o").prompt_usd_per_million
    )
    assert shipped.price("my-local-llama") == Price()


def test_a_bad_price_table_is_refused_naming_the_file_and_entry(tmp_path: Path) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text("models:\n  deepseek-chat: {prompt: -1, completion: 1.1}\n")
    with pytest.raises(ConfigFileError, match=r"prices.yaml: models.deepseek-chat.prompt: .*greater than"):
        PriceTable.load(path)
    path.write_text("models:\n  deepseek-chat: {input: 1, completion: 1.1}\n")
    with pytest.raises(ConfigFileError, match="input"):
        PriceTable.load(path)


def test_a_price_turns_tokens_into_dollars() -> None:
    # 1,000 prompt tokens at 0.27 USD/M + 500 completion tokens at 1.10 USD/M = 0.00027 + 0.00055.
    assert Price(0.27, 1.10).cost_usd(1_000, 500) == pytest.approx(0.00082)


# Ledger


def test_the_ledger_counts_paid_tokens_and_dollars_and_cached_calls_are_free() -> None:
    price = Price(2.0, 8.0)
    ledger = Ledger()

    assert ledger.record(answer(1_000, 250), price) == pytest.approx(0.004)  # 0.002 + 0.002
    assert ledger.record(answer(500, 500, cached=True), price) == 0.0
    assert ledger.record(answer(500, 500), price, cached=True) == 0.0
    assert ledger.record(answer(3_000, 1_000), price) == pytest.approx(0.014)  # 0.006 + 0.008

    assert (ledger.requests, ledger.cached_requests) == (4, 2)
    assert (ledger.prompt_tokens, ledger.completion_tokens) == (4_000, 1_250)
    assert ledger.cost_usd == pytest.approx(0.018)


def test_ledgers_add_up_and_travel_as_protos() -> None:
    job_on_first_teacher = Ledger(
        requests=3, cached_requests=1, prompt_tokens=10, completion_tokens=20, cost_usd=1.5
    )
    job_on_second_teacher = Ledger(
        requests=2, cached_requests=0, prompt_tokens=5, completion_tokens=7, cost_usd=0.25
    )

    total = job_on_first_teacher + job_on_second_teacher

    assert total == Ledger(
        requests=5, cached_requests=1, prompt_tokens=15, completion_tokens=27, cost_usd=1.75
    )
    assert total.to_proto() == teacher_pb2.Ledger(
        requests=5, cached_requests=1, prompt_tokens=15, completion_tokens=27, cost_usd=1.75
    )
    assert Ledger.from_proto(total.to_proto()) == total
    assert job_on_first_teacher.requests == 3  # adding makes a new ledger


def test_capture_counts_describe_every_answer_cached_or_not() -> None:
    logprobs = with_end_label(
        SparseLogprobs(
            token_ids=np.array([5, 6, 7], np.int32),
            topk_ids=np.array([[5, -1], [6, 9], [7, -1]], np.int32),
            topk_logprobs=np.array([[-0.1, -60], [-0.2, -2.0], [-0.1, -60]], np.float32),
            tail_logprob=np.array([-2.3, -2.0, -2.3], np.float32),
        ),
        eos_id=2,
    )
    captured = dataclasses.replace(
        answer(10, 3), logprobs=logprobs, masked_alternatives=2, top1_mismatches=1, stop_token_added=True
    )
    ledger = Ledger()
    ledger.record(captured, Price())
    ledger.record(captured, Price(), cached=True)
    ledger.record(answer(10, 3), Price())  # no logprobs: nothing to count
    # Three positions of two slots each per answer; the appended stop label is not a server position.
    assert (ledger.alternative_slots, ledger.masked_alternatives) == (12, 4)
    assert (ledger.top1_mismatches, ledger.stop_tokens_added) == (2, 2)
    assert Ledger.from_proto(ledger.to_proto()) == ledger
    assert (ledger + ledger).masked_alternatives == 8


# Budget


def test_a_call_starts_only_if_spent_plus_in_flight_plus_its_estimate_fits() -> None:
    budget = Budget(limit_usd=1.00)
    spent = Ledger(cost_usd=0.70)

    # 0.70 spent + 0.20 in flight + 0.10 = 1.00: exactly at the limit, fits.
    assert not budget.would_exceed(spent, 0.10, in_flight_usd=0.20)
    # 0.70 + 0.20 + 0.11 = 1.01: over.
    assert budget.would_exceed(spent, 0.11, in_flight_usd=0.20)
    # With nothing in flight there is room for 0.30 and no more.
    assert not budget.would_exceed(spent, 0.30)
    assert budget.would_exceed(spent, 0.31)
    assert not budget.exhausted(spent)


def test_a_stage_following_the_rule_stops_at_or_just_under_the_budget() -> None:
    # Every call is estimated at its worst case, 0.03 USD, and really costs 0.02 or 0.03 in turn; up to
    # four run at once. By hand: after 18 calls 0.45 is spent and the 19th is in flight (0.45 + 0.03 +
    # 0.03 > 0.50, so no 20th yet); the 19th costs 0.02, and at 0.47 + 0.03 = 0.50 the 20th fits; it
    # costs 0.03, and at 0.50 nothing more fits.
    budget, estimate, concurrency = Budget(limit_usd=0.50), 0.03, 4
    ledger, in_flight, real_costs = Ledger(), [], [0.02, 0.03] * 100
    while True:
        while len(in_flight) < concurrency and not budget.would_exceed(ledger, estimate, sum(in_flight)):
            in_flight.append(estimate)
        if not in_flight:
            break
        in_flight.pop()
        ledger.cost_usd += real_costs[ledger.requests]
        ledger.requests += 1

    assert ledger.requests == 20 and ledger.cost_usd == pytest.approx(0.50)
    assert budget.exhausted(ledger)


def test_budget_edges() -> None:
    assert not Budget(None).would_exceed(Ledger(cost_usd=1e9), 1e9)
    assert not Budget(None).exhausted(Ledger(cost_usd=1e9))
    # Free calls fit a zero budget; paid ones do not.
    assert not Budget(0.0).would_exceed(Ledger(), 0.0)
    assert Budget(0.0).would_exceed(Ledger(), 0.001)
    # Float sums land on the limit, not a few ulps over it.
    assert not Budget(0.3).would_exceed(Ledger(cost_usd=0.1), 0.2)
    assert Budget(0.3).exhausted(Ledger(cost_usd=0.1 + 0.2))
    assert Budget(50).stopped_reason == "budget of 50.00 USD reached"
    with pytest.raises(ValueError, match="0 USD or more"):
        Budget(-1.0)


# Estimate


def test_tokens_are_approximated_at_four_characters() -> None:
    assert [approximate_token_count(text) for text in ("", "abc", "abcd", "abcde")] == [0, 1, 1, 2]


def test_a_chat_costs_its_content_plus_template_overhead() -> None:
    chat = [ChatMessage("system", "x" * 40), ChatMessage("user", "y" * 10)]
    # (4 + 10) + (4 + 3) + 3 for the reply header
    assert prompt_tokens(chat) == 24
    assert prompt_tokens(chat, count_tokens=len) == 4 + 40 + 4 + 10 + 3
    # 24 prompt tokens at 1 USD/M + 100 completion tokens at 2 USD/M
    assert call_estimate_usd(chat, 100, Price(1.0, 2.0)) == pytest.approx(0.000224)


def test_the_estimate_on_hand_computed_numbers() -> None:
    prompts = [
        [ChatMessage("user", "a" * 400)],  # 4 + 100 + 3 = 107
        [ChatMessage("system", "b" * 8), ChatMessage("user", "c" * 36)],  # (4 + 2) + (4 + 9) + 3 = 22
        [ChatMessage("user", "")],  # 4 + 0 + 3 = 7
    ]
    price = Price(prompt_usd_per_million=0.27, completion_usd_per_million=1.10)

    worst = estimate_cost(prompts, max_tokens=512, price=price)
    likely = estimate_cost(iter(prompts), max_tokens=512, price=price, expected_completion_fraction=0.25)

    assert (worst.requests, worst.prompt_tokens, worst.completion_tokens) == (3, 136, 1_536)
    # 136 x 0.27 + 1,536 x 1.10 = 36.72 + 1,689.6 = 1,726.32 micro-dollars
    assert worst.cost_usd == pytest.approx(0.00172632)
    assert (likely.requests, likely.prompt_tokens, likely.completion_tokens) == (3, 136, 384)
    # 36.72 + 384 x 1.10 = 36.72 + 422.4 = 459.12 micro-dollars
    assert likely.cost_usd == pytest.approx(0.00045912)
    assert likely.to_proto() == teacher_pb2.CostEstimate(
        requests=3, prompt_tokens=136, completion_tokens=384, cost_usd=likely.cost_usd
    )


def test_an_estimate_of_nothing_is_zero_and_bad_inputs_are_refused() -> None:
    empty = estimate_cost([], max_tokens=512, price=Price(1.0, 1.0))
    assert (empty.requests, empty.prompt_tokens, empty.completion_tokens, empty.cost_usd) == (0, 0, 0, 0.0)
    with pytest.raises(ValueError, match="expected_completion_fraction"):
        estimate_cost([], max_tokens=512, price=Price(), expected_completion_fraction=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        estimate_cost([], max_tokens=-1, price=Price())
