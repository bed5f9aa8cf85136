"""What the teacher stage spends: prices per model, the token and dollar ledger, and the budget.

Pure: no network, no clock. The stage keeps one `Ledger` per job and teacher, records every answer
in it, and asks its `Budget` before it starts each call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from fnmatch import fnmatchcase
from pathlib import Path

from pydantic import BaseModel, ConfigDict, NonNegativeFloat, ValidationError

from stillhouse.common.config import ConfigFileError, read_config_file
from stillhouse.teacher.calls import TeacherAnswer
from stillhouse.teacher.v1 import teacher_pb2

DEFAULT_PRICE_TABLE = Path(__file__).parent / "prices.yaml"
# Sums of float dollars drift by a few ulps; a call that fits to within this fits.
_USD_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Price:
    """USD per million tokens."""

    prompt_usd_per_million: float = 0.0
    completion_usd_per_million: float = 0.0

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.prompt_usd_per_million + completion_tokens * self.completion_usd_per_million
        ) / 1_000_000


FREE = Price()


class _PriceEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: NonNegativeFloat
    completion: NonNegativeFloat


class _PriceFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    default: _PriceEntry = _PriceEntry(prompt=0.0, completion=0.0)
    models: dict[str, _PriceEntry] = {}


class PriceTable:
    """Prices by model name. A name is looked up exactly first, then against the glob patterns
    (`gpt-4o*`, fnmatch syntax, case-sensitive) in the order they were given, first match wins;
    a model nothing matches costs `default` (free unless the table says otherwise: local models)."""

    def __init__(self, prices: Mapping[str, Price], default: Price = FREE) -> None:
        self._prices = dict(prices)
        self._default = default

    @classmethod
    def load(cls, path: Path | None = None) -> PriceTable:
        """Read a price table from YAML (the shipped `prices.yaml` when `path` is None):

        default: {prompt: 0, completion: 0}     # optional; USD per 1M tokens
        models:
          deepseek-chat: {prompt: 0.27, completion: 1.10}
          "gpt-4o*": {prompt: 2.50, completion: 10.00}
        """
        path = DEFAULT_PRICE_TABLE if path is None else path
        try:
            table = _PriceFile.model_validate(read_config_file(path))
        except ValidationError as error:
            problems = "; ".join(
                f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
                for problem in error.errors()
            )
            raise ConfigFileError(f"price table {path}: {problems}") from None
        return cls(
            {name: Price(entry.prompt, entry.completion) for name, entry in table.models.items()},
            Price(table.default.prompt, table.default.completion),
        )

    def has_price(self, model: str) -> bool:
        """Whether an entry names or matches `model` (so its cost is not just the default)."""
        return self._match(model) is not None

    def price(self, model: str) -> Price:
        found = self._match(model)
        return self._default if found is None else found

    def _match(self, model: str) -> Price | None:
        if model in self._prices:
            return self._prices[model]
        for pattern, price in self._prices.items():
            if fnmatchcase(model, pattern):
                return price
        return None


@dataclass
class Ledger:
    """Tokens and dollars of one job's calls to one teacher (or, added up, of more).

    `requests` counts every answer recorded, `cached_requests` those the cache gave. Tokens and cost
    are what the teacher was paid for: a cached answer adds a request and nothing else to them. The
    capture counts describe the answers, cached or not: `alternative_slots` top-k slots of the
    positions the servers sent, `masked_alternatives` of them masked, `top1_mismatches` positions
    where (at temperature 0) a known alternative beat the generated token, `stop_tokens_added`
    answers given an end-of-sequence label the server left out.
    """

    requests: int = 0
    cached_requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    alternative_slots: int = 0
    masked_alternatives: int = 0
    top1_mismatches: int = 0
    stop_tokens_added: int = 0

    def record(self, answer: TeacherAnswer, price: Price, *, cached: bool | None = None) -> float:
        """Count one answer (cached: `answer.cached` unless given); returns the dollars it added."""
        self.requests += 1
        if answer.logprobs is not None:
            sent_positions = answer.logprobs.num_tokens - int(answer.stop_token_added)
            self.alternative_slots += sent_positions * answer.logprobs.k
        self.masked_alternatives += answer.masked_alternatives
        self.top1_mismatches += answer.top1_mismatches
        self.stop_tokens_added += int(answer.stop_token_added)
        if answer.cached if cached is None else cached:
            self.cached_requests += 1
            return 0.0
        self.prompt_tokens += answer.prompt_tokens
        self.completion_tokens += answer.completion_tokens
        cost = price.cost_usd(answer.prompt_tokens, answer.completion_tokens)
        self.cost_usd += cost
        return cost

    def add(self, other: Ledger) -> None:
        for count in fields(self):
            setattr(self, count.name, getattr(self, count.name) + getattr(other, count.name))

    def __add__(self, other: Ledger) -> Ledger:
        total = Ledger()
        total.add(self)
        total.add(other)
        return total

    def to_proto(self) -> teacher_pb2.Ledger:
        return teacher_pb2.Ledger(**{count.name: getattr(self, count.name) for count in fields(self)})

    @classmethod
    def from_proto(cls, message: teacher_pb2.Ledger) -> Ledger:
        return cls(**{count.name: getattr(message, count.name) for count in fields(cls)})


@dataclass(frozen=True)
class Budget:
    """A hard limit on a job's teacher dollars; None means no limit.

    The rule: a call may start only if

        spent + in_flight + estimate <= limit_usd

    where `spent` is the ledger's cost so far, `in_flight` the sum of the estimates of calls started
    and not yet recorded, and `estimate` this call's. Once a call does not fit, the stage starts no
    new calls, lets the ones in flight finish and stops with `stopped_reason`. When every estimate
    is an upper bound of the call's real cost (prompt tokens counted generously, completion at
    `max_tokens`), the stage spends at most the limit, and ends less than one call's estimate under
    it. Free calls (estimate 0) always fit while nothing has overspent.
    """

    limit_usd: float | None = None

    def __post_init__(self) -> None:
        if self.limit_usd is not None and not self.limit_usd >= 0:
            raise ValueError(f"a budget must be 0 USD or more, not {self.limit_usd}")

    def would_exceed(self, ledger: Ledger, next_call_estimate_usd: float, in_flight_usd: float = 0.0) -> bool:
        """Whether starting a call estimated at `next_call_estimate_usd` could pass the limit."""
        if self.limit_usd is None:
            return False
        committed = ledger.cost_usd + in_flight_usd + next_call_estimate_usd
        return committed > self.limit_usd + _USD_TOLERANCE

    def exhausted(self, ledger: Ledger) -> bool:
        """Whether the ledger has spent the whole budget (no paid call can fit any more)."""
        return self.limit_usd is not None and ledger.cost_usd >= self.limit_usd - _USD_TOLERANCE

    @property
    def stopped_reason(self) -> str:
        """The `AnswerPromptsResult.stopped_reason` of a stage the budget stopped."""
        return f"budget of {self.limit_usd:.2f} USD reached"
