"""The synchronous SDK against a real control plane over real HTTP: every form of spec, the API's errors
as typed exceptions, listing and cancelling, typed events, `wait`, and verified pulls."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from scripted_platform import JOB, Platform

from stillhouse.client import (
    ApiUnavailable,
    Client,
    Conflict,
    DistillationJob,
    DownloadError,
    InvalidSpec,
    JobEvent,
    JobView,
    NotFound,
    Phase,
    PhaseEvent,
    ProgressEvent,
    Unauthorized,
    WaitTimeout,
)

PIPELINE = ["Pending", "Prompts", "Teacher", "Training", "Evaluating", "Succeeded"]


@pytest.fixture
def client(module_platform: Platform):
    """A client of the module's platform."""
    with Client(url=module_platform.url, token=module_platform.token) as client:
        yield client


@pytest.fixture
def fresh_client(platform: Platform):
    """A client of a platform of the test's own: for a test that lists every job there is."""
    with Client(url=platform.url, token=platform.token) as client:
        yield client


def test_submit_a_dict_yaml_text_a_file_and_a_typed_job(client: Client, module_platform: Platform) -> None:
    platform = module_platform
    seeds = platform.inputs / "specs" / "seeds"
    seeds.mkdir(parents=True)
    (seeds / "a.jsonl").write_text('{"prompt": "hi"}\n')
    document = {"metadata": {"name": "from-a-file"}, **JOB}
    document["spec"] = {**JOB["spec"], "prompts": {"sources": [{"path": "seeds/a.jsonl"}]}}
    spec_file = platform.inputs / "specs" / "job.yaml"
    spec_file.write_text(yaml.safe_dump(document))

    from_dict = client.submit({"metadata": {"name": "from-a-dict"}, **JOB})
    from_text = client.submit("metadata: {name: from-text}\n" + yaml.safe_dump(JOB))
    from_file = client.submit(spec_file)
    from_model = client.submit(DistillationJob.model_validate({"metadata": {"name": "typed"}, **JOB}))

    jobs = [from_dict, from_text, from_file, from_model]
    assert all(isinstance(job, JobView) for job in jobs)
    assert [job.name for job in jobs] == ["from-a-dict", "from-text", "from-a-file", "typed"]
    assert len({job.id for job in jobs}) == 4
    # The relative path in the file reached the API made absolute against the file's folder.
    assert from_file.spec["spec"]["prompts"]["sources"][0]["path"] == str(seeds / "a.jsonl")


def test_an_invalid_spec_carries_each_field_error(client: Client) -> None:
    text = yaml.safe_dump({"spec": {**JOB["spec"], "training": {"epochs": 0}, "bogus": 1}})
    with pytest.raises(InvalidSpec) as caught:
        client.submit(text)
    fields = {error.field: error for error in caught.value.errors}
    assert {"spec.training.epochs", "spec.bogus"} <= fields.keys()
    assert "greater than 0" in fields["spec.training.epochs"].message
    assert caught.value.status == 422
    assert "spec.training.epochs: " in "\n".join(caught.value.lines())
    with pytest.raises(InvalidSpec):
        client.estimate({"spec": {"teacher": {"backend": "local"}}})


def test_a_wrong_token_is_unauthorized(module_platform: Platform) -> None:
    url = module_platform.url
    with Client(url=url, token="not-the-token") as client, pytest.raises(Unauthorized) as caught:
        client.list()
    assert caught.value.status == 401
    assert caught.value.message
    assert "not-the-token" not in str(caught.value)


def test_an_unknown_job_is_not_found(client: Client) -> None:
    for call in (client.get, client.cancel, lambda job_id: list(client.events(job_id))):
        with pytest.raises(NotFound) as caught:
            call("job-0123456789abcdef")
        assert caught.value.job_id == "job-0123456789abcdef"
    with pytest.raises(NotFound):
        client.pull("job-0123456789abcdef", "anywhere")


def test_nothing_listening_is_api_unavailable(free_port) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url=url, token="t") as client, pytest.raises(ApiUnavailable) as caught:
        client.get("job-1")
    assert str(caught.value) == f"cannot reach the Stillhouse API at {url}: connection refused"


