"""A worker's training data streamed from its shards (`worker_data`): every row once per epoch across
workers, the same examples as reading the whole dataset, a deterministic order, step counts known up
front, resuming mid-epoch, and memory that does not grow with the dataset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from synthetic_answers import write_synthetic_answers
from transformers import AutoTokenizer

from stillhouse.trainer.data import BatchPlan, read_answer_rows, tokenize_answers
from stillhouse.trainer.worker_data import WorkerData, shuffle_buffer

DATASET = "jobs/test/teacher/train"
WARM_UP = "jobs/warm-up/teacher/train"


@pytest.fixture
def tokenizer(tokenizer_dir: Path):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture
def load(object_store, tokenizer, tmp_path):
    def make(rank: int = 0, world: int = 1, **options) -> WorkerData:
        settings = {
            "use_teacher_tokens": True,
            "require_teacher": True,
            "max_seq_len": 128,
            "seed": 7,
            "shuffle_buffer": 16,
            **options,
        }
        return WorkerData.load(
            object_store,
            DATASET,
            tokenizer,
            rank=rank,
            world=world,
            work_dir=tmp_path / f"data-{rank}-of-{world}",
            **settings,
        )

    return make


def prompt_ids_of(data: WorkerData, epoch: int) -> list[str]:
    return [example.prompt_id for example in data.examples(epoch)]


@pytest.mark.parametrize(("rows_per_shard", "world"), [(25, 3), (100, 3)], ids=["shards", "fewer-shards"])
def test_every_row_once_per_epoch_across_workers(object_store, load, rows_per_shard, world):
    write_synthetic_answers(object_store, DATASET, 200, max_shard_rows=rows_per_shard, answer_tokens=4)
    everything = sorted(row["prompt_id"] for row in read_answer_rows(object_store, DATASET))
    workers = [load(rank, world) for rank in range(world)]
    for epoch in (0, 1):
        per_worker = [prompt_ids_of(data, epoch) for data in workers]
        assert all(per_worker)
        assert sorted(prompt_id for ids in per_worker for prompt_id in ids) == everything
    assert sum(data.counts.kept for data in workers) == 200


def test_streamed_examples_are_those_of_the_whole_dataset_with_float16_logprobs(
    object_store, answers_dataset, tiny_llama, tmp_path, tokenizer, load
):
    teacher = tiny_llama(tmp_path / "teacher", seed=1)
    prompts = [f"tell me about {topic}" for topic in ("cats", "the sea", "rain", "bread", "music")]
    answers_dataset(object_store, DATASET, teacher, prompts, top_k=5, max_new_tokens=12, rows_per_shard=2)
    for use_teacher_tokens in (True, False):
        whole = {
            example.prompt_id: example
            for example in tokenize_answers(
                read_answer_rows(object_store, DATASET),
                tokenizer,
                use_teacher_tokens=use_teacher_tokens,
                max_seq_len=20,
            )
        }
        data = load(use_teacher_tokens=use_teacher_tokens, require_teacher=False, max_seq_len=20)
        streamed = list(data.examples(0))
        assert sorted(example.prompt_id for example in streamed) == sorted(whole)
        for example in streamed:
            expected = whole[example.prompt_id]
            assert (example.prompt_ids, example.response_ids) == (expected.prompt_ids, expected.response_ids)
            if not use_teacher_tokens:
                assert example.teacher is None
                continue
            assert example.teacher.topk_logprobs.dtype == np.float16
            np.testing.assert_array_equal(example.teacher.topk_ids, expected.teacher.topk_ids)
            np.testing.assert_allclose(
                example.teacher.topk_logprobs.astype(np.float32), expected.teacher.topk_logprobs, rtol=1e-3
            )
            np.testing.assert_allclose(
                example.teacher.tail_logprob.astype(np.float32), expected.teacher.tail_logprob, rtol=1e-3
            )


def test_order_is_deterministic_per_seed_and_epoch(object_store, load):
    write_synthetic_answers(object_store, DATASET, 120, max_shard_rows=30, answer_tokens=4)
    data = load()
    assert prompt_ids_of(data, 0) == prompt_ids_of(load(), 0)
    assert prompt_ids_of(data, 0) != prompt_ids_of(data, 1)
    assert prompt_ids_of(data, 0) != prompt_ids_of(load(seed=8), 0)


def test_the_shuffle_buffer_holds_at_most_its_size():
    held = []

    def counted(count: int):
        for item in range(count):
            held.append(item)
            yield item

    out = []
    for item in shuffle_buffer(counted(1000), 50, np.random.default_rng(0)):
        out.append(item)
        assert len(held) - len(out) <= 50
    assert sorted(out) == list(range(1000)) and out != list(range(1000))
    # An item comes out at most `size` places before where it went in.
    assert all(position >= item - 50 for position, item in enumerate(out))


def test_step_counts_are_known_before_reading_an_epoch(object_store, load):
    write_synthetic_answers(object_store, DATASET, 150, max_shard_rows=40, answer_tokens=6)
    data = load(max_seq_len=64)
    for epoch in range(3):
        assert data.packed_row_count(epoch) == sum(1 for _ in data.packed_rows(epoch))


def test_resuming_mid_epoch_continues_where_it_stopped_and_a_short_worker_starts_over(object_store, load):
    write_synthetic_answers(object_store, DATASET, 90, max_shard_rows=20, answer_tokens=6)
    data = load(max_seq_len=64)
    plan = BatchPlan(rows_per_step=4, micro_batch_rows=2)
    rows = data.packed_row_count(1)
    steps = plan.steps_per_epoch(rows) + 2  # two steps past the end: the epoch's rows start over

    def ids(step_batches) -> list[list[str]]:
        return [[example.prompt_id for example in step.examples] for step in step_batches]

    straight = ids(step for _, step in zip(range(steps), data.steps(1, plan), strict=False))
    resumed = ids(step for _, step in zip(range(steps - 3), data.steps(1, plan, first_step=3), strict=False))
    assert resumed == straight[3:]
    epoch_ids = [example.prompt_id for row in data.packed_rows(1) for example in row]
    straight_ids = [prompt_id for step in straight for prompt_id in step]
    assert straight_ids == (epoch_ids + epoch_ids)[: len(straight_ids)]


# Run in a fresh process, so that its peaks are those of streaming alone.
STREAM_ONE_EPOCH = """
import json, sys, threading
from pathlib import Path
import psutil
import pyarrow as pa
from transformers import AutoTokenizer
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.trainer.data import BatchPlan
from stillhouse.trainer.worker_data import WorkerData

