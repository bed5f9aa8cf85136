"""The Prometheus metrics of teacher calls, recorded where each answer or failure comes back: requests by
outcome (answered, cached, or the failure's kind), the tokens and dollars paid, the time an answer took;
and the budgets of the teacher stages running now against what they have spent.

Labels: the backend (an enum), the model (named by jobs, so kept to `MODEL_LABEL_LIMIT` distinct values
per process, later ones counted as "other"), the outcome and token kind (enums). No job id.
"""

from __future__ import annotations

from collections.abc import Iterator

import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.metric_labels import BoundedLabelValues
from stillhouse.teacher.calls import FailureKind, TeacherAnswer
from stillhouse.teacher.ledger import Budget, Ledger, Price

MODEL_LABEL_LIMIT = 50
_model_label = BoundedLabelValues(MODEL_LABEL_LIMIT)

TEACHER_REQUESTS = prometheus_client.Counter(
    "stillhouse_teacher_requests_total",
    "Prompts put to the teacher, by backend, model and outcome: answered, cached (from the answer cache, "
    "not sent), or the kind of failure after the retries.",
    ["backend", "model", "outcome"],
)
TEACHER_TOKENS = prometheus_client.Counter(
    "stillhouse_teacher_tokens_total",
    "Tokens of answers the teacher gave (not from the cache), by backend, model and kind: prompt or "
    "completion.",
    ["backend", "model", "kind"],
)
TEACHER_COST = prometheus_client.Counter(
    "stillhouse_teacher_cost_usd_total",
    "Dollars of answers the teacher gave (not from the cache), at the price table's prices.",
    ["backend", "model"],
)
TEACHER_SECONDS = prometheus_client.Histogram(
    "stillhouse_teacher_request_seconds",
    "Time the teacher took to give an answer (the successful attempt).",
    ["backend", "model"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320),
)
BUDGET_STOPS = prometheus_client.Counter(
    "stillhouse_teacher_budget_stops_total",
    "Teacher stages that stopped asking because their budgetUSD was spent, by backend and model.",
    ["backend", "model"],
)


def _labels(spec: TeacherSpec) -> tuple[str, str]:
    return spec.backend.value, _model_label(spec.model)


def answered(spec: TeacherSpec, answer: TeacherAnswer, price: Price, *, cached: bool) -> None:
    backend, model = _labels(spec)
    TEACHER_REQUESTS.labels(backend, model, "cached" if cached else "answered").inc()
    if cached:
        return
    TEACHER_TOKENS.labels(backend, model, "prompt").inc(answer.prompt_tokens)
    TEACHER_TOKENS.labels(backend, model, "completion").inc(answer.completion_tokens)
    TEACHER_COST.labels(backend, model).inc(price.cost_usd(answer.prompt_tokens, answer.completion_tokens))
    TEACHER_SECONDS.labels(backend, model).observe(answer.latency_seconds)


def failed(spec: TeacherSpec, kind: FailureKind) -> None:
    TEACHER_REQUESTS.labels(*_labels(spec), kind.value).inc()


def budget_stopped(spec: TeacherSpec) -> None:
    BUDGET_STOPS.labels(*_labels(spec)).inc()


class RunningBudgets(Collector):
    """The teacher stages running now that have a budget, read live from their ledgers at each scrape."""

    def __init__(self) -> None:
        self._runs: dict[int, tuple[Budget, Ledger]] = {}

    def began(self, budget: Budget, ledger: Ledger) -> None:
        if budget.limit_usd is not None:
            self._runs[id(ledger)] = (budget, ledger)

    def ended(self, ledger: Ledger) -> None:
        self._runs.pop(id(ledger), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        runs = [(budget.limit_usd or 0.0, ledger.cost_usd) for budget, ledger in list(self._runs.values())]
        yield GaugeMetricFamily(
            "stillhouse_teacher_budget_usd",
            "Sum of the budgetUSD of the teacher stages running now (those with a budget).",
            value=sum(limit for limit, _ in runs),
        )
        yield GaugeMetricFamily(
            "stillhouse_teacher_budget_spent_usd",
            "What the teacher stages running now with a budget have spent of it.",
            value=sum(spent for _, spent in runs),
        )
        yield GaugeMetricFamily(
            "stillhouse_teacher_budget_used_ratio",
            "The largest share of its budgetUSD that any teacher stage running now has spent (0 to 1).",
            value=max((spent / limit if limit > 0 else 1.0 for limit, spent in runs), default=0.0),
        )


RUNNING_BUDGETS = RunningBudgets()
prometheus_client.REGISTRY.register(RUNNING_BUDGETS)