def test_list_get_and_cancel(fresh_client: Client) -> None:
    client = fresh_client
    first = client.submit(JOB)
    second = client.submit({"metadata": {"labels": {"team": "a"}}, **JOB})
    assert {first.id, second.id} <= {job.id for job in client.list()}
    assert client.get(second.id).labels == {"team": "a"}

    cancelled = client.cancel(first.id)
    assert cancelled.id == first.id
    assert cancelled.cancel_requested or cancelled.phase is Phase.CANCELLED
    assert client.wait(first.id, timeout=60).phase is Phase.CANCELLED
    assert [job.id for job in client.list(phase="Cancelled")] == [first.id]
    with pytest.raises(Conflict) as caught:
        client.cancel(first.id)
    assert caught.value.status == 409
    assert "Cancelled" in caught.value.message


def test_wait_calls_back_with_every_event_and_returns_the_finished_job(client: Client) -> None:
    job = client.submit(JOB)
    seen: list[JobEvent] = []
    finished = client.wait(job.id, on_progress=seen.append, timeout=60)

    assert finished.phase is Phase.SUCCEEDED
    assert finished.summary is not None and finished.summary.artifacts["student"]
    assert [event.phase for event in seen if isinstance(event, PhaseEvent)] == PIPELINE
    progress = [event for event in seen if isinstance(event, ProgressEvent)]
    assert {event.stage for event in progress} == {"prompts", "teacher", "train", "evaluate"}
    last_of_each_stage = {event.stage: event for event in progress}
    assert all(event.done == event.total == 10 for event in last_of_each_stage.values())
    assert any(event.metrics.get("loss") for event in progress)

    # The stream replays from the start and ends after the terminal phase; ids say where to resume.
    replayed = list(client.events(job.id))
    assert [(type(e), e.id) for e in replayed] == [(type(e), e.id) for e in seen]
    assert list(client.events(job.id, follow=False))[-1] == replayed[-1]


def test_wait_gives_up_after_its_timeout(client: Client) -> None:
    job = client.submit(JOB)
    with pytest.raises(WaitTimeout) as caught:
        client.wait(job.id, timeout=0.5)
    assert f"job {job.id} did not finish within 0.5 s" in str(caught.value)
    client.cancel(job.id)


def test_pull_verifies_every_file_and_refuses_a_corrupted_one(
    client: Client, module_platform: Platform, tmp_path: Path
) -> None:
    platform = module_platform
    job = client.wait(client.submit(JOB).id, timeout=60)
    files = {"config.json": b'{"model_type": "llama"}', "nested/weights.bin": bytes(range(256)) * 4096}
    platform.publish_student(job.id, files, tmp_path / "model")

    pulled: list[tuple[str, int]] = []
    folder = client.pull(job.id, tmp_path / "pulled", on_file=lambda path, size: pulled.append((path, size)))
    assert folder == tmp_path / "pulled"
    assert {path: (folder / path).read_bytes() for path in files} == files
    assert sorted(pulled) == sorted((path, len(data)) for path, data in files.items())

    with pytest.raises(DownloadError, match="is not an empty folder"):
        client.pull(job.id, folder)
    platform.store.put_bytes(f"jobs/{job.id}/train/student/config.json", b'{"model_type": "gpt2"}')
    with pytest.raises(DownloadError, match=r"config\.json"):
        client.pull(job.id, tmp_path / "corrupted")
    assert not (tmp_path / "corrupted").exists()
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".corrupted")] == []


def test_validate_checks_a_spec_without_submitting_it(client: Client) -> None:
    """`POST /v1/jobs:validate`: a valid spec is answered, an invalid one raised with each field's line."""
    before = len(client.list())
    assert client.validate(JOB).valid
    with pytest.raises(InvalidSpec) as caught:
        client.validate("spec:\n  teacher: {backend: local, model: m}\n  training: {epochs: 0}\n")
    # The missing student is on the line of the mapping that should hold it.
    found = [(error.field, error.line) for error in caught.value.errors]
    assert found == [("spec.student", 1), ("spec.training.epochs", 3)]
    assert len(client.list()) == before
