"""What tests and benchmarks of the teacher stage run it with, outside the service: prompts datasets, a
price table, a progress recorder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import PROMPTS_SCHEMA, prompt_id
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.teacher.ledger import Price, PriceTable

TENANT = "team-a"
# 100 USD / 1M prompt tokens and 1000 USD / 1M completion tokens: one call costs at most ~0.02 USD.
PRICES = PriceTable({"fake-teacher": Price(100.0, 1000.0)})


@dataclass
class RecordedProgress:
    """A `ProgressReporter` that keeps every update."""

    updates: list[dict[str, Any]] = field(default_factory=list)

    def update(self, **fields: Any) -> None:
        self.updates.append(fields)


def fake_teacher_spec(base_url: str, **overrides: Any) -> dict[str, Any]:
    """The `spec.teacher` document of the fake OpenAI-compatible server at `base_url`."""
    return {
        "backend": "openai",
        "baseURL": base_url,
        "model": "fake-teacher",
        "topLogprobs": 5,
        "sampling": {"temperature": 0.0, "maxTokens": 16},
        "limits": {"maxConcurrency": 4, "maxRetries": 2, "timeoutSeconds": 30},
        **overrides,
    }


def write_prompts(store: ObjectStore, dataset_id: str, texts: list[str], *, max_shard_rows: int = 70) -> None:
    """A prompts dataset of one user message per text, in small Parquet shards by default, so that a
    stage's shards start and end inside them and across them."""
    rows = []
    for text in texts:
        messages = [{"role": "user", "content": text}]
        rows.append({"prompt_id": prompt_id(messages), "messages": messages})
    lineage = Lineage(job_id="test", stage="prompts", input_ids=[], code_version="test")
    with DatasetWriter(store, dataset_id, PROMPTS_SCHEMA, lineage, max_shard_rows=max_shard_rows) as writer:
        writer.write_rows(rows)
        writer.commit()
