"""What a fan-out runs: one shard function over the payloads of a stage's shards."""

from __future__ import annotations

import importlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

# A shard's cumulative counters so far (any names: prompts done, cost...); the fan-out sums every shard's
# latest counters into the stage's progress.
ShardReport = Callable[[Mapping[str, float]], None]
# Answers one shard: its payload and where to report its counters; returns a small JSON-able result. It
# raises `OperationError` for a failure that ends the stage (no retry), anything else for one that a retry
# may cure.
ShardFunction = Callable[[dict[str, Any], ShardReport], Awaitable[dict[str, Any]]]
ProgressCallback = Callable[[dict[str, float]], None]


@dataclass(frozen=True)
class FanoutPlan:
    # "package.module:function": the shard function a Ray worker imports; it builds what it needs (object
    # store, caches, clients) from its own environment, never from the payload, which holds no secrets.
    function: str
    shards: Sequence[dict[str, Any]]
    cpus_per_shard: float = 1.0
    max_parallel: int = 0
    max_retries: int = 3
    # Custom Ray resources each shard task asks for, beside its CPUs.
    resources: Mapping[str, float] = field(default_factory=dict)
    labels: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shards", tuple(self.shards))

    def to_json(self) -> str:
        return json.dumps(
            {
                "function": self.function,
                "shards": list(self.shards),
                "cpus_per_shard": self.cpus_per_shard,
                "max_parallel": self.max_parallel,
                "max_retries": self.max_retries,
                "resources": dict(self.resources),
                "labels": dict(self.labels),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> FanoutPlan:
        document = json.loads(text)
        return cls(
            function=document["function"],
            shards=tuple(document["shards"]),
            cpus_per_shard=float(document["cpus_per_shard"]),
            max_parallel=int(document["max_parallel"]),
            max_retries=int(document["max_retries"]),
            resources={name: float(amount) for name, amount in document.get("resources", {}).items()},
            labels=dict(document.get("labels", {})),
        )


def import_shard_function(reference: str) -> ShardFunction:
    module_name, _, name = reference.partition(":")
    if not module_name or not name:
        raise ValueError(f"shard function {reference!r} is not 'package.module:function'")
    return getattr(importlib.import_module(module_name), name)


def summed(counters: Mapping[int, Mapping[str, float]]) -> dict[str, float]:
    """Every shard's latest counters added up, name by name."""
    total: dict[str, float] = {}
    for shard_counters in counters.values():
        for name, value in shard_counters.items():
            total[name] = total.get(name, 0.0) + float(value)
    return total


class Fanout(Protocol):
    async def run(
        self, operation_id: str, plan: FanoutPlan, on_progress: ProgressCallback
    ) -> list[dict[str, Any]]:
        """Every shard's result, in shard order. Raises the `OperationError` of the first shard that ended
        the stage; cancelling the awaiting task stops every shard."""
        ...