settings, warm_up, dataset, tokenizer_dir, work_dir = sys.argv[1:]
store = open_object_store(ObjectStoreSettings.model_validate_json(settings))
tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
plan = BatchPlan(rows_per_step=32, micro_batch_rows=32)


def stream(dataset):
    data = WorkerData.load(
        store, dataset, tokenizer, rank=0, world=1, use_teacher_tokens=True, require_teacher=True,
        max_seq_len=256, seed=0, work_dir=Path(work_dir) / dataset, shuffle_buffer=2048,
    )
    steps = zip(range(plan.steps_per_epoch(data.packed_row_count(0))), data.steps(0, plan))
    return sum(len(step.examples) for _, step in steps)


stream(warm_up)  # what the first use costs once (libraries' caches, thread pools) is not the reader's
process = psutil.Process()
before = peak = process.memory_info().rss
done = threading.Event()

def sample():
    global peak
    while not done.wait(0.005):
        peak = max(peak, process.memory_info().rss)

sampler = threading.Thread(target=sample)
sampler.start()
examples = stream(dataset)
done.set()
sampler.join()
arrow_peak = pa.default_memory_pool().max_memory()
print(json.dumps({"examples": examples, "rss_growth": peak - before, "arrow_peak": arrow_peak}))
"""


def test_memory_held_while_streaming_does_not_grow_with_the_rows(
    object_store, object_store_settings, tokenizer_dir, tmp_path
):
    rows, top_k, answer_tokens = 100_000, 20, 32
    write_synthetic_answers(object_store, DATASET, rows, max_shard_rows=20_000, top_k=top_k)
    write_synthetic_answers(object_store, WARM_UP, 5_000, max_shard_rows=2_000, top_k=top_k)
    # Loaded whole, the top-k alone would take this much, even as float16 ids and logprobs (6 bytes).
    whole_topk_bytes = rows * answer_tokens * top_k * 6
    bound = 96 * 1024 * 1024
    assert whole_topk_bytes > 3 * bound
    arguments = [
        object_store_settings.model_dump_json(),
        WARM_UP,
        DATASET,
        str(tokenizer_dir),
        str(tmp_path / "data"),
    ]
    result = subprocess.run(
        [sys.executable, "-c", STREAM_ONE_EPOCH, *arguments], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.splitlines()[-1])
    assert figures["examples"] >= rows  # the whole epoch was read
    assert figures["rss_growth"] < bound, f"resident memory grew by {figures['rss_growth'] / 2**20:.0f} MiB"
    assert figures["arrow_peak"] < bound, f"{figures['arrow_peak'] / 2**20:.0f} MiB of Arrow buffers"
