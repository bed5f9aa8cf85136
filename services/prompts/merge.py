"""The order-dependent half of the prompts stage: the shards' candidates merged in shard order.

Exact and near-duplicate removal and the held-out split depend on the prompts that came before, so they
run here, in one pass over every shard's candidates in shard order, which is the stage's arrival order:
the decisions are those of one process reading the whole input in order, whatever the sharding (a
near-duplicate pair split across two shards is found as if both were in one). The pass reads the hashes
and signatures the shards computed, never the texts, and copies the kept rows to the datasets as Arrow
columns. Memory holds one batch, an 8-byte hash per distinct prompt and the near-duplicate indexes.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pyarrow as pa

from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.prompts.cleaning import PromptCleaner
from stillhouse.prompts.shards import NUM_PERM, ShardSummary, read_candidates, user_text
from stillhouse.prompts.split import HoldoutSplitter

MERGE_BATCH_ROWS = 4096
# Seed prompts kept (a seeded uniform sample) for the strategies that show the teacher examples.
SEED_POOL_LIMIT = 10_000
SIDES = ("train", "holdout")
DATASET_COLUMNS = ["prompt_id", "messages"]


class SeedPool:
    """A seeded uniform sample of the kept source prompts (reservoir sampling): every one is equally
    likely to be in it."""

    def __init__(self, seed: int, limit: int = SEED_POOL_LIMIT) -> None:
        self.texts: list[str] = []
        self._limit = limit
        self._seen = 0
        self._sampler = random.Random(f"seed-pool:{seed}")

    def offer(self, text: str) -> None:
        self._seen += 1
        if len(self.texts) < self._limit:
            self.texts.append(text)
        elif (slot := self._sampler.randrange(self._seen)) < self._limit:
            self.texts[slot] = text


class CandidateMerge:
    """Cleans (duplicates), splits and writes the shards' candidates, one shard after another."""

    def __init__(
        self,
        store: ObjectStore,
        cleaner: PromptCleaner,
        splitter: HoldoutSplitter,
        writers: dict[str, DatasetWriter],
    ) -> None:
        self._store = store
        self.cleaner = cleaner
        self.splitter = splitter
        self._writers = writers
        self.written: Counter[str] = Counter()

    def merge(self, summary: ShardSummary, seed_pool: SeedPool | None = None) -> int:
        """Merge one shard (its removals counted, its candidates judged and written); offer the prompts
        written to `seed_pool`. Returns how many were written."""
        self.cleaner.count_removed(summary.removed)
        written = 0
        for batch in read_candidates(self._store, summary.key, MERGE_BATCH_ROWS):
            written += self._merge_batch(batch, seed_pool)
        return written

    def _merge_batch(self, batch: pa.RecordBatch, seed_pool: SeedPool | None) -> int:
        digests = batch.column("digest").to_numpy()
        signatures = batch.column("signature").flatten().to_numpy().reshape(-1, NUM_PERM)
        verdicts = self.cleaner.admit_prepared(digests, signatures)
        kept = np.flatnonzero(np.fromiter((verdict is None for verdict in verdicts), bool, len(verdicts)))
        keys = batch.column("split_key").take(pa.array(kept)).to_pylist()
        sides = np.asarray(self.splitter.assign_signed(keys, signatures[kept]), dtype=object)
        rows = batch.select(DATASET_COLUMNS)
        written = 0
        for side in SIDES:
            positions = kept[sides == side]
            if len(positions):
                self._writers[side].write_batch(rows.take(pa.array(positions)))
                self.written[side] += len(positions)
                written += len(positions)
        if seed_pool is not None:
            positions = kept[sides != "dropped"]
            for messages in batch.column("messages").take(pa.array(positions)).to_pylist():
                seed_pool.offer(user_text(messages))
        return written
