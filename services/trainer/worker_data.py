"""One worker's training data, streamed from its Parquet shards: its memory stays the same however many
rows the dataset has.

Which rows: worker `rank` of `world` reads its own contiguous range of shards
(`DatasetReader.shard_range`). When that would leave a worker without a shard (fewer shards than
workers), every worker reads every shard and keeps the rows whose index in the whole dataset is `rank`
modulo `world`. Either way every row goes to exactly one worker.

Order of an epoch, the same for the same seed, epoch and rank on any machine: the worker's shards in a
shuffled order, their examples through a shuffle buffer of `shuffle_buffer` examples (each example read
takes the place of a random one in the buffer, which goes out; at the end the rest go out shuffled),
then packed into rows in that order (`data.pack_stream`). The shuffle is local: an example comes out at
most `shuffle_buffer` places before where it was read, and its neighbours come mostly from its shard.

Steps: an epoch has as many steps as the worker with the most packed rows needs
(`BatchPlan.steps_per_epoch`); a worker with fewer starts its epoch's rows over, as
`DistributedSampler` pads with repeats. The loop needs those counts before its first step (the learning
rate schedule spans the run), so `WorkerData.load` reads the worker's rows once first: it tallies what
becomes of them and writes each kept example's length to a small file per shard in a local folder
(`work_dir`). An epoch's count of packed rows then comes from the same shuffle and packing run over
the lengths alone.

Resuming at batch b of an epoch reads the epoch's rows again and skips those of its first b steps.

Memory: one record batch of `READ_BATCH_ROWS` rows decoded, the shuffle buffer, and one step's
examples. Shards are downloaded to files in `work_dir` (the one being read and the next), not into
memory. The teacher's top-k logprobs stay float16, as stored; `collate` widens them to float32 for
the loss.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from stillhouse.common.datasets.manifest import ShardRecord
from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.trainer.data import (
    TEACHER_COLUMNS,
    TEXT_COLUMNS,
    BatchPlan,
    DataCounts,
    StepBatch,
    TokenizedAnswer,
    pack_stream,
    tokenize_answer_batch,
)

# Rows decoded from Parquet at a time: with 512-token answers and top-20, about 60 MB of Arrow.
READ_BATCH_ROWS = 1024

Item = TypeVar("Item")


@dataclass(frozen=True)
class WorkerSlice:
    """The shards worker `rank` of `world` reads, and whether it keeps only every `world`-th row of them
    (`stride`: fewer shards than workers)."""

    rank: int
    world: int
    shards: tuple[int, ...]
    stride: bool

    @classmethod
    def of(cls, reader: DatasetReader, rank: int, world: int) -> WorkerSlice:
        ranges = [reader.shard_range(worker, world) for worker in range(world)]
        if all(len(shards) > 0 for shards in ranges):
            return cls(rank, world, tuple(ranges[rank]), stride=False)
        return cls(rank, world, tuple(range(len(reader.manifest.shards))), stride=True)

    def shard_batches(
        self, reader: DatasetReader, order: Sequence[int], columns: Sequence[str], spool_dir: Path
    ) -> Iterator[tuple[int, Iterator[pa.RecordBatch]]]:
        """Each of the shards in `order` (positions in `shards`): its index, and this worker's rows of
        it as record batches. Shards are downloaded to files in `spool_dir`, not into memory."""
        indices = [self.shards[position] for position in order]
        read = reader.read_shards(columns, indices, batch_size=READ_BATCH_ROWS, spool_dir=spool_dir)
        for shard, batches in read:
            yield shard, self._mine(batches, reader.manifest.shards, shard)

    def _mine(
        self, batches: Iterator[pa.RecordBatch], shards: Sequence[ShardRecord], shard: int
    ) -> Iterator[pa.RecordBatch]:
        if not self.stride:
            yield from batches
            return
        row = sum(record.num_rows for record in shards[:shard])  # the shard's first row in the dataset
        for batch in batches:
            mine = (np.arange(row, row + batch.num_rows) % self.world) == self.rank
            row += batch.num_rows
            yield batch.filter(pa.array(mine))


def shuffle_buffer(items: Iterable[Item], size: int, generator: np.random.Generator) -> Iterator[Item]:
    """`items` in a shuffled order, holding at most `size` of them: each new item takes the place of a
    random one in the full buffer, which goes out; the last `size` go out in a random permutation."""
    buffer: list[Item] = []
    draws: Iterator[int] = iter(())
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        slot = next(draws, None)
        if slot is None:  # drawn in blocks: one call per item would cost more than the shuffle
            draws = iter(generator.integers(0, size, 4096).tolist())
            slot = next(draws)
        yield buffer[slot]
        buffer[slot] = item
    for slot in generator.permutation(len(buffer)).tolist():
        yield buffer[slot]


@dataclass
class WorkerData:
    """One worker's training examples, read afresh from object storage for every epoch (module
    docstring). `counts`: what became of the rows (this worker's, or every worker's once `load`'s
    caller has summed them)."""

    reader: DatasetReader
    slice: WorkerSlice
    tokenizer: PreTrainedTokenizerBase
    use_teacher_tokens: bool
    require_teacher: bool  # drop examples without the teacher's top-k (a loss that needs them)
    max_seq_len: int
    seed: int
    shuffle_buffer: int
    work_dir: Path  # local: example lengths, and the shards being read
    counts: DataCounts
    examples_per_epoch: int = 0  # this worker's

    @classmethod
    def load(
        cls,
        store: ObjectStore,
        dataset_id: str,
        tokenizer: PreTrainedTokenizerBase,
        *,
        rank: int,
        world: int,
        use_teacher_tokens: bool,
        require_teacher: bool,
        max_seq_len: int,
        seed: int,
        work_dir: Path,
        shuffle_buffer: int,
    ) -> WorkerData:
        """Read the worker's rows once: count them and write the kept examples' lengths."""
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer must be >= 1; got {shuffle_buffer}")
        reader = DatasetReader(store, dataset_id)
        data = cls(
            reader,
            WorkerSlice.of(reader, rank, world),
            tokenizer,
            use_teacher_tokens,
            require_teacher,
            max_seq_len,
            seed,
            shuffle_buffer,
            work_dir,
            DataCounts(),
        )
        (work_dir / "lengths").mkdir(parents=True, exist_ok=True)
        for shard, examples in data._shard_examples(range(len(data.slice.shards)), data.counts):
            lengths = np.fromiter((example.positions for example in examples), np.int32)
            np.save(data._lengths_file(shard), lengths)
            data.examples_per_epoch += lengths.shape[0]
        return data

    def with_counts(self, counts: DataCounts) -> WorkerData:
        return dataclasses.replace(self, counts=counts)

    def examples(self, epoch: int) -> Iterator[TokenizedAnswer]:
        """The worker's examples in the order of `epoch`."""
        order, generator = self._epoch_order(epoch)
        read = (example for _, shard in self._shard_examples(order, DataCounts()) for example in shard)
        return shuffle_buffer(read, self.shuffle_buffer, generator)

    def packed_rows(self, epoch: int) -> Iterator[list[TokenizedAnswer]]:
        return pack_stream(self.examples(epoch), lambda example: example.positions, self.max_seq_len)

    def packed_row_count(self, epoch: int) -> int:
        """How many rows `packed_rows(epoch)` yields, from the lengths alone (no reading)."""
        order, generator = self._epoch_order(epoch)
        lengths = (
            length
            for position in order
            for length in np.load(self._lengths_file(self.slice.shards[position])).tolist()
        )
        shuffled = shuffle_buffer(lengths, self.shuffle_buffer, generator)
        return sum(1 for _ in pack_stream(shuffled, int, self.max_seq_len))

    def steps(self, epoch: int, plan: BatchPlan, first_step: int = 0) -> Iterator[StepBatch]:
        """The worker's steps of `epoch` from `first_step` on, without end: after its last packed row the
        epoch's rows start over (the caller stops at the epoch's step count)."""
        rows = itertools.chain.from_iterable(self._packed_rows_forever(epoch))
        rows = itertools.islice(rows, first_step * plan.rows_per_step, None)
        while True:
            yield plan.step_batch(list(itertools.islice(rows, plan.rows_per_step)))

    def _packed_rows_forever(self, epoch: int) -> Iterator[Iterator[list[TokenizedAnswer]]]:
        if self.examples_per_epoch == 0:
            raise ValueError(f"worker {self.slice.rank} has no examples to train on")
        while True:
            yield self.packed_rows(epoch)

    def _epoch_order(self, epoch: int) -> tuple[list[int], np.random.Generator]:
        generator = np.random.default_rng([self.seed, epoch, self.slice.rank])
        return generator.permutation(len(self.slice.shards)).tolist(), generator

    def _shard_examples(
        self, order: Sequence[int], counts: DataCounts
    ) -> Iterator[tuple[int, Iterator[TokenizedAnswer]]]:
        """Each shard in `order` (positions in the slice's shards) with its kept examples."""
        columns = TEACHER_COLUMNS if self.use_teacher_tokens else TEXT_COLUMNS
        for shard, batches in self.slice.shard_batches(self.reader, order, columns, self.work_dir / "shards"):
            examples = (
                example
                for batch in batches
                for example in tokenize_answer_batch(
                    batch,
                    self.tokenizer,
                    use_teacher_tokens=self.use_teacher_tokens,
                    max_seq_len=self.max_seq_len,
                    counts=counts,
                )
            )
            yield shard, self._with_teacher(examples, counts) if self.require_teacher else examples

    @staticmethod
    def _with_teacher(examples: Iterable[TokenizedAnswer], counts: DataCounts) -> Iterator[TokenizedAnswer]:
        for example in examples:
            if example.teacher is None:
                counts.dropped_no_teacher += 1
                counts.kept -= 1
                continue
            yield example

    def _lengths_file(self, shard: int) -> Path:
        return self.work_dir / "lengths" / f"shard-{shard:06d}.npy"
