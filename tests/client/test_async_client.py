"""The asyncio SDK against a real control plane over real HTTP: the same requests and answers as the
synchronous client, awaited."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scripted_platform import JOB, Platform

from stillhouse.client import (
    AsyncClient,
    Conflict,
    DownloadError,
    InvalidSpec,
    JobEvent,
    NotFound,
    Phase,
    PhaseEvent,
    ProgressEvent,
    Unauthorized,
    WaitTimeout,
)


async def test_submit_wait_list_events_and_pull(platform: Platform, tmp_path: Path) -> None:
    async with AsyncClient(url=platform.url, token=platform.token) as client:
        job = await client.submit(yaml.safe_dump(JOB))
        assert job.phase is Phase.PENDING

        seen: list[JobEvent] = []

        async def remember(event: JobEvent) -> None:
            seen.append(event)

        finished = await client.wait(job.id, on_progress=remember, timeout=60)
        assert finished.phase is Phase.SUCCEEDED
        phases = [event.phase for event in seen if isinstance(event, PhaseEvent)]
        assert phases == ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]
        assert {event.stage for event in seen if isinstance(event, ProgressEvent)} == {
            "prompts",
            "teacher",
            "train",
            "evaluate",
        }
        assert [event.id async for event in client.events(job.id)] == [event.id for event in seen]
        assert [listed.id for listed in await client.list(phase="Succeeded")] == [job.id]
        assert (await client.get(job.id)).summary == finished.summary

        files = {"config.json": b'{"model_type": "llama"}', "weights.bin": b"\x01\x02" * 50_000}
        platform.publish_student(job.id, files, tmp_path / "model")
        folder = await client.pull(job.id, tmp_path / "pulled")
        assert {path: (folder / path).read_bytes() for path in files} == files
        platform.store.put_bytes(f"jobs/{job.id}/train/student/weights.bin", b"\x00" * 100_000)
        with pytest.raises(DownloadError, match=r"weights\.bin: sha256 differs"):
            await client.pull(job.id, tmp_path / "corrupted")
        assert not (tmp_path / "corrupted").exists()


async def test_errors_and_a_timed_out_wait(platform: Platform) -> None:
    async with AsyncClient(url=platform.url, token="wrong") as stranger:
        with pytest.raises(Unauthorized):
            await stranger.list()
    async with AsyncClient(url=platform.url, token=platform.token) as client:
        with pytest.raises(NotFound) as caught:
            await client.get("job-0123456789abcdef")
        assert caught.value.job_id == "job-0123456789abcdef"
        with pytest.raises(InvalidSpec) as invalid:
            await client.submit({"spec": {**JOB["spec"], "training": {"epochs": 0}}})
        assert [error.field for error in invalid.value.errors] == ["spec.training.epochs"]

        job = await client.submit(JOB)
        with pytest.raises(WaitTimeout):
            await client.wait(job.id, timeout=0.5)
        await client.cancel(job.id)
        assert (await client.wait(job.id, timeout=60)).phase is Phase.CANCELLED
        with pytest.raises(Conflict):
            await client.cancel(job.id)
