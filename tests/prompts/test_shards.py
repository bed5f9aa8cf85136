"""The prompts stage cut into shards: the same datasets and accounting whatever the sharding, duplicates
found across shards, a re-run that skips the shards already committed, and shards run as Ray tasks on a
real local Ray head."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from ray_heads import fanout_to, local_ray_head
from service_token import SERVICE_TOKEN

from stillhouse.common.datasets.store import DatasetReader
from stillhouse.common.fanout.settings import FanoutSettings
from stillhouse.common.input_roots import InputRoots
from stillhouse.common.jobspec import PromptsSpec
from stillhouse.common.objectstore.local_store import LocalObjectStore
from stillhouse.common.ray.cluster import LocalRayHead, auth_headers
from stillhouse.common.ray.jobs import RayJobs
from stillhouse.common.service_credentials import ServiceCredentials
from stillhouse.prompts.config import PromptsSettings
from stillhouse.prompts.generation import call_seed
from stillhouse.prompts.shards import ShardResources, generation_parts, teacher_completers
from stillhouse.prompts.stage import GeneratePromptsRun

CREDENTIALS = ServiceCredentials(tokens=(SERVICE_TOKEN,), tls=None)
LIGHTHOUSE = (
    "Describe how a lighthouse keeper in 1890 spent a long {season} night, hour by hour, on a remote "
    "rocky island off the coast of Maine, and what he feared most."
)
FIRST_OF_PAIR, SECOND_OF_PAIR = 5, 405  # rows of the near-duplicate pair: shards 0 and 4 of 100 rows


class RecordedProgress:
    def __init__(self) -> None:
        self.messages: list[str] = []

    def update(self, *, message: str | None = None, **_: object) -> None:
        if message is not None:
            self.messages.append(message)


def seed_rows() -> list[dict]:
    rows = [
        {
            "prompt": f"Recipe question {n}: how long should dish number {n} rest before serving?",
            "group": n % 7,
        }
        for n in range(600)
    ]
    rows[FIRST_OF_PAIR] = {"prompt": LIGHTHOUSE.format(season="winter")}
    rows[SECOND_OF_PAIR] = {"prompt": LIGHTHOUSE.format(season="stormy")}
    rows[300] = {"prompt": "RECIPE question 12:  how long should dish number 12 rest before serving"}  # exact
    return rows


@pytest.fixture
def store(tmp_path):
    local = LocalObjectStore(tmp_path / "objects", "stillhouse")
    local.ensure_bucket()
    return local


def rows_spec(tmp_path) -> PromptsSpec:
    path = tmp_path / "seeds.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in seed_rows()))
    return PromptsSpec.model_validate(
        {
            "sources": [{"path": str(path)}, {"inline": ["Name three rivers of Africa and their lengths."]}],
            "generate": {
                "strategy": "template",
                "count": 250,
                "slotCombination": "sampled",
                "template": "Explain {{ concept }} to a {{ reader }} reader in {{ length }} words.",
                "slots": {
                    "concept": [f"concept number {n}" for n in range(40)],
                    "reader": ["young", "curious", "busy", "retired"],
                    "length": ["fifty", "a hundred", "two hundred"],
                },
            },
            "systemPrompt": "Be brief.",
            "seed": 4,
        }
    )


async def run_stage(store, tmp_path, spec, job_id, shard_rows, **options):
    progress = RecordedProgress()
    resources = ShardResources(
        store,
        InputRoots.of([tmp_path]),
        teacher_completers(options.pop("teacher_address", "127.0.0.1:9"), CREDENTIALS, 30),
    )
    run = GeneratePromptsRun(
        resources=resources,
        spec=spec,
        holdout_fraction=0.2,
        job_id=job_id,
        progress=progress,
        fanout=options.pop("fanout", FanoutSettings(shard_rows=shard_rows)),
        **options,
    )
    return await run.run(), progress


def datasets(store, result) -> dict[str, list[dict]]:
    return {
        side: DatasetReader(store, reference.dataset_id).read_table().to_pylist()
        for side, reference in (("train", result.train), ("holdout", result.holdout))
    }


def user_texts(rows: list[dict]) -> set[str]:
    return {row["messages"][-1]["content"] for row in rows}


async def test_many_shards_give_the_datasets_and_accounting_of_one(store, tmp_path):
    spec = rows_spec(tmp_path)

    whole, whole_progress = await run_stage(store, tmp_path, spec, "job-one-shard", shard_rows=100_000)
    sharded, sharded_progress = await run_stage(store, tmp_path, spec, "job-many-shards", shard_rows=100)

    assert "merging shard 1 of 3" in whole_progress.messages  # each source and the template: one shard
    assert "merging shard 10 of 10" in sharded_progress.messages  # 6 of the file, 1 inline, 3 template
    assert datasets(store, sharded) == datasets(store, whole)
    assert sharded.collected == whole.collected == 600 + 1 + 250
    assert dict(sharded.removed_by_rule) == dict(whole.removed_by_rule)
    assert sharded.shortfall == whole.shortfall
    kept = datasets(store, sharded)
    assert len(kept["train"]) + len(kept["holdout"]) == sharded.collected - sum(
        sharded.removed_by_rule.values()
    )
    # The near-duplicate pair lay in shards 0 and 4: the first is kept, the second removed.
    texts = user_texts(kept["train"]) | user_texts(kept["holdout"])
    assert LIGHTHOUSE.format(season="winter") in texts
    assert LIGHTHOUSE.format(season="stormy") not in texts
    assert sharded.removed_by_rule["near_duplicate"] >= 1
    assert sharded.removed_by_rule["exact_duplicate"] >= 1
    assert all(row["messages"][0] == {"role": "system", "content": "Be brief."} for row in kept["train"])
    # The shards' objects are gone once the datasets are committed.
    assert not list(store.list("jobs/job-many-shards/prompts/candidates/"))


def test_the_fanout_settings_come_from_the_prompts_environment(monkeypatch):
    monkeypatch.setenv("STILLHOUSE_PROMPTS_FANOUT__SHARD_ROWS", "500")
    monkeypatch.setenv("STILLHOUSE_PROMPTS_FANOUT__RAY_ADDRESS", "http://ray-head:8265")
    fanout = PromptsSettings(allow_unauthenticated_calls=True).fanout
    assert fanout.shard_rows == 500 and fanout.ray_address == "http://ray-head:8265"


SEEDS = [
    f"Explain how {topic} form, step by step, for a curious reader."
    for topic in [
        "tides",
        "volcanoes",
        "glaciers",
        "rainbows",
        "earthquakes",
        "auroras",
        "monsoons",
        "deserts",
    ]
]


def part_seeds(seed: int, part: int) -> set[int]:
    return {call_seed(seed, "self_instruct", index, part) for index in range(2000)}


async def test_a_rerun_skips_the_generation_shards_already_committed(
    store, tmp_path, fake_teacher, teacher_spec
):
    spec = PromptsSpec.model_validate(
        {"sources": [{"inline": SEEDS}], "generate": {"strategy": "self_instruct", "count": 600}, "seed": 9}
    )
    assert len(generation_parts(600)) == 3
    options = {"teacher_address": fake_teacher.address, "teacher": teacher_spec(), "patience": 64}

    # The stage stops (cancelled) once its first generation shard committed.
    interrupted = asyncio.create_task(run_stage(store, tmp_path, spec, "job-resume", 100, **dict(options)))
    committed = "generation-00000.json"
    while not any(info.key.endswith(committed) for info in store.list("jobs/job-resume/prompts/candidates/")):
        assert not interrupted.done()
        await asyncio.sleep(0.01)
    interrupted.cancel()
    with pytest.raises(asyncio.CancelledError):
        await interrupted
    calls_before = len(fake_teacher.calls("job-resume"))

    resumed, _ = await run_stage(store, tmp_path, spec, "job-resume", 100, **dict(options))
    fresh, _ = await run_stage(store, tmp_path, spec, "job-fresh", 100, **dict(options))

    rerun_seeds = {call["seed"] for call in fake_teacher.calls("job-resume")[calls_before:]}
    fresh_calls = fake_teacher.calls("job-fresh")
    assert rerun_seeds and not rerun_seeds & part_seeds(9, 0)  # the committed part asked nothing again
    assert rerun_seeds & part_seeds(9, 1) and rerun_seeds & part_seeds(9, 2)
    assert len(rerun_seeds) < len(fresh_calls)
    assert datasets(store, resumed) == datasets(store, fresh)
    assert resumed.collected == fresh.collected and dict(resumed.removed_by_rule) == dict(
        fresh.removed_by_rule
    )
    # The committed part's teacher spending is still accounted for.
    assert resumed.generation_ledger.requests == fresh.generation_ledger.requests == len(fresh_calls)


@pytest.fixture(scope="module")
def ray_head_and_store(tmp_path_factory) -> Iterator[tuple[LocalRayHead, LocalObjectStore]]:
    """A Ray head whose workers see the prompts service's object store and input root."""
    folder = tmp_path_factory.mktemp("prompts-ray")
    env = {
        "STILLHOUSE_PROMPTS_OBJECT_STORE__LOCAL_ROOT": str(folder / "objects"),
        "STILLHOUSE_PROMPTS_INPUT_ROOTS": json.dumps([str(folder)]),
    }
    with local_ray_head(worker_env=env) as head:
        store = LocalObjectStore(folder / "objects", "stillhouse")
        store.ensure_bucket()
        yield head, store


@pytest.mark.timeout(600)
async def test_shards_on_ray_give_the_datasets_of_the_stage_in_this_process(ray_head_and_store):
    head, store = ray_head_and_store
    folder = store.folder.parent.parent
    spec = rows_spec(folder)
    ray = fanout_to(head, shard_rows=200)

    on_ray, _ = await run_stage(store, folder, spec, "job-on-ray", 200, fanout=ray)
    here, _ = await run_stage(store, folder, spec, "job-here", 100_000)

    jobs = RayJobs(head.address, headers=auth_headers(head.token)).client.list_jobs()
    assert any("job-on-ray" in (job.submission_id or "") for job in jobs)  # the shards ran on Ray
    assert datasets(store, on_ray) == datasets(store, here)
    assert on_ray.collected == here.collected and dict(on_ray.removed_by_rule) == dict(here.removed_by_rule)
    assert not list(store.list("jobs/job-on-ray/prompts/candidates/"))
